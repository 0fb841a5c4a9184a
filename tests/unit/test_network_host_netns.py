"""A spec's netns path that is the host's own network namespace is refused before anything is
touched (shim/network/netns.py check_not_host, from NetworkAttachment.decide and
HostNetworks.attach): joining it would move every host interface into the VM."""
from __future__ import annotations

import asyncio
import os

import pytest

from spinbox.shim import mounts
from spinbox.shim.network import netns
from spinbox.shim.network.attachment import NetworkAttachment, NetworkSettings, NetworkSetupError
from spinbox.shim.network.host import HostNetworks
from spinbox.shim.state import GroupPaths, State


def _cri_spec(path: str) -> dict:
    return {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": path}]}}


def _decide(tmp_path, path: str) -> State:
    st = State.open(GroupPaths(tmp_path / "st", "ns1", "grp1"))
    n = NetworkAttachment("sb1", NetworkSettings(conf_dir=str(tmp_path)), state=st, owner="sb1")
    with pytest.raises(NetworkSetupError, match="sandbox sb1") as e:
        n.decide(_cri_spec(path))
    assert st.records == [] and n.choice is None, "nothing recorded, nothing decided"
    return e.value


def _readable(path: str) -> bool:
    try:
        os.stat(path)
        return True
    except OSError:       # a sandboxed test host may hide init's namespaces even from root
        return False


@pytest.mark.parametrize("path", ["/proc/1/ns/net", "/proc/self/ns/net", "/proc/thread-self/ns/net"])
def test_the_hosts_netns_is_refused(tmp_path, path):
    err = str(_decide(tmp_path, path))
    assert path in err
    assert "the host's own" in err if _readable(path) else "Permission denied" in err


@pytest.mark.parametrize("target", ["/proc/1/ns/net", "/proc/self/ns/net"])
def test_a_symlink_to_the_hosts_netns_is_refused(tmp_path, target):
    link = tmp_path / "cni-1234"
    link.symlink_to(target)
    err = str(_decide(tmp_path, str(link)))
    assert "the host's own" in err if _readable(target) else "Permission denied" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mount needs root")
def test_a_bind_mount_of_the_hosts_netns_is_refused(tmp_path):
    f = tmp_path / "cni-5678"
    f.touch()
    mounts.mount_syscall("/proc/self/ns/net", str(f), mounts.MS_BIND)
    try:
        assert "the host's own" in str(_decide(tmp_path, str(f)))
        with pytest.raises(netns.NetnsError, match="host's own"):   # attach refuses it on its own too
            asyncio.run(HostNetworks().attach(str(f), "sb1"))
    finally:
        mounts.detach(str(f))


@pytest.mark.parametrize("what", ["file", "mntns", "missing"])
def test_what_is_not_a_network_namespace_is_refused(tmp_path, what):
    path = {"file": str(tmp_path / "plain"), "mntns": "/proc/self/ns/mnt", "missing": str(tmp_path / "gone")}[what]
    if what == "file":
        (tmp_path / "plain").write_text("")
    err = str(_decide(tmp_path, path))
    assert path in err and ("not a network namespace" in err or "No such file" in err)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a netns needs root")
def test_a_netns_of_its_own_is_accepted(tmp_path):
    run_dir = tmp_path / "netns"
    path = asyncio.run(netns.create("spinbox-test-own", str(run_dir)))
    try:
        netns.check_not_host(path)
    finally:
        netns.delete_sync(path)
        mounts.unmount_all(run_dir)      # create made the run dir a (shared) mount point
