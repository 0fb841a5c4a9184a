"""Which network a sandbox gets (shim/network/plan.py) and the state record's releaser guard."""
from __future__ import annotations

import json

import pytest

from spinbox.shim.network import cni, plan
from spinbox.shim.network.attachment import (NetworkAttachment, NetworkSettings, NetworkSetupError,
                                             release_network_record)

ANN = plan.ANNOTATION


NEW_NETNS = {"type": "network"}      # a new network namespace, as `ctr run` asks for


def spec(netns: dict | None = NEW_NETNS, **ann: str) -> dict:
    namespaces = [{"type": "pid"}, {"type": "mount"}] + ([netns] if netns is not None else [])
    return {"linux": {"namespaces": namespaces}, "annotations": dict(ann)}


def test_ctr_run_new_netns_means_the_shim_runs_cni():
    c = plan.choose(spec())
    assert (c.mode, c.network, c.required) == ("cni", "", False)


def test_cri_netns_path_means_existing():
    c = plan.choose(spec({"type": "network", "path": "/var/run/netns/cni-1234"}))
    assert (c.mode, c.netns_path) == ("existing", "/var/run/netns/cni-1234")


def test_relative_netns_path_is_refused():
    with pytest.raises(plan.PlanError, match="not an absolute path"):
        plan.choose(spec({"type": "network", "path": "netns/x"}))


def test_host_network_request_gets_the_sandbox_network_with_a_reason():
    c = plan.choose(spec(None))
    assert c.mode == "cni" and "host network" in c.reason


def test_disabled_in_config_wins_over_everything():
    assert plan.choose(spec({"type": "network", "path": "/run/netns/x"}), enabled=False).mode == "none"
    assert plan.choose(spec(**{ANN: "cni:foo"}), enabled=False).mode == "none"


@pytest.mark.parametrize("value,mode,network,required", [
    ("none", "none", "", False),
    ("cni", "cni", "", False),
    ("cni:mynet", "cni", "mynet", True),
    (" none ", "none", "", False),
])
def test_annotation(value, mode, network, required):
    c = plan.choose(spec(**{ANN: value}))
    assert (c.mode, c.network, c.required) == (mode, network, required)


def test_config_network_name_makes_it_required():
    c = plan.choose(spec(), network="corp")
    assert (c.network, c.required) == ("corp", True)


@pytest.mark.parametrize("value,match", [("bridge", "want none, cni"), ("cni:", "not a CNI network name"),
                                         ("cni:a/b", "not a CNI network name")])
def test_bad_annotation_names_the_annotation(value, match):
    with pytest.raises(plan.PlanError, match=match) as e:
        plan.choose(spec(**{ANN: value}))
    assert ANN in str(e.value)


def _conflist(name: str) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": name, "plugins": [{"type": "loopback"}]})


def test_resolve_without_any_config_falls_back_to_loopback(tmp_path):
    c, conf = plan.resolve(plan.choose(spec()), str(tmp_path / "missing"))
    assert c.mode == "none" and conf is None and "loopback only" in c.reason


def test_resolve_named_network_missing_is_an_error(tmp_path):
    with pytest.raises(cni.CNIConfigError, match="no CNI network config"):
        plan.resolve(plan.choose(spec(**{ANN: "cni:x"})), str(tmp_path))
    (tmp_path / "10-a.conflist").write_text(_conflist("a"))
    with pytest.raises(cni.CNIConfigError, match=r"no CNI network named .x. .*found: a"):
        plan.resolve(plan.choose(spec(**{ANN: "cni:x"})), str(tmp_path))


def test_resolve_loads_first_or_named(tmp_path):
    (tmp_path / "10-a.conflist").write_text(_conflist("a"))
    (tmp_path / "20-b.conflist").write_text(_conflist("b"))
    _, conf = plan.resolve(plan.choose(spec()), str(tmp_path))
    assert conf.name == "a"
    _, conf = plan.resolve(plan.choose(spec(**{ANN: "cni:b"})), str(tmp_path))
    assert conf.name == "b"


def test_decide_wraps_errors_with_the_sandbox_and_the_file(tmp_path):
    (tmp_path / "10-broken.conflist").write_text('{"cniVersion": ')
    n = NetworkAttachment("sb1", NetworkSettings(conf_dir=str(tmp_path)))
    with pytest.raises(NetworkSetupError, match=r"sandbox sb1.*10-broken.conflist"):
        n.decide(spec())


def test_decide_none_needs_nothing(tmp_path):
    n = NetworkAttachment("sb1", NetworkSettings(conf_dir=str(tmp_path)))
    assert n.decide(spec(**{ANN: "none"})).mode == "none"


async def test_release_record_without_a_netns_does_nothing():
    assert await release_network_record({"kind": "network", "key": "x"}) == "network: nothing recorded"


@pytest.mark.parametrize("name,want", [("web-1", "web-1"), ("a.b.c", "a.b.c"), ("under_score", ""),
                                       ("-x", ""), ("", ""), ("x" * 64, ""), (7, "")])
def test_guest_hostname_only_when_valid(name, want):
    assert plan.guest_hostname({"hostname": name}) == want


def test_the_network_is_recorded_before_the_vm_and_forgotten_on_release(tmp_path):
    """Cleanup runs newest first: the network record must be older than the VM's, so QEMU
    (holding the TAPs) goes first after a crash. A sandbox whose network was never prepared
    (the boot failed first) leaves no record behind."""
    import asyncio

    from spinbox.shim.state import GroupPaths, State

    st = State.open(GroupPaths(tmp_path / "st", "ns1", "grp1"))
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "10-a.conflist").write_text(_conflist("a"))
    n = NetworkAttachment("sb1", NetworkSettings(conf_dir=str(conf)), state=st, owner="sb1")
    n.decide(spec())
    st.record("vm", "/run/x/vm", owner="sb1", path="/run/x/vm")
    assert [r.kind for r in st.records] == ["network", "vm"]
    asyncio.run(n.release())
    assert [r.kind for r in st.records] == ["vm"]


def _attached(tmp_path):
    """An attachment whose host side is 'prepared': one plumbed interface (a pipe as TAP fd)."""
    import os

    from spinbox.shim.network.host import DNSConfig, HostNetwork
    from spinbox.shim.network.plumbing import InterfaceConfig, PlumbedInterface, Route

    r, w = os.pipe()
    os.close(w)
    cfg = InterfaceConfig("eth0", "AA:BB:CC:00:00:01", 1450, ["10.1.0.5/24"],
                          [Route("0.0.0.0/0", "10.1.0.1")])
    n = NetworkAttachment("sb1", NetworkSettings(conf_dir=str(tmp_path), configure_timeout_s=7.0))
    n.net = HostNetwork("sb1", "/run/netns/x", owns_netns=True, mode="cni",
                        interfaces=[PlumbedInterface(cfg, "tap0_sbx", r)], dns=DNSConfig(["1.1.1.1"]))
    return n, r


def test_the_plan_names_each_nic_and_the_guest_configuration(tmp_path):
    n, fd = _attached(tmp_path)
    p = n.plan("web-1")
    assert [(x.tap_fd, x.mac, x.tap_name, x.guest_name) for x in p.nics] == \
        [(fd, "AA:BB:CC:00:00:01", "tap0_sbx", "eth0")]
    assert p.request.hostname == "web-1" and p.request.link_timeout_ms == 7000
    assert [(i.mac, i.name, list(i.addresses)) for i in p.request.interfaces] == \
        [("AA:BB:CC:00:00:01", "eth0", ["10.1.0.5/24"])]
    assert list(p.request.dns.nameservers) == ["1.1.1.1"] and p.agent_timeout_s == 12.0
    n.close_tap_fds()
    assert n.net.interfaces[0].tap_fd == -1
    got = n.record_guest({"aa:bb:cc:00:00:01": "enp0s3"})
    assert [(i.name, i.gateway, i.tap) for i in got] == [("enp0s3", "10.1.0.1", "tap0_sbx")]
    assert n.interfaces == got


def test_without_a_network_the_plan_is_loopback_and_hostname():
    n = NetworkAttachment("sb1", NetworkSettings(configure_timeout_s=30.0))
    p = n.plan("h")
    assert p.nics == () and p.request.hostname == "h" and not p.request.interfaces
    assert p.agent_timeout_s == 35.0 and n.record_guest({}) == []


