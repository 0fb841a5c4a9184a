"""A CRI pod's shared namespaces: the shim keeps namespace paths that name a container of the
sandbox and refuses host namespaces (shim/spec.py); the guest checks the paths against its
live container inits and sets the pod's net.* sysctls itself (vminitd/podns.py, bundle.py)."""
from __future__ import annotations

import pytest

from spinbox.shim.spec import SpecError, adapt_spec, refuse_host_namespaces
from spinbox.vminitd import bundle, podns
from spinbox.vminitd.errors import InvalidArgument

CRI_TYPE = "io.kubernetes.cri.container-type"


def cri_spec(kind="container", namespaces=None, **extra):
    s = {"process": {"args": ["sh"], "cwd": "/"}, "root": {"path": "rootfs"},
         "annotations": {CRI_TYPE: kind, "io.kubernetes.cri.sandbox-id": "pause1"},
         "linux": {"namespaces": namespaces if namespaces is not None else [
             {"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "mount"},
             {"type": "pid", "path": "/proc/7/ns/pid"}, {"type": "ipc", "path": "/proc/7/ns/ipc"},
             {"type": "uts", "path": "/proc/7/ns/uts"}]}}
    s.update(extra)
    return s


# --- shim ------------------------------------------------------------------------------------

def test_shim_keeps_paths_naming_the_pods_sandbox_container():
    out, notes = adapt_spec(cri_spec(), rootfs="/r", inits={7: "pause1", 9: "other"})
    by_type = {ns["type"]: ns for ns in out["linux"]["namespaces"]}
    assert "network" not in by_type
    assert by_type["pid"] == {"type": "pid", "path": "/proc/7/ns/pid"}
    assert by_type["ipc"]["path"] == "/proc/7/ns/ipc" and by_type["uts"]["path"] == "/proc/7/ns/uts"
    assert by_type["mount"] == {"type": "mount"}
    assert any("joins container pause1" in n for n in notes)


@pytest.mark.parametrize("path", ["/proc/8/ns/pid", "/proc/7/ns/ipc", "/var/run/netns/x", "/proc/7/ns/../pid",
                                  "/proc/0/ns/pid", 7])
def test_shim_refuses_a_path_that_is_not_a_sandbox_containers_namespace(path):
    s = cri_spec(namespaces=[{"type": "pid", "path": path}])
    with pytest.raises(SpecError, match="cannot join a host namespace"):
        adapt_spec(s, rootfs="/r", inits={7: "pause1"})


@pytest.mark.parametrize("missing,named", [("network", "hostNetwork"), ("pid", "hostPID"), ("ipc", "hostIPC")])
@pytest.mark.parametrize("kind", ["sandbox", "container"])
def test_cri_host_namespaces_are_refused_by_name(kind, missing, named):
    namespaces = [{"type": t} for t in ("network", "pid", "ipc", "uts", "mount") if t != missing]
    with pytest.raises(SpecError, match=f"{named}.*own VM"):
        refuse_host_namespaces(cri_spec(kind, namespaces))


def test_all_pod_namespaces_present_or_not_cri_passes():
    refuse_host_namespaces(cri_spec("sandbox", [{"type": t} for t in ("network", "pid", "ipc", "uts", "mount")]))
    plain = cri_spec(namespaces=[{"type": "mount"}])
    del plain["annotations"]
    refuse_host_namespaces(plain)      # ctr without a network entry: the sandbox's network, as before


def test_two_host_namespaces_are_both_named():
    with pytest.raises(SpecError, match="hostNetwork, hostPID"):
        refuse_host_namespaces(cri_spec("sandbox", [{"type": "ipc"}, {"type": "mount"}]))


# --- guest -----------------------------------------------------------------------------------

def test_guest_joins_a_live_containers_namespace():
    out, notes = bundle.adapt_spec(cri_spec(), "c1", "/r", terminal=False, inits={7: "pause1"})
    by_type = {ns["type"]: ns for ns in out["linux"]["namespaces"]}
    assert by_type["pid"] == {"type": "pid", "path": "/proc/7/ns/pid"}
    assert by_type["uts"] == {"type": "uts", "path": "/proc/7/ns/uts"}
    assert "network" not in by_type
    assert any("pause1" in n for n in notes)
    assert podns.joins_pid_namespace(out)


@pytest.mark.parametrize("path,why", [("/proc/8/ns/pid", "not a running container"),
                                      ("/proc/7/ns/ipc", "names a ipc namespace"),
                                      ("/run/netns/x", "only join"), ("/proc/7/ns/pid/", "only join"),
                                      ("/proc/1/root/proc/7/ns/pid", "only join")])
def test_guest_refuses_other_namespace_paths(path, why):
    s = cri_spec(namespaces=[{"type": "pid", "path": path}])
    with pytest.raises(InvalidArgument, match=why):
        bundle.adapt_spec(s, "c1", "/r", terminal=False, inits={7: "pause1"})


def test_guest_refuses_paths_when_no_container_runs():
    with pytest.raises(InvalidArgument, match="not a running container"):
        bundle.adapt_spec(cri_spec(), "c1", "/r", terminal=False, inits={})


def test_own_pid_namespace_is_not_a_joined_one():
    out, _ = bundle.adapt_spec(cri_spec("sandbox", [{"type": "pid"}, {"type": "ipc"}]), "p", "/r", terminal=False)
    assert not podns.joins_pid_namespace(out)


def test_net_sysctls_are_split_from_the_rest():
    linux = {"sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"}}
    assert podns.split_net_sysctls(linux) == {"net.ipv4.ip_unprivileged_port_start": "0"}
    assert linux == {"sysctl": {"kernel.shm_rmid_forced": "1"}}
    only_net = {"sysctl": {"net.core.somaxconn": "1024"}}
    podns.split_net_sysctls(only_net)
    assert "sysctl" not in only_net


@pytest.mark.parametrize("sysctls", [{"net/ipv4/x": "1"}, {"net..x": "1"}, {"net": "1"}, {"net.x": 1},
                                     {"net.x": "1\n2"}, {"net.x": "v" * 300}, [], {f"a.b{i}": "1" for i in range(65)}])
def test_bad_sysctls_are_refused(sysctls):
    with pytest.raises(InvalidArgument):
        podns.split_net_sysctls({"sysctl": sysctls})


def test_apply_sysctls_writes_under_the_root(tmp_path):
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "ip_unprivileged_port_start").write_text("1024\n")
    podns.apply_sysctls({"net.ipv4.ip_unprivileged_port_start": "80"}, root=str(tmp_path))
    assert (tmp_path / "net" / "ipv4" / "ip_unprivileged_port_start").read_text() == "80"
    with pytest.raises(InvalidArgument, match="no such sysctl"):
        podns.apply_sysctls({"net.ipv4.nope": "1"}, root=str(tmp_path))
