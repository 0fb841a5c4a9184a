"""Guest network configuration: validation of what the host sends, and the files written."""
from __future__ import annotations

import pytest

from spinbox.api._pb.spinbox.agent.v1 import network_pb2 as npb
from spinbox.vminitd import network as gnet
from spinbox.vminitd.errors import InvalidArgument, NotFound


def req(**over):
    iface = npb.Interface(mac="0A:58:0a:01:00:05", name="eth0", mtu=1450,
                          addresses=["10.1.0.5/24", "fd00::5/64"],
                          routes=[npb.Route(dst="0.0.0.0/0", gateway="10.1.0.1"),
                                  npb.Route(dst="192.168.9.0/24"), npb.Route(dst="::/0", gateway="fd00::1", metric=5)])
    base = dict(interfaces=[iface], hostname="pod-a.example",
                dns=npb.DNS(nameservers=["10.1.0.10"], search=["svc.cluster.local"], options=["ndots:5"]),
                hosts=[npb.HostEntry(ip="10.1.0.7", names=["db"])])
    base.update(over)
    return npb.ConfigureRequest(**base)


def test_parse_valid_request():
    plan = gnet.parse_request(req())
    (i,) = plan.interfaces
    assert i.mac == "0a:58:0a:01:00:05" and i.name == "eth0" and i.mtu == 1450
    assert [str(a) for a in i.addresses] == ["10.1.0.5/24", "fd00::5/64"]
    assert [(str(r.dst), str(r.gateway) if r.gateway else "", r.metric) for r in i.routes] == [
        ("0.0.0.0/0", "10.1.0.1", 0), ("192.168.9.0/24", "", 0), ("::/0", "fd00::1", 5)]
    assert plan.link_timeout_s == gnet.DEFAULT_LINK_TIMEOUT_MS / 1000
    assert plan.has_dns


def iface(**over):
    d = dict(mac="02:00:00:00:00:01", addresses=["10.0.0.2/24"])
    d.update(over)
    return npb.Interface(**d)


@pytest.mark.parametrize("request_, needle", [
    (req(interfaces=[iface(mac="zz:00:00:00:00:01")]), "invalid MAC"),
    (req(interfaces=[iface(mac="01:00:5e:00:00:01")]), "invalid MAC"),            # multicast
    (req(interfaces=[iface(), iface()]), "given twice"),
    (req(interfaces=[iface(name="eth0; reboot")]), "invalid interface name"),
    (req(interfaces=[iface(name="lo")]), "invalid interface name"),
    (req(interfaces=[iface(mtu=20)]), "MTU 20 out of range"),
    (req(interfaces=[iface(addresses=["10.0.0.300/24"])]), "invalid address"),
    (req(interfaces=[iface(addresses=["10.0.0.3"])]), "no prefix length"),
    (req(interfaces=[iface(routes=[npb.Route(dst="nowhere")])]), "invalid route destination"),
    (req(interfaces=[iface(routes=[npb.Route(dst="0.0.0.0/0", gateway="fd00::1")])]), "address families differ"),
    (req(hostname="bad_host!"), "invalid hostname"),
    (req(dns=npb.DNS(nameservers=["dns.google"])), "invalid nameserver"),
    (req(dns=npb.DNS(search=["a b"])), "invalid search domain"),
    (req(dns=npb.DNS(options=["ndots:5\nnameserver 6.6.6.6"])), "invalid resolver option"),
    (req(hosts=[npb.HostEntry(ip="10.0.0.1")]), "has no names"),
    (req(hosts=[npb.HostEntry(ip="x", names=["a"])]), "invalid host entry address"),
    (req(interfaces=[iface(mac=f"02:00:00:00:00:{i:02x}") for i in range(17)]), "too many interfaces"),
    (req(link_timeout_ms=10**9), "link_timeout_ms"),
])
def test_parse_rejects(request_, needle):
    with pytest.raises(InvalidArgument, match=needle):
        gnet.parse_request(request_)


def test_render_files():
    plan = gnet.parse_request(req())
    assert gnet.render_resolv_conf(plan).splitlines()[1:] == [
        "search svc.cluster.local", "nameserver 10.1.0.10", "options ndots:5"]
    hosts = gnet.render_hosts(plan).splitlines()
    assert hosts[0] == "127.0.0.1\tlocalhost"
    assert "10.1.0.5\tpod-a.example pod-a" in hosts and "10.1.0.7\tdb" in hosts
    bare = gnet.parse_request(npb.ConfigureRequest(hostname="solo"))
    assert "127.0.1.1\tsolo" in gnet.render_hosts(bare) and not bare.has_dns


async def test_wait_for_links_names_missing_mac(tmp_path):
    (tmp_path / "eth0").mkdir()
    (tmp_path / "eth0" / "address").write_text("02:00:00:00:00:01\n")
    assert await gnet.wait_for_links(["02:00:00:00:00:01"], 0.01, str(tmp_path)) == {"02:00:00:00:00:01": "eth0"}
    with pytest.raises(NotFound, match="02:00:00:00:00:02.*present: 02:00:00:00:00:01"):
        await gnet.wait_for_links(["02:00:00:00:00:02"], 0.05, str(tmp_path))


def test_write_files_reports_what_containers_should_see(tmp_path):
    plan = gnet.parse_request(req())
    written = gnet.write_files(plan, str(tmp_path), set_hostname=False)
    assert written == {"/etc/resolv.conf": str(tmp_path / "resolv.conf"), "/etc/hosts": str(tmp_path / "hosts")}
    assert (tmp_path / "resolv.conf").read_text() == gnet.render_resolv_conf(plan)
    assert oct((tmp_path / "hosts").stat().st_mode & 0o777) == "0o644"
    # no DNS in the request: resolv.conf is neither written nor published
    other = tmp_path / "other"
    other.mkdir()
    bare = gnet.write_files(gnet.parse_request(npb.ConfigureRequest(hostname="solo")), str(other), set_hostname=False)
    assert bare == {"/etc/hosts": str(other / "hosts")} and not (other / "resolv.conf").exists()
    assert gnet.write_files(gnet.parse_request(npb.ConfigureRequest()), str(other), set_hostname=False) == {}


def test_service_publishes_into_the_agent(tmp_path):
    """What Configure writes reaches the bundles of later containers through the agent."""
    from spinbox.vminitd.agent import Agent
    from spinbox.vminitd.reaper import Reaper
    agent = Agent(tmp_path / "state", Reaper())
    svc = gnet.NetworkService(agent, etc_dir=str(tmp_path))
    assert agent.sandbox_files == {} and svc.published is agent.sandbox_files
    assert gnet.NetworkService().published == {}                 # no agent: its own, for tests
