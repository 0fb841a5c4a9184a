"""VM templates without QEMU: the key, manifest validation, the template argv, clone RAM."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from spinbox.shim.vm.config import VMConfig
from spinbox.shim.vm.paths import VMPaths
from spinbox.shim.vm.qemu_args import Resolved, TemplateArgv, build_argv
from spinbox.shim.vm.template import (FORMAT_VERSION, CloneRAM, Template, TemplateError, clone_config,
                                      clone_memory, key_fields, load_template, manifest_problem,
                                      template_key, template_problem)

TCG = Resolved("tcg", "virtio-serial")
QEMU = "QEMU emulator version 7.2.22"


@pytest.fixture
def config(tmp_path: Path) -> VMConfig:
    for f in ("vmlinux", "initrd", "root.erofs"):
        (tmp_path / f).write_bytes(b"x" * 10)
    return VMConfig(kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd", root_disk=tmp_path / "root.erofs",
                    image_cmdline="rdinit=/init").validate()


def test_key_is_stable_and_ignores_host_only_choices(config):
    k = template_key(config, TCG, QEMU, "abc")
    assert len(k) == 64 and k == template_key(config, TCG, QEMU, "abc")
    for change in ({"seccomp_sandbox": False}, {"tcg_tb_size_mb": 64}, {"memory_backend": "ram"},
                   {"keep_console_log": True}):
        assert template_key(dataclasses.replace(config, **change), TCG, QEMU, "abc") == k, change


@pytest.mark.parametrize("change", [{"vcpus": 2}, {"max_vcpus": 4}, {"memory_mb": 512}, {"max_memory_mb": 1024},
                                    {"machine": "microvm"}, {"pci_hotplug_ports": 2}, {"rng": False},
                                    {"cmdline_extra": ["foo=1"]}, {"agent_port_name": "other"}])
def test_key_changes_with_the_guest_shape(config, change):
    assert template_key(dataclasses.replace(config, **change), TCG, QEMU, "abc") != template_key(config, TCG, QEMU, "abc")


def test_key_changes_with_qemu_image_accel_and_files(config):
    k = template_key(config, TCG, QEMU, "abc")
    assert template_key(config, TCG, QEMU + "x", "abc") != k
    assert template_key(config, TCG, QEMU, "abd") != k
    assert template_key(config, Resolved("kvm", "virtio-serial"), QEMU, "abc") != k
    st = os.stat(config.kernel)
    os.utime(config.kernel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert template_key(config, TCG, QEMU, "abc") != k


def test_key_refuses_vsock(config):
    with pytest.raises(TemplateError, match="virtio-serial"):
        key_fields(config, Resolved("tcg", "vsock", 5), QEMU)


def good_manifest(key: str = "k" * 64, state: bytes = b"state") -> dict:
    return {"version": FORMAT_VERSION, "key": key, "memory_mb": 1, "ram_size": 1 << 20, "state_size": len(state),
            "state_sha256": hashlib.sha256(state).hexdigest(), "next_stream_id": 13}


def test_manifest_problem():
    m = good_manifest()
    assert manifest_problem(m, "k" * 64) is None
    assert "key mismatch" in manifest_problem(m, "j" * 64)
    assert manifest_problem([], "k") == "manifest is not an object"
    assert "version" in manifest_problem({**m, "version": 99}, "k" * 64)
    assert "ram_size" in manifest_problem({**m, "ram_size": 5}, "k" * 64)
    assert "next_stream_id" in manifest_problem({**m, "next_stream_id": 12}, "k" * 64)
    assert "state_size" in manifest_problem({**m, "state_size": True}, "k" * 64)
    del m["state_sha256"]
    assert "state_sha256" in manifest_problem(m, "k" * 64)


def make_template_dir(d: Path, key: str = "k" * 64) -> Path:
    d.mkdir()
    (d / "state").write_bytes(b"state")
    with open(d / "ram", "wb") as f:
        f.truncate(1 << 20)
        f.seek(4096 * 3)
        f.write(b"data" * 1024)
    (d / "manifest.json").write_text(json.dumps(good_manifest(key)))
    return d


def test_template_problem_checks_files(tmp_path):
    d = make_template_dir(tmp_path / "t")
    t, why = template_problem(d, "k" * 64)
    assert why == "" and t is not None and t.next_stream_id == 13 and t.memory_mb == 1
    assert load_template(tmp_path / "missing", "k" * 64) is None
    (d / "state").write_bytes(b"stat3")
    t, why = template_problem(d, "k" * 64)
    assert t is None and "checksum" in why
    (d / "state").write_bytes(b"state!")
    assert "state file is 6 bytes" in template_problem(d, "k" * 64)[1]
    (d / "state").write_bytes(b"state")
    os.truncate(d / "ram", 4096)
    assert "RAM file" in template_problem(d, "k" * 64)[1]
    (d / "manifest.json").write_bytes(b"\xff{")
    assert "corrupt manifest" in template_problem(d, "k" * 64)[1]
    (d / "manifest.json").write_text(" " * 70000)
    assert "larger than" in template_problem(d, "k" * 64)[1]


def test_template_argv_only_changes_ram_and_adds_vmgenid(config, tmp_path):
    paths = VMPaths(Path("/run/sbx/vm1"))   # argv only: a short path, whatever pytest's tmp dir is
    cold = build_argv(config, paths, TCG)
    assert build_argv(config, paths, TCG, template=None) == cold
    tpl = build_argv(config, paths, TCG, template=TemplateArgv("/dev/shm/t/ram", share=True))
    i = cold.index("memory-backend-memfd,id=ram0,size=256M,share=on")
    assert tpl[:i] == cold[:i] and tpl[i + 1:len(cold)] == cold[i + 1:]
    assert tpl[i] == "memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/t/ram,share=on"
    assert tpl[len(cold):] == ["-device", "vmgenid,id=vmgenid0,guid=auto"]
    clone = build_argv(config, paths, TCG, template=TemplateArgv("/proc/self/fd/7", share=False,
                                                                 vmgenid="1-2", incoming=True))
    assert clone[i] == "memory-backend-file,id=ram0,size=256M,mem-path=/proc/self/fd/7,share=off"
    assert clone[len(cold):] == ["-device", "vmgenid,id=vmgenid0,guid=1-2", "-incoming", "defer"]
    assert "-sandbox" in clone   # fd: migration needs no spawn


def test_clone_config():
    c = VMConfig(kernel=Path("/bin/sh"))
    assert clone_config(c, CloneRAM.PRIVATE).memory_backend == "ram"   # virtiofs refused
    assert clone_config(c, CloneRAM.COPY) is c


def test_clone_memory_private_and_copy(tmp_path):
    d = make_template_dir(tmp_path / "t")
    t = Template(d, "k" * 64, good_manifest())
    m = clone_memory(t, CloneRAM.PRIVATE, vmgenid="g")
    assert m.argv == TemplateArgv(str(d / "ram"), share=False, vmgenid="g", incoming=True) and m.fds == ()
    m = clone_memory(t, CloneRAM.COPY)
    try:
        (fd,) = m.fds
        assert m.argv.ram_path == f"/proc/self/fd/{fd}" and m.argv.share and m.argv.incoming
        assert m.argv.vmgenid != clone_memory(t, CloneRAM.PRIVATE).argv.vmgenid   # a new one per clone
        assert os.fstat(fd).st_size == 1 << 20
        assert os.pread(fd, 1 << 20, 0) == (d / "ram").read_bytes()
        assert 4096 <= m.copied_bytes < 1 << 20   # only the data extent, holes stay holes
        assert not os.get_inheritable(fd)   # QEMU gets it through pass_fds only
    finally:
        m.close()
    assert m.fds == ()
