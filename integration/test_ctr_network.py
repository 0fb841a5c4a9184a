"""`ctr run` networking end to end: the REAL ctr against a private containerd 1.6, the shim
running Debian's CNI plugins (bridge + host-local + loopback) into a netns per sandbox, a TAP
with tc mirred redirects into the QEMU microVM (TCG), the guest configured by vminitd.

Private everything: a bridge `spbn-<random>`, a random 10.x.y.0/24, a host-local dataDir, a CNI
conf dir given to the shim through its config file (SPINBOX_CONFIG), ipMasq off (no iptables
rules). What is proven, one test each:
  * the container has the address CNI assigned (host-local's lease file names it) and pings the
    bridge gateway; the host pings it back;
  * a TCP server in the container is reachable from the host over the bridge, and a TCP server
    on the host (bound to the gateway address) from the container;
  * two sandboxes on one bridge reach each other; three set up at once get distinct addresses;
  * `io.containerd.spinbox.v1.network=none` gives loopback only;
  * a broken conflist, a missing plugin and a plugin error each fail the create with the
    plugin's (or parser's) message, and leave nothing behind;
  * a SIGKILLed shim (the shim's `delete` from persisted state) or a SIGKILLed QEMU: netns, TAP,
    veth and IP lease are still released;
  * CRI style: a pod netns CNI already configured (`--with-ns network:<path>`) is plumbed as it
    is, with no second ADD, and left as it was (no TAP, no tc filter) when the sandbox ends.
After the suite: no netns, TAP, veth or IPAM allocation of ours is left, no cached CNI result.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from integration.cninet import CNI_BIN, missing_for_vm_networking
from integration.cninet import TestNet as Net
from integration.containerd import Containerd, missing_prerequisites
from integration.images import import_busybox
from integration.test_ctr_run import (SHARE_DIR, SHIM_BIN_DIR, Env, kill_quietly, leftovers,
                                      uid, wait_until)

pytestmark = pytest.mark.integration

NET_ANNOTATION = "io.containerd.spinbox.v1.network"


def sh(*argv: str, check: bool = True, timeout: float = 30) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def our_netns() -> list[str]:
    return sorted(n for n in os.listdir("/run/netns") if n.startswith("spinbox-")) \
        if os.path.isdir("/run/netns") else []


def net_leftovers(env: Env, net: Net, ids: list[str]) -> list[str]:
    problems = list(leftovers(env))
    ns = [n for n in our_netns() if any(n == f"spinbox-{i}" for i in ids)]
    if ns:
        problems.append(f"netns: {ns}")
    if net.veths():
        problems.append(f"veths on {net.bridge}: {net.veths()}")
    if net.leases():
        problems.append(f"host-local leases: {net.leases()}")
    if net.cached_results():
        problems.append(f"cached CNI results: {net.cached_results()}")
    return problems


@pytest.fixture(scope="module")
def nenv():
    why = missing_prerequisites() + missing_for_vm_networking(SHARE_DIR)
    if why:
        msg = "network integration prerequisites missing: " + "; ".join(why)
        if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
            pytest.fail(msg)
        pytest.skip(msg)
    work = Path(tempfile.mkdtemp(prefix="sbx-net-", dir="/tmp"))
    net = Net(work)
    net.write("10-test.conflist", net.conflist())
    state_dir = work / "st"
    cfg = work / "config.json"
    cfg.write_text(json.dumps({"paths": {"state_dir": str(state_dir), "cni_conf_dir": str(net.conf_dir),
                                         "cni_bin_dirs": [str(CNI_BIN)]}}))
    c = Containerd.create(path_prefix=[SHIM_BIN_DIR], env={"SPINBOX_CONFIG": str(cfg)}, cri=False)
    e = Env(c, "", work, state_dir)
    e.net = net
    e.ids = []
    problems: list[str] = []
    try:
        e.ref = import_busybox(c)
        yield e
        try:
            wait_until(lambda: not net_leftovers(e, net, e.ids), 30, "the runtime to release everything")
        except AssertionError:
            problems.extend(net_leftovers(e, net, e.ids))
    finally:
        log_tail = c.log_tail(80) if problems else ""
        c.cleanup()
        net.remove_bridge()
        shutil.rmtree(work, ignore_errors=True)
    assert not problems, "left behind after the network suite:\n  " + "\n  ".join(problems) + \
        "\ncontainerd log tail:\n" + log_tail


def start(env, id: str, *cmd: str, annotations: dict[str, str] | None = None) -> None:
    env.ids.append(id)
    extra = [a for k, v in (annotations or {}).items() for a in ("--annotation", f"{k}={v}")]
    env.ctr("run", "--runtime", "io.containerd.spinbox.v1", "--fifo-dir", str(env.c.fifo_dir), "-d",
            *extra, env.ref, id, *cmd)
    env.wait_status(id, "RUNNING")


def exec_(env, id: str, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return env.ctr("task", "exec", "--exec-id", f"x{secrets.token_hex(3)}", id, *cmd,
                   check=check, timeout=timeout)


def stop(env, id: str) -> None:
    kill_quietly(env, id)


def container_ipv4(env, id: str, dev: str = "eth0") -> str:
    out = exec_(env, id, "ip", "-o", "-4", "addr", "show", "dev", dev).stdout.decode()
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", out)
    assert m, f"no IPv4 address on {dev} in the container: {out!r}"
    return m.group(1)


# ---------------------------------------------------------------------------------------------

def test_container_has_the_cni_address_and_pings_the_gateway(nenv):
    net = nenv.net
    id = uid("net")
    start(nenv, id, "sleep", "600")
    try:
        ip = container_ipv4(nenv, id)
        assert ipaddress.ip_address(ip) in net.subnet
        assert net.leases() == [ip], "the container's address is the one host-local leased"
        routes = exec_(nenv, id, "ip", "route").stdout.decode()
        assert f"default via {net.gateway} dev eth0" in routes, routes
        r = exec_(nenv, id, "ping", "-c", "3", "-W", "2", net.gateway, check=False)
        assert r.returncode == 0 and b"3 packets received" in r.stdout, r.stdout + r.stderr
        # DNS from the CNI result, bound read-only into the container by vminitd
        resolv = exec_(nenv, id, "cat", "/etc/resolv.conf").stdout.decode()
        assert f"nameserver {net.nameserver}" in resolv and "search sbx.test" in resolv, resolv
        r = exec_(nenv, id, "sh", "-c", "echo x >> /etc/resolv.conf", check=False)
        assert r.returncode != 0, "resolv.conf is read-only in the container"
        hosts = exec_(nenv, id, "cat", "/etc/hosts").stdout.decode()
        assert "localhost" in hosts, hosts
        # the host (on the bridge) reaches the guest too
        out = sh("busybox", "ping", "-c", "2", "-W", "2", ip, check=False)
        assert "2 packets received" in out, out
        # the sandbox netns on the host holds the CNI interface and our TAP, nothing else
        links = json.loads(sh("ip", "-n", f"spinbox-{id}", "-j", "link"))
        kinds = sorted(link["ifname"] for link in links)
        assert "eth0" in kinds and any(k.startswith("tap") and k.endswith("_sbx") for k in kinds), kinds
    finally:
        stop(nenv, id)
    wait_until(lambda: not net.leases() and f"spinbox-{id}" not in our_netns(), 30,
               lambda: f"lease and netns of {id} released (leases {net.leases()}, netns {our_netns()})")


def test_tcp_host_to_container_and_back(nenv):
    net = nenv.net
    id = uid("tcp")
    token = secrets.token_hex(8)
    # a TCP server in the container: busybox httpd serving one file
    start(nenv, id, "sh", "-c", f"mkdir -p /www && echo {token} > /www/t && httpd -f -p 8080 -h /www")
    srv = None
    try:
        ip = container_ipv4(nenv, id)
        body = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:          # httpd may still be starting
            try:
                with socket.create_connection((ip, 8080), timeout=5) as s:
                    s.sendall(b"GET /t HTTP/1.0\r\n\r\n")
                    body = b"".join(iter(lambda: s.recv(65536), b""))
                break
            except OSError:
                time.sleep(0.3)
        assert body.endswith(f"{token}\n".encode()), body[-200:]

        # and the reverse: a server on the host, on the bridge's gateway address
        back = secrets.token_hex(8).encode()
        srv = socket.create_server((net.gateway, 0))
        port = srv.getsockname()[1]

        def serve():
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(back), back))
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        r = exec_(nenv, id, "wget", "-q", "-O", "-", f"http://{net.gateway}:{port}/x", check=False)
        assert r.stdout == back, (r.returncode, r.stdout, r.stderr)
        t.join(10)
    finally:
        if srv is not None:
            srv.close()
        stop(nenv, id)


def test_two_sandboxes_on_one_bridge_reach_each_other(nenv):
    a, b = uid("pa"), uid("pb")
    token = secrets.token_hex(8)
    start(nenv, a, "sh", "-c", f"mkdir -p /www && echo {token} > /www/t && httpd -f -p 8081 -h /www")
    try:
        start(nenv, b, "sleep", "600")
        try:
            ip_a, ip_b = container_ipv4(nenv, a), container_ipv4(nenv, b)
            assert ip_a != ip_b
            assert sorted(nenv.net.leases()) == sorted([ip_a, ip_b])
            r = exec_(nenv, b, "ping", "-c", "2", "-W", "2", ip_a, check=False)
            assert b"2 packets received" in r.stdout, r.stdout + r.stderr
            r = exec_(nenv, b, "wget", "-q", "-O", "-", f"http://{ip_a}:8081/t", check=False)
            assert r.stdout == f"{token}\n".encode(), (r.returncode, r.stdout, r.stderr)
        finally:
            stop(nenv, b)
    finally:
        stop(nenv, a)


def test_network_none_annotation_gives_loopback_only(nenv):
    id = uid("lo")
    r = nenv.ctr("run", "--runtime", "io.containerd.spinbox.v1", "--fifo-dir", str(nenv.c.fifo_dir), "--rm",
                 "--annotation", f"{NET_ANNOTATION}=none", nenv.ref, id,
                 "sh", "-c", "ls /sys/class/net; ip -o -4 addr", check=False)
    nenv.ids.append(id)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["lo"], r.stdout
    assert "127.0.0.1/8" in lines[1] and len(lines) == 2, r.stdout
    assert f"spinbox-{id}" not in our_netns()


def _failed_create(env, id: str, annotation: str) -> subprocess.CompletedProcess:
    env.ids.append(id)
    r = env.ctr("run", "--runtime", "io.containerd.spinbox.v1", "--fifo-dir", str(env.c.fifo_dir), "--rm",
                "--annotation", f"{NET_ANNOTATION}={annotation}", env.ref, id, "true", check=False)
    assert r.returncode != 0, "the create must fail"
    env.ctr("containers", "delete", id, check=False)
    return r


@pytest.mark.parametrize("case", ["broken-json", "missing-plugin", "plugin-error"])
def test_a_bad_network_fails_the_create_with_its_message_and_leaves_nothing(nenv, case):
    net = nenv.net
    name = f"{net.name}-{case}"
    if case == "broken-json":
        net.write(f"20-{case}.conflist", '{"cniVersion": "1.0.0", "name": "' + name + '", "plugins": [')
        want = "20-broken-json.conflist"
    elif case == "missing-plugin":
        doc = net.conflist(name)
        doc["plugins"].append({"type": "no-such-plugin-xyz"})
        net.write(f"20-{case}.conflist", doc)
        want = "no-such-plugin-xyz"
    else:  # the bridge plugin refuses an ipam subnet that is not a CIDR: its own message
        doc = net.conflist(name, ipam={"type": "host-local", "ranges": [[{"subnet": "10.300.0.0/24"}]],
                                       "dataDir": str(net.ipam_dir)})
        net.write(f"20-{case}.conflist", doc)
        want = "10.300.0.0/24"
    id = uid("bad")
    try:
        r = _failed_create(nenv, id, f"cni:{name}")
        err = r.stderr.decode()
        assert want in err, err
        if case == "plugin-error":
            assert "invalid CIDR address" in err, err       # host-local's own words
        wait_until(lambda: not net_leftovers(nenv, net, [id]), 30,
                   lambda: f"nothing left after the failed create: {net_leftovers(nenv, net, [id])}")
    finally:
        for f in net.conf_dir.glob("20-*"):
            f.unlink()


def test_named_network_missing_fails_clearly(nenv):
    id = uid("nonet")
    r = _failed_create(nenv, id, "cni:no-such-network")
    assert "no-such-network" in r.stderr.decode(), r.stderr


@pytest.mark.parametrize("victim", ["shim", "qemu"])
def test_a_killed_shim_or_qemu_still_releases_the_network(nenv, victim):
    """SIGKILL of the shim daemon: containerd runs the shim's `delete`, which releases the
    network from the persisted state. SIGKILL of QEMU: the live shim tears the sandbox down."""
    net = nenv.net
    id = uid(f"kill-{victim}")
    start(nenv, id, "sleep", "600")
    try:
        ip = container_ipv4(nenv, id)
        assert ip in net.leases()
        pids = nenv.shim_pids(id) if victim == "shim" else nenv.qemu_pids(id)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: nenv.tasks().get(id) in (None, "STOPPED"), 60, "the task to stop")
    finally:
        stop(nenv, id)
    wait_until(lambda: not net_leftovers(nenv, net, [id]), 60,
               lambda: f"network of {id} released after the {victim} died: {net_leftovers(nenv, net, [id])}")


def test_cri_style_existing_netns_is_plumbed_without_running_cni_again(nenv):
    """What CRI does before the shim is asked: a pod netns, CNI ADD into it; the spec names the
    netns path (`ctr run --with-ns network:<path>` writes exactly that into the spec)."""
    from spinbox.shim.network import cni

    net = nenv.net
    tag = secrets.token_hex(3)
    ns_name, cid = f"sbx-cri-{tag}", f"cri-{tag}"
    ns_path = f"/run/netns/{ns_name}"
    client = cni.CNIClient(bin_dirs=[str(CNI_BIN)], cache_dir=str(nenv.work / "cri-cache"),
                           lock_path=str(nenv.work / "cri.lock"))
    conf = cni.parse_conflist(net.conflist())
    rt = cni.RuntimeConf(cid, ns_path, "eth0")
    sh("ip", "netns", "add", ns_name)
    id = uid("cri")
    try:
        result = asyncio.run(client.add(conf, rt))
        cri_ip = result["ips"][0]["address"].split("/")[0]
        assert net.leases() == [cri_ip]
        nenv.ids.append(id)
        nenv.ctr("run", "--runtime", "io.containerd.spinbox.v1", "--fifo-dir", str(nenv.c.fifo_dir), "-d",
                 "--with-ns", f"network:{ns_path}", nenv.ref, id, "sleep", "600")
        nenv.wait_status(id, "RUNNING")
        try:
            assert container_ipv4(nenv, id) == cri_ip, "the guest got the pod netns' address"
            assert net.leases() == [cri_ip], "no second CNI ADD"
            assert f"spinbox-{id}" not in our_netns(), "no netns of our own"
            r = exec_(nenv, id, "ping", "-c", "2", "-W", "2", net.gateway, check=False)
            assert b"2 packets received" in r.stdout, r.stdout + r.stderr
        finally:
            stop(nenv, id)

        def pod_netns_restored() -> bool:
            names = [link["ifname"] for link in json.loads(sh("ip", "-n", ns_name, "-j", "link"))]
            qdiscs = sh("tc", "-n", ns_name, "qdisc", "show", "dev", "eth0")
            return not any(n.startswith("tap") for n in names) and "ingress" not in qdiscs
        wait_until(pod_netns_restored, 30, "the pod netns to lose our TAP and tc redirect")
        # the pod's own network is CRI's: still there, untouched
        assert f"inet {cri_ip}/" in sh("ip", "-n", ns_name, "-4", "addr", "show", "dev", "eth0")
        assert net.leases() == [cri_ip]
    finally:
        try:
            asyncio.run(client.delete(conf, rt))
        finally:
            sh("ip", "netns", "del", ns_name, check=False)
    assert net.leases() == []


def test_the_hosts_own_netns_is_refused_and_nothing_is_touched(nenv):
    """A spec naming the host's network namespace (here the shim's own, /proc/self/ns/net as
    the shim reads it) would hand every host NIC to the VM: refused before anything is made."""
    links_before = sorted(link["ifname"] for link in json.loads(sh("ip", "-j", "link")))
    id = uid("hostns")
    r = nenv.ctr("run", "--runtime", "io.containerd.spinbox.v1", "--fifo-dir", str(nenv.c.fifo_dir),
                 "--with-ns", "network:/proc/self/ns/net", nenv.ref, id, "true", check=False)
    nenv.ctr("containers", "delete", id, check=False)
    assert r.returncode != 0
    assert "/proc/self/ns/net" in r.stderr.decode() and "the host's own" in r.stderr.decode(), r.stderr
    assert sorted(link["ifname"] for link in json.loads(sh("ip", "-j", "link"))) == links_before


def test_three_sandboxes_set_up_at_once_get_distinct_addresses(nenv):
    """Concurrent creates: CNI runs under the host-wide lock, host-local hands out distinct
    addresses, every guest reaches the gateway, and all of it is released."""
    import concurrent.futures

    net = nenv.net
    ids = [uid(f"par{i}") for i in range(3)]
    nenv.ids.extend(ids)

    def one(id: str) -> subprocess.CompletedProcess:
        return nenv.ctr("run", "--runtime", "io.containerd.spinbox.v1", "--fifo-dir", str(nenv.c.fifo_dir),
                        "--rm", nenv.ref, id, "sh", "-c",
                        f"ip -o -4 addr show dev eth0; ping -c 1 -W 5 {net.gateway} >/dev/null && echo gw-ok",
                        check=False)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, ids))
    addrs = []
    for id, r in zip(ids, results):
        out = r.stdout.decode()
        assert r.returncode == 0 and "gw-ok" in out, (id, r.returncode, out, r.stderr)
        addrs.append(re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out).group(1))
    assert len(set(addrs)) == 3 and all(ipaddress.ip_address(a) in net.subnet for a in addrs), addrs
    wait_until(lambda: not net_leftovers(nenv, net, ids), 60,
               lambda: f"all three released: {net_leftovers(nenv, net, ids)}")
