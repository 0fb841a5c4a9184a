"""Sandbox networking against Debian's real CNI plugins (bridge + host-local + loopback), real
netns, TAP and tc mirred, and the guest-side configuration (rtnetlink) inside a netns.

Every test uses a private bridge (spbt-<random>), a private subnet, and a private host-local
dataDir, result cache and lock in a tmp dir; ipMasq is off (no iptables rules). The fixtures
delete bridges, netns and files in finally.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import sys

import pytest

from integration.fakeguest import FakeGuest
from spinbox.shim.network import cni, netns, plumbing, tap
from spinbox.shim.network.host import HostNetworks

pytestmark = pytest.mark.integration

CNI_BIN = "/usr/lib/cni"


def _missing() -> list[str]:
    why = []
    if os.geteuid() != 0:
        why.append("not root")
    for p in ("bridge", "host-local", "loopback"):
        if not os.access(os.path.join(CNI_BIN, p), os.X_OK):
            why.append(f"no CNI plugin {CNI_BIN}/{p}")
    if not os.path.exists("/dev/net/tun"):
        why.append("no /dev/net/tun")
    for tool in ("ip", "tc", "busybox"):
        if not shutil.which(tool):
            why.append(f"no {tool}")
    return why


@pytest.fixture(autouse=True)
def _prereqs():
    why = _missing()
    if why:
        msg = "network integration prerequisites missing: " + "; ".join(why)
        if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def sh(cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


class Env:
    def __init__(self, tmp_path) -> None:
        tag = secrets.token_hex(3)
        self.tag = tag
        self.bridge = f"spbt-{tag}"
        self.subnet = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        self.netname = f"spbt-net-{tag}"
        self.dir = tmp_path
        self.ipam_dir = tmp_path / "ipam"
        self.netns_names: list[str] = []

    def conflist(self, **bridge_over) -> dict:
        bridge = {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                  "hairpinMode": True,
                  "ipam": {"type": "host-local", "ranges": [[{"subnet": str(self.subnet)}]],
                           "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.ipam_dir)}}
        bridge.update(bridge_over)
        return {"cniVersion": "1.0.0", "name": self.netname, "plugins": [bridge, {"type": "loopback"}]}

    def manager(self, **kw) -> HostNetworks:
        return HostNetworks(conf_dir=str(self.dir / "net.d"), bin_dirs=[CNI_BIN],
                              cache_dir=str(self.dir / "cache"), lock_path=str(self.dir / "cni.lock"),
                              host_resolv_conf=None, **kw)

    def sandbox_id(self, n: int = 0) -> str:
        sid = f"spbt{self.tag}x{n}"
        self.netns_names.append(f"spinbox-{sid}")
        return sid

    def leases(self) -> list[str]:
        d = self.ipam_dir / self.netname
        if not d.exists():
            return []
        return [f for f in os.listdir(d) if _is_ip(f)]

    def bridge_ports(self) -> str:
        return sh(f"ip -o link show master {self.bridge}", check=False).strip()


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    try:
        yield e
    finally:
        for name in e.netns_names:
            netns.delete_sync(os.path.join(netns.NETNS_RUN_DIR, name))
        sh(f"ip link del {e.bridge}", check=False)


def netns_json(name: str, what: str) -> list:
    return json.loads(sh(f"ip -n {name} -j {what}") or "[]")


# ---------------------------------------------------------------------------------------------

async def test_add_plumb_traffic_check_del(env):
    mgr = env.manager()
    sid = env.sandbox_id()
    persisted = []
    net = await mgr.setup(sid, env.conflist(), persist=persisted.append)
    name = os.path.basename(net.netns_path)
    try:
        # CNI result: an IP of the subnet on eth0 in our netns; the netns really has it
        ips = net.cni_result["ips"]
        addr = ipaddress.ip_interface(ips[0]["address"])
        assert addr.ip in env.subnet and net.cni_result["cniVersion"] == "1.0.0"
        links = {link["ifname"]: link for link in netns_json(name, "addr show")}
        assert str(addr.ip) in [a["local"] for a in links["eth0"]["addr_info"]]
        assert env.leases() == [str(addr.ip)]
        assert persisted[-1]["taps"] == ["tap0_sbx"] and persisted[-1]["netns"] == net.netns_path

        # what the shim gets: one TAP fd as QEMU wants it, the CNI interface's MAC and config
        (p,) = net.interfaces
        d = p.describe()
        assert d["mac"] == links["eth0"]["address"] and d["addresses"] == [str(addr)]
        assert d["gateway"] == str(env.subnet[1]) and d["mtu"] == links["eth0"]["mtu"]
        assert {"dst": "0.0.0.0/0", "gateway": str(env.subnet[1]), "metric": 0} in d["routes"]
        tap_name, flags = tap.tap_flags(p.tap_fd)
        assert tap_name == "tap0_sbx"
        assert flags & (tap.IFF_TAP | tap.IFF_NO_PI | tap.IFF_VNET_HDR) == tap.IFF_TAP | tap.IFF_NO_PI | tap.IFF_VNET_HDR
        assert "Egress Redirect to device tap0_sbx" in sh(f"tc -n {name} filter show dev eth0 ingress")
        assert "Egress Redirect to device eth0" in sh(f"tc -n {name} filter show dev tap0_sbx ingress")
        req = net.guest_request(hostname="sb")
        assert req.interfaces[0].mac == d["mac"] and list(req.interfaces[0].addresses) == [str(addr)]

        # traffic crosses veth <-> TAP: the "guest" behind the fd answers ARP and ping
        with FakeGuest(p.tap_fd, str(addr.ip), d["mac"]) as guest:
            out = await asyncio.to_thread(sh, f"busybox ping -c 3 -W 2 {addr.ip}")
        assert "3 packets received" in out, out
        assert guest.stats["icmp_req"] >= 3 and guest.stats["arp_req"] >= 1
        assert d["mac"] in sh(f"ip neigh show {addr.ip}")

        await mgr.client.check(cni.parse_conflist(env.conflist()), cni.RuntimeConf(sid, net.netns_path))
    finally:
        await mgr.teardown(net)
    assert env.leases() == []
    assert name not in sh("ip netns list")
    assert env.bridge_ports() == ""              # the host side of the veth is gone
    assert p.tap_fd == -1
    assert not list((env.dir / "cache" / "results").iterdir())


async def test_crash_then_teardown_from_persisted_state(env):
    sid = env.sandbox_id()
    state = {}
    net = await env.manager().setup(sid, env.conflist(), persist=lambda s: state.update(s))
    net.close_fds()                              # the shim "dies": its fds go, nothing else
    assert len(env.leases()) == 1 and env.bridge_ports() != ""
    fresh = env.manager()                        # a new shim process (`shim delete`)
    await fresh.teardown(json.loads(json.dumps(state)))
    assert env.leases() == [] and env.bridge_ports() == ""
    assert not os.path.exists(net.netns_path)
    await fresh.teardown(state)                  # idempotent


async def test_cni_del_from_cache_in_fresh_client(env):
    name = f"spbt-{env.tag}-raw"
    env.netns_names.append(name)
    path = await netns.create(name)
    net = cni.parse_conflist(env.conflist())
    rt = cni.RuntimeConf(f"spbt{env.tag}raw", path)
    c1 = cni.CNIClient([CNI_BIN], env.dir / "cache", env.dir / "cni.lock")
    await c1.add(net, rt)
    assert len(env.leases()) == 1
    del c1
    c2 = cni.CNIClient([CNI_BIN], env.dir / "cache", env.dir / "cni.lock")
    assert await c2.delete_cached(net.name, rt.container_id, "eth0") is True
    assert env.leases() == [] and env.bridge_ports() == ""
    assert "eth0" not in sh(f"ip -n {name} -o link")


async def test_broken_configs_and_missing_plugin_leave_nothing(env):
    mgr = env.manager()
    confdir = env.dir / "net.d"
    confdir.mkdir()
    (confdir / "10-broken.conflist").write_text('{"cniVersion": "1.0.0", "name": "x", "plugins": [')
    sid = env.sandbox_id()
    with pytest.raises(cni.CNIConfigError, match="10-broken.conflist is not valid JSON"):
        await mgr.setup(sid)
    notype = env.conflist()
    del notype["plugins"][0]["type"]
    with pytest.raises(cni.CNIConfigError, match=r"plugins\[0\] has no 'type'"):
        await mgr.setup(sid, notype)
    missing = env.conflist()
    missing["plugins"].append({"type": "spbt-nosuch"})
    with pytest.raises(cni.PluginNotFound, match=f"'spbt-nosuch' not found in {CNI_BIN}"):
        await mgr.setup(sid, missing)
    for n in env.netns_names:
        assert not os.path.exists(os.path.join(netns.NETNS_RUN_DIR, n))
    assert sh(f"ip link show {env.bridge}", check=False) == ""          # no plugin ever ran
    assert not (env.dir / "cache" / "results").exists() or not list((env.dir / "cache" / "results").iterdir())


async def test_plugin_error_is_surfaced_and_rolled_back(env):
    mgr = env.manager()
    sid = env.sandbox_id()
    bad = env.conflist()
    bad["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "10.1.2.3/33"}]]
    with pytest.raises(cni.CNIError) as ei:
        await mgr.setup(sid, bad)
    e = ei.value
    assert e.plugin == "bridge" and e.command == "ADD" and e.cni_code is not None
    assert "10.1.2.3/33" in str(e) and e.msg and e.msg in str(e)       # the plugin's own message
    assert e.cleanup_errors and "invalid CIDR address: 10.1.2.3/33" in e.cleanup_errors[0]
    assert not os.path.exists(netns.path_of(f"spinbox-{sid}"))
    assert env.leases() == [] and env.bridge_ports() == ""
    assert not list((env.dir / "cache" / "results").iterdir())


async def test_cri_mode_attach_existing_netns(env):
    name = f"spbt-{env.tag}-pod"
    env.netns_names.append(name)
    path = await netns.create(name)
    net = cni.parse_conflist(env.conflist())
    rt = cni.RuntimeConf(f"spbt{env.tag}pod", path)
    client = cni.CNIClient([CNI_BIN], env.dir / "cache", env.dir / "cni.lock")
    result = await client.add(net, rt)            # what CRI did before calling us
    try:
        mgr = env.manager()
        sn = await mgr.attach(path, sandbox_id="pod")
        (p,) = sn.interfaces
        eth0 = next(i for i in result["interfaces"] if i["name"] == "eth0")
        assert p.config.mac == eth0["mac"] and p.config.addresses == [result["ips"][0]["address"]]
        assert p.config.gateway == result["ips"][0]["gateway"]
        assert "tap0_sbx" in sh(f"ip -n {name} -o link")
        await mgr.teardown(sn)
        assert netns.is_netns(path)                # CRI's netns stays
        assert "tap0_sbx" not in sh(f"ip -n {name} -o link")
        assert "ingress" not in sh(f"tc -n {name} qdisc show dev eth0")
        assert p.tap_fd == -1
        with pytest.raises(plumbing.PlumbingError, match="no Ethernet interface"):
            empty = f"spbt-{env.tag}-empty"
            env.netns_names.append(empty)
            await env.manager().attach(await netns.create(empty))
    finally:
        await client.delete(net, rt)
    assert env.leases() == []


# ---------------------------------------------------------------------------------------------
# guest side: vminitd's Network.Configure (rtnetlink, vminitd/netlink.py) run in a netns

GUEST_SCRIPT = r"""
import asyncio, json, sys
from google.protobuf import json_format
from spinbox.api._pb.spinbox.agent.v1 import network_pb2 as npb
from spinbox.vminitd.errors import AgentError
from spinbox.vminitd.network import NetworkService
req = json_format.Parse(sys.argv[1], npb.ConfigureRequest())
svc = NetworkService(etc_dir=sys.argv[2], set_hostname=False)
try:
    resp = asyncio.run(svc.Configure(req))
except AgentError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    sys.exit(1)
print(json.dumps({"response": json_format.MessageToDict(resp), "published": svc.published}))
"""


def guest_configure(ns: str, req, etc) -> tuple[int, dict]:
    """Run the guest's Configure in netns `ns` (`ip netns exec` also gives it that netns's /sys)."""
    from google.protobuf import json_format
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", GUEST_SCRIPT,
                        json_format.MessageToJson(req, indent=None), str(etc)], capture_output=True, text=True)
    assert r.stdout.strip(), f"no result (rc {r.returncode}): {r.stderr}"
    return r.returncode, json.loads(r.stdout)


@pytest.fixture
def guest_ns(env, tmp_path):
    name = f"spbt-{env.tag}-guest"
    env.netns_names.append(name)                      # the env fixture deletes it
    asyncio.run(netns.create(name))
    etc = tmp_path / "etc"
    etc.mkdir()
    return name, etc


def test_guest_configure_with_netlink(guest_ns):
    from spinbox.api._pb.spinbox.agent.v1 import network_pb2 as npb
    name, etc = guest_ns
    mac = "02:5b:00:00:00:07"
    # the "guest NIC": one end of a veth in the netns, named as the kernel would, with the MAC
    sh(f"ip -n {name} link add vguest0 address {mac} type veth peer name vother0")
    req = npb.ConfigureRequest(
        interfaces=[npb.Interface(mac=mac.upper(), name="eth0", mtu=1400,
                                  addresses=["10.77.0.5/24", "fd00:77::5/64"],
                                  routes=[npb.Route(dst="0.0.0.0/0", gateway="10.77.0.1"),
                                          npb.Route(dst="192.168.50.0/24", metric=7),
                                          npb.Route(dst="fd00:99::/64", gateway="fd00:77::1", metric=5)])],
        hostname="guest-a", dns=npb.DNS(nameservers=["10.77.0.10"], search=["example.test"]),
        hosts=[npb.HostEntry(ip="10.77.0.9", names=["peer"])], link_timeout_ms=2000)
    for attempt in range(2):                          # a retried Configure must succeed too
        if attempt:                                   # ... and drop a global address it did not ask for
            sh(f"ip -n {name} addr add 10.77.0.99/24 dev eth0")
        rc, out = guest_configure(name, req, etc)
        assert rc == 0, out
        assert out["response"]["interfaces"] == [{"mac": mac, "name": "eth0"}]
        assert out["published"] == {"/etc/resolv.conf": str(etc / "resolv.conf"), "/etc/hosts": str(etc / "hosts")}
        link = netns_json(name, "addr show dev eth0")[0]
        assert link["address"] == mac and link["mtu"] == 1400 and "UP" in link["flags"]
        addrs = sorted(f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a.get("scope") == "global")
        assert addrs == ["10.77.0.5/24", "fd00:77::5/64"]
        assert "UP" in netns_json(name, "link show dev lo")[0]["flags"]
        routes = {r["dst"]: r for r in netns_json(name, "-d route show table main")}
        assert routes["default"]["gateway"] == "10.77.0.1" and routes["default"]["dev"] == "eth0"
        assert (routes["default"]["protocol"], routes["default"]["scope"]) == ("boot", "global")
        assert routes["192.168.50.0/24"]["metric"] == 7 and routes["192.168.50.0/24"]["scope"] == "link"
        r6 = {r["dst"]: r for r in netns_json(name, "-6 route show")}
        assert r6["fd00:99::/64"]["gateway"] == "fd00:77::1" and r6["fd00:99::/64"]["metric"] == 5
        assert not any(link["ifname"].startswith("sbxtmp") for link in netns_json(name, "link show"))
    assert (etc / "resolv.conf").read_text().splitlines()[1:] == ["search example.test", "nameserver 10.77.0.10"]
    hosts = (etc / "hosts").read_text()
    assert "10.77.0.5\tguest-a" in hosts and "10.77.0.9\tpeer" in hosts

    # a MAC that never appears: a clear NotFound after the timeout
    bad = npb.ConfigureRequest(interfaces=[npb.Interface(mac="02:5b:00:00:00:99")], link_timeout_ms=100)
    rc, out = guest_configure(name, bad, etc)
    assert rc == 1 and out["error"] == "NotFound" and "no network interface with MAC 02:5b:00:00:00:99" in out["message"]


def test_guest_configure_swaps_names(guest_ns):
    """eth0↔eth1: each rename would clash with the other link's old name; parking avoids it."""
    from spinbox.api._pb.spinbox.agent.v1 import network_pb2 as npb
    name, etc = guest_ns
    a, b = "02:5b:00:00:00:0a", "02:5b:00:00:00:0b"
    sh(f"ip -n {name} link add eth0 address {b} type veth peer name eth1 address {a}")
    sh(f"ip -n {name} link add sbxtmp0 type veth peer name spare0")   # left over: parking must pick another name
    req = npb.ConfigureRequest(interfaces=[npb.Interface(mac=a, name="eth0", addresses=["10.78.0.2/24"]),
                                           npb.Interface(mac=b, name="eth1", addresses=["10.79.0.2/24"])])
    rc, out = guest_configure(name, req, etc)
    assert rc == 0, out
    assert out["response"]["interfaces"] == [{"mac": a, "name": "eth0"}, {"mac": b, "name": "eth1"}]
    links = {link["ifname"]: link for link in netns_json(name, "addr show")}
    assert links["eth0"]["address"] == a and links["eth1"]["address"] == b and "sbxtmp0" in links
    assert [x["local"] for x in links["eth0"]["addr_info"] if x["family"] == "inet"] == ["10.78.0.2"]
    assert "sbxtmp1" not in links


def test_guest_configure_errors(guest_ns):
    from spinbox.api._pb.spinbox.agent.v1 import network_pb2 as npb
    name, etc = guest_ns
    mac = "02:5b:00:00:00:0c"
    sh(f"ip -n {name} link add vguest0 address {mac} type veth peer name vother0")
    # the host's request is validated before anything is touched
    rc, out = guest_configure(name, npb.ConfigureRequest(interfaces=[npb.Interface(mac=mac, mtu=20)]), etc)
    assert rc == 1 and out["error"] == "InvalidArgument"
    assert out["message"] == "interfaces[0]: MTU 20 out of range 68..65535"
    assert netns_json(name, "link show dev vguest0")[0]["mtu"] != 20
    # the kernel refuses: a gateway on no connected subnet; the errno text and the step come back
    unreachable = npb.ConfigureRequest(interfaces=[npb.Interface(
        mac=mac, name="eth0", addresses=["10.80.0.2/24"], routes=[npb.Route(dst="0.0.0.0/0", gateway="10.99.0.1")])])
    rc, out = guest_configure(name, unreachable, etc)
    assert rc == 1 and out["error"] == "NetworkError"
    assert out["message"].startswith(
        f"replace route 0.0.0.0/0 via 10.99.0.1 dev eth0: {os.strerror(errno.ENETUNREACH)}"), out
    # a name another link has: the rename (after parking) fails, naming the MAC and the name
    sh(f"ip -n {name} link add eth1 type veth peer name vother1")
    clash = npb.ConfigureRequest(interfaces=[npb.Interface(mac=mac, name="eth1")])
    rc, out = guest_configure(name, clash, etc)
    assert rc == 1 and out["error"] == "NetworkError"
    assert f"(MAC {mac}) to eth1: {os.strerror(errno.EEXIST)}" in out["message"], out
