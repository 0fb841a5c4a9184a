"""shim.vm.hostcgroup: limits from the VM size, hostile cgroupsPaths, layouts (on a fake tree)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spinbox.shim import config as config_mod
from spinbox.shim.errors import ConfigError
from spinbox.shim.vm import hostcgroup as hc

MiB = 1024 * 1024


def test_limits_follow_the_vm_size() -> None:
    small, big = hc.limits_for(1, 256), hc.limits_for(3, 1024)
    assert small.memory_bytes == (256 + hc.MEMORY_OVERHEAD_MB) * MiB
    assert big.memory_bytes == (1024 + hc.MEMORY_OVERHEAD_MB) * MiB
    assert (small.cpu_quota_us, small.cpu_period_us) == (200_000, 100_000)
    assert big.cpu_quota_us == 400_000
    assert big.pids > small.pids
    with pytest.raises(hc.HostCgroupError):
        hc.limits_for(0, 256)


def test_the_memory_margin_covers_the_measured_qemu_overhead() -> None:
    # QEMU PSS under TCG was 144 MiB for a 256 MiB guest (docs/benchmarks.md, 'many')
    assert hc.limits_for(1, 256).memory_bytes >= (256 + 2 * 144) * MiB


@pytest.mark.parametrize("bad", ["relative/path", "/a/../b", "/a/./b", "/a/b\n", "/a b", "/" + "a/" * 40,
                                 "/" + "x" * 5000, "/a/\x00"])
def test_hostile_cgroup_paths_are_refused(bad: str) -> None:
    with pytest.raises(hc.HostCgroupError):
        hc.cgroup_rel_path(bad)


def test_a_good_path_is_made_relative() -> None:
    assert hc.cgroup_rel_path("/kubepods//burstable/pod1") == "kubepods/burstable/pod1"


def _cri(path: object) -> dict:
    return {"annotations": {hc.CRI_CONTAINER_TYPE: "sandbox"}, "linux": {"cgroupsPath": path}}


def test_pod_cgroup_from_a_cri_sandbox_spec() -> None:
    assert hc.pod_cgroup(_cri("/kubepods/burstable/podX/abc")) == "kubepods/burstable/podX"
    assert hc.pod_cgroup(_cri("kubepods-burstable-podX.slice:cri-containerd:abc")) == \
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podX.slice"
    # not a CRI sandbox (ctr run): the configured parent is used
    assert hc.pod_cgroup({"linux": {"cgroupsPath": "/default/abc"}}) is None
    assert hc.pod_cgroup({"annotations": {hc.CRI_CONTAINER_TYPE: "sandbox"}}) is None


@pytest.mark.parametrize("bad", ["/kubepods/../../etc/x", "a:b", "a/../b.slice:x:y", "a--b.slice:x:y", "-x.slice:a:b",
                                 "kubepods.slic:a:b", 7])
def test_hostile_cri_cgroups_paths_are_refused(bad: object) -> None:
    with pytest.raises(hc.HostCgroupError):
        hc.pod_cgroup(_cri(bad))


def _v1_tree(root: Path) -> None:
    for c in hc.V1_CONTROLLERS:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("")


def test_detect_v1_v2_and_none(tmp_path: Path) -> None:
    assert isinstance(hc.detect(tmp_path), str)          # nothing there: the reason
    _v1_tree(tmp_path / "v1")
    assert hc.detect(tmp_path / "v1") == hc.Layout(1, tuple(tmp_path / "v1" / c for c in hc.V1_CONTROLLERS))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    (v2 / "cgroup.subtree_control").write_text("")
    assert "pids" in str(hc.detect(v2))                   # a missing controller is named
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert hc.detect(v2) == hc.Layout(2, (v2,))


def test_limit_files_per_version() -> None:
    lim = hc.limits_for(2, 512)
    v2 = {name: value for _, name, value in hc.limit_files(2, lim)}
    assert v2 == {"memory.max": str(lim.memory_bytes), "cpu.max": "300000 100000", "pids.max": str(lim.pids)}
    v1 = {(i, name): value for i, name, value in hc.limit_files(1, lim)}
    assert v1[(0, "memory.limit_in_bytes")] == str(lim.memory_bytes)
    assert v1[(1, "cpu.cfs_quota_us")] == "300000" and v1[(2, "pids.max")] == str(lim.pids)


def test_owner_makes_resizes_and_removes_a_v1_cgroup(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    owner = hc.CgroupOwner("sb1", 1, 256, parent="/spinbox", root=tmp_path)
    owner.prepare({})
    mem = tmp_path / "memory" / "spinbox" / "spinbox-sb1"
    assert owner.dirs[0] == str(mem)
    assert (mem / "memory.limit_in_bytes").read_text() == str(hc.limits_for(1, 256).memory_bytes)
    owner.resized(2, 1024)
    assert (tmp_path / "cpu/spinbox/spinbox-sb1/cpu.cfs_quota_us").read_text() == "300000"
    _empty(owner.dirs)
    asyncio.run(owner.remove())
    assert not mem.exists() and owner.dirs == ()
    # the default parent was made for it, and it was the last sandbox: nothing is left behind
    assert [c for c in hc.V1_CONTROLLERS if (tmp_path / c / "spinbox").exists()] == []


def _empty(dirs: tuple[str, ...]) -> None:
    """A fake tree's dirs hold files (the kernel's do not): empty them so rmdir can work."""
    for d in dirs:
        for f in Path(d).iterdir():
            f.unlink()


def test_the_default_parent_stays_while_a_sibling_lives(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    a = hc.CgroupOwner("a", 1, 256, root=tmp_path)
    b = hc.CgroupOwner("b", 1, 256, root=tmp_path)
    a.prepare({})
    b.prepare({})
    _empty(a.dirs)
    asyncio.run(a.remove())
    assert (tmp_path / "pids" / "spinbox" / "spinbox-b").is_dir()
    _empty(b.dirs)
    asyncio.run(b.remove())
    assert not (tmp_path / "pids" / "spinbox").exists()


def test_a_pods_cgroup_is_never_removed_with_its_sandbox(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    for c in hc.V1_CONTROLLERS:
        (tmp_path / c / "kubepods" / "podX").mkdir(parents=True)
    owner = hc.CgroupOwner("sb", 1, 256, root=tmp_path)
    owner.prepare(_cri("/kubepods/podX/sb"))
    _empty(owner.dirs)
    asyncio.run(owner.remove())
    assert not (tmp_path / "pids" / "kubepods" / "podX" / "spinbox-sb").exists()
    assert (tmp_path / "pids" / "kubepods" / "podX").is_dir()


def test_creating_survives_a_sibling_removing_the_parent_meanwhile(tmp_path: Path, monkeypatch) -> None:
    _v1_tree(tmp_path)
    cg = hc.SandboxCgroup(hc.detect(tmp_path), "spinbox", "sb")  # type: ignore[arg-type]
    real_mkdir = Path.mkdir
    failed = []

    def racing_mkdir(self, *a, **kw):
        if self.name == "spinbox-sb" and not failed:     # the parent vanished under us, once
            failed.append(self)
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_mkdir(self, *a, **kw)
    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    cg.create(hc.limits_for(1, 256))
    assert failed and all(d.is_dir() for d in cg.dirs)


def test_remove_refuses_dirs_that_are_not_ours(tmp_path: Path) -> None:
    with pytest.raises(hc.HostCgroupError):
        hc.remove_dirs([tmp_path / "memory" / "system.slice"], root=tmp_path)
    with pytest.raises(hc.HostCgroupError):
        hc.remove_dirs([Path("/etc/spinbox-x")], root=tmp_path)


def test_the_config_refuses_a_bad_parent_and_can_turn_it_off() -> None:
    with pytest.raises(ConfigError, match="host_cgroup_parent"):
        config_mod.from_dict({"confinement": {"host_cgroup_parent": "/a/../b"}})
    with pytest.raises(ConfigError, match="host_cgroup"):
        config_mod.from_dict({"confinement": {"host_cgroup": "yes"}})
    assert config_mod.from_dict({"confinement": {"host_cgroup": False}}).confinement.host_cgroup is False
    assert config_mod.from_dict({}).confinement.host_cgroup is True


def test_owner_puts_a_cri_sandbox_under_its_pod_and_enables_v2_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    pod = tmp_path / "kubepods" / "podX"
    pod.mkdir(parents=True)
    for d in (tmp_path / "kubepods", pod):
        (d / "cgroup.subtree_control").write_text("")
    owner = hc.CgroupOwner("sb2", 2, 512, root=tmp_path)
    owner.prepare(_cri("/kubepods/podX/sb2"))
    assert owner.dirs == (str(pod / "spinbox-sb2"),)
    assert (pod / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (pod / "spinbox-sb2" / "cpu.max").read_text() == "300000 100000"
    with pytest.raises(hc.HostCgroupError):
        hc.CgroupOwner("sb3", 1, 256, root=tmp_path).prepare(_cri("/kubepods/../x/sb3"))
