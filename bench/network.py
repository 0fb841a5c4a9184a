"""Benchmark section "network": host↔container ping latency and TCP throughput, spinbox beside
runc, same private containerd, same private bridge, same run.

The network is ours alone: a bridge `spbb-<random>`, a random free 10.x.y.0/24, host-local
with a private dataDir, ipMasq off (no iptables rules), one conflist in a private conf dir.

* spinbox: `ctr run --runtime io.containerd.spinbox.v1`; the shim (its config file, given
  through SPINBOX_CONFIG, points `paths.cni_conf_dir` at our conf dir) runs CNI itself and wires
  the netns' veth to the VM's TAP with tc mirred (virtio-net, vhost off).
* runc: ctr has no CNI without `--cni` (fixed paths), so we do what CRI would: a named netns,
  CNI ADD into it with the same conflist through our own client, then
  `ctr run --runtime io.containerd.runc.v2 --with-ns network:/run/netns/<name>`; CNI DEL after.

Measured per runtime, one container at a time (an idle TCG guest still burns host CPU, which
would slow runc's numbers down):
* ping host → container (`busybox ping`, the host has no other ping) and container → gateway
  (`ctr task exec ... ping`): min / avg / max rtt;
* TCP host → container: the container's `nc -l -e dd of=/dev/null` reads; the host sends,
  shuts its write half and waits for EOF (dd exits only after it has read everything):
  connect → EOF;
* TCP container → host: `nc <gateway> <port> -e dd if=/dev/zero` in an exec, the host reads
  what arrives on the gateway address: accept → EOF.
Transfer sizes follow a probe transfer so that each timed one takes about TARGET_S seconds.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CNI_BIN = "/usr/lib/cni"
RUNTIMES = {"spinbox": "io.containerd.spinbox.v1", "runc": "io.containerd.runc.v2"}
REPEATS = 3
PING_COUNT = 20
PING_INTERVAL = "0.2"
PORT = 5001
MiB = 1 << 20
PROBE_MIB = 8
TARGET_S = 3.0
MIN_MIB, MAX_MIB = 16, 4096
IO_TIMEOUT = 180.0
# The container's ends are busybox nc with `-e dd`: dd then reads or writes the socket itself in
# 64 KiB blocks (nc's own copy loop moves 1 KiB per syscall, which under TCG measures the
# guest's syscall cost, not the network). The receiver is a new `nc -l` after every connection;
# dd exits at EOF, which closes the socket, so the host's EOF means "all read".
LISTENER = f"while :; do nc -l -p {PORT} -e dd of=/dev/null bs=64k 2>/dev/null; done"
RTT_RE = re.compile(r"min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")
RECEIVED_RE = re.compile(r"(\d+) packets transmitted, (\d+) packets received")


def _sh(*argv: str, check: bool = True, timeout: float = 60) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no address or route on the host overlaps."""
    used = []
    for line in _sh("ip", "-4", "-o", "addr").splitlines() + _sh("ip", "-4", "route").splitlines():
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(100, 199)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 found for the benchmark bridge")


def _other_qemus(mine: Path) -> int:
    """QEMU processes not started by this benchmark: they share the host's CPUs with ours."""
    n = 0
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes() if entry.isdigit() else b""
        except OSError:
            continue
        if os.path.basename(argv.split(b"\0")[0]).startswith(b"qemu-system") and str(mine).encode() not in argv:
            n += 1
    return n


def _ping_stats(out: str, what: str) -> tuple[float, float, float]:
    sent_recv = RECEIVED_RE.search(out)
    rtt = RTT_RE.search(out)
    if not sent_recv or not rtt or sent_recv.group(1) != sent_recv.group(2):
        raise RuntimeError(f"{what}: lost packets or no statistics: {out[-500:]!r}")
    return tuple(float(x) for x in rtt.groups())  # type: ignore[return-value]


class NetBench:
    """Private containerd + bridge + conf dir; every resource is released by close()."""

    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT))
        from integration.containerd import Containerd, missing_prerequisites
        from integration.images import import_busybox

        why = missing_prerequisites()
        for tool in ("ip", "busybox", "runc"):
            if shutil.which(tool) is None:
                why.append(f"`{tool}` not found")
        for plugin in ("bridge", "host-local", "loopback"):
            if not os.access(f"{CNI_BIN}/{plugin}", os.X_OK):
                why.append(f"no CNI plugin {CNI_BIN}/{plugin}")
        share = Path(os.environ.get("SPINBOX_SHARE_DIR", "/usr/share/spinbox"))
        if not (share / "image.json").exists():
            why.append(f"no guest image in {share}")
        if why:
            raise RuntimeError("cannot run: " + "; ".join(why))

        tag = secrets.token_hex(3)
        self.bridge = f"spbb-{tag}"
        self.netname = f"spbb-net-{tag}"
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.work = Path(tempfile.mkdtemp(prefix="sbx-bnet-", dir="/tmp"))
        self.state_dir = self.work / "st"
        self.conf_dir = self.work / "cni-conf"
        self.conf_dir.mkdir()
        self.conflist = {
            "cniVersion": "1.0.0", "name": self.netname,
            "plugins": [{"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": str(self.subnet)}]],
                                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.work / "ipam")}},
                        {"type": "loopback"}]}
        (self.conf_dir / "10-bench.conflist").write_text(json.dumps(self.conflist))
        cfg = self.work / "config.json"
        cfg.write_text(json.dumps({"paths": {"state_dir": str(self.state_dir),
                                             "cni_conf_dir": str(self.conf_dir),
                                             "cni_bin_dirs": [CNI_BIN]}}))
        self.containers: list[str] = []                       # to stop
        self.started: list[str] = []                          # ever started (leftover check)
        self.netns: list[tuple[str, object, object]] = []     # (name, conflist, RuntimeConf)
        self.cni = None
        self.c = None
        try:
            self.c = Containerd.create(path_prefix=[Path(sys.executable).parent],
                                       namespace="spinbox-bench-net", cri=False,
                                       env={"SPINBOX_CONFIG": str(cfg)})
            self.ref = import_busybox(self.c)
        except BaseException:
            self.close()
            raise

    # -- ctr ------------------------------------------------------------------------------

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.c.ctr(*args, check=check, timeout=timeout)

    def tasks(self) -> dict[str, str]:
        out = self.ctr("task", "ls").stdout.decode()
        return {r[0]: r[-1] for r in (line.split() for line in out.splitlines()[1:]) if r}

    def wait_running(self, id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.tasks().get(id) != "RUNNING":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{id} not RUNNING after {timeout:.0f}s: {self.tasks()}")
            time.sleep(0.2)

    def exec(self, id: str, *cmd: str, timeout: float = 300) -> str:
        return self.ctr("task", "exec", "--exec-id", f"x{secrets.token_hex(3)}", id, *cmd,
                        timeout=timeout).stdout.decode()

    def container_ipv4(self, id: str) -> str:
        out = self.exec(id, "ip", "-o", "-4", "addr", "show", "dev", "eth0")
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
        if not m or ipaddress.ip_address(m.group(1)) not in self.subnet:
            raise RuntimeError(f"{id}: no address of {self.subnet} on eth0: {out!r}")
        return m.group(1)

    # -- containers -----------------------------------------------------------------------

    def start(self, runtime: str) -> tuple[str, str]:
        """Start the listener container on `runtime`; return (id, its IPv4 address)."""
        id = f"bn-{runtime}-{secrets.token_hex(3)}"
        self.containers.append(id)
        self.started.append(id)
        extra: list[str] = []
        if runtime == "runc":
            extra = ["--with-ns", f"network:{self._runc_netns(id)}"]
        try:
            self.ctr("run", "-d", "--runtime", RUNTIMES[runtime], "--fifo-dir", str(self.c.fifo_dir),
                     *extra, self.ref, id, "sh", "-c", LISTENER)
            self.wait_running(id)
        except Exception:
            print(f"bench network: {runtime} container failed to start; containerd log tail "
                  f"({self.c.log_path}):\n{self.c.log_tail(60)}", file=sys.stderr)
            raise
        return id, self.container_ipv4(id)

    def _runc_netns(self, id: str) -> str:
        """What CRI does for a pod: a named netns and CNI ADD into it (our client, our conflist)."""
        from spinbox.shim.network import cni

        if self.cni is None:
            self.cni = cni.CNIClient(bin_dirs=[CNI_BIN], cache_dir=str(self.work / "cni-cache"),
                                     lock_path=str(self.work / "cni.lock"))
        name = f"spbb-{id}"
        path = f"/run/netns/{name}"
        conf = cni.parse_conflist(self.conflist)
        rt = cni.RuntimeConf(id, path, "eth0")
        _sh("ip", "netns", "add", name)
        self.netns.append((name, conf, rt))
        asyncio.run(self.cni.add(conf, rt))
        return path

    def stop(self, id: str) -> None:
        self.ctr("task", "kill", "-s", "SIGKILL", id, check=False)
        deadline = time.monotonic() + 60
        while self.tasks().get(id) == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.2)
        self.ctr("task", "delete", id, check=False)
        self.ctr("containers", "delete", id, check=False)
        if id in self.containers:
            self.containers.remove(id)

    # -- measurements ---------------------------------------------------------------------

    def ping_to(self, ip: str) -> tuple[float, float, float]:
        out = _sh("busybox", "ping", "-c", str(PING_COUNT), "-i", PING_INTERVAL, "-W", "2", ip,
                  check=False, timeout=120)
        return _ping_stats(out, f"host → {ip}")

    def ping_from(self, id: str) -> tuple[float, float, float]:
        r = self.ctr("task", "exec", "--exec-id", f"p{secrets.token_hex(3)}", id, "ping",
                     "-c", str(PING_COUNT), "-i", PING_INTERVAL, "-W", "2", self.gateway,
                     check=False, timeout=120)
        return _ping_stats(r.stdout.decode(), f"{id} → {self.gateway}")

    def send_to(self, ip: str, mib: int) -> float:
        """Seconds from connect to the receiver's EOF for `mib` MiB host → container."""
        chunk = memoryview(bytes(MiB))
        deadline = time.monotonic() + 60
        while True:                          # the previous nc may not listen again yet
            t0 = time.monotonic()
            try:
                s = socket.create_connection((ip, PORT), timeout=IO_TIMEOUT)
                break
            except (ConnectionRefusedError, socket.timeout):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with s:
            for _ in range(mib):
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
            if s.recv(1):                    # dd of=/dev/null writes nothing to the socket
                raise RuntimeError("the container's receiver sent data")
        return time.monotonic() - t0

    def receive_from(self, id: str, mib: int) -> float:
        """Seconds from accept to EOF for `mib` MiB container → host (gateway address)."""
        with socket.create_server((self.gateway, 0)) as srv:
            srv.settimeout(IO_TIMEOUT)
            port = srv.getsockname()[1]
            p = self.c.ctr_popen("task", "exec", "--exec-id", f"s{secrets.token_hex(3)}", id, "sh", "-c",
                                 f"nc {self.gateway} {port} -e dd if=/dev/zero bs=64k count={mib * 16}"
                                 " 2>/dev/null",
                                 stdin=subprocess.DEVNULL)
            try:
                conn, _ = srv.accept()
                t0 = time.monotonic()
                with conn:
                    conn.settimeout(IO_TIMEOUT)
                    buf = bytearray(MiB)
                    n = 0
                    while (k := conn.recv_into(buf)):
                        n += k
                    elapsed = time.monotonic() - t0
                out, err = p.communicate(timeout=IO_TIMEOUT)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if p.returncode != 0 or n != mib * MiB:
            raise RuntimeError(f"container → host: exec exit {p.returncode}, {n} of {mib * MiB} bytes, "
                               f"{err.decode(errors='replace')[-300:]}")
        return elapsed

    def throughput(self, transfer) -> dict:
        """A probe sizes the runs (~TARGET_S each); then REPEATS timed runs in MB/s."""
        rate = PROBE_MIB / transfer(PROBE_MIB)                              # MiB/s
        mib = max(MIN_MIB, min(MAX_MIB, int(rate * TARGET_S)))
        rates = [mib * MiB / transfer(mib) / 1e6 for _ in range(REPEATS)]
        return {"mib": mib, "mbps": rates}

    def measure(self, runtime: str) -> dict:
        id, ip = self.start(runtime)
        try:
            return {"ping_in": self.ping_to(ip), "ping_out": self.ping_from(id),
                    "h2c": self.throughput(lambda mib: self.send_to(ip, mib)),
                    "c2h": self.throughput(lambda mib: self.receive_from(id, mib))}
        finally:
            self.stop(id)

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Release everything, each step even when an earlier one failed; then check."""
        errors: list[str] = []

        def step(what: str, fn, *args) -> None:
            try:
                fn(*args)
            except Exception as e:           # keep going: the other resources must go too
                errors.append(f"{what}: {e}")

        for id in list(self.containers):
            step(f"stop {id}", self.stop, id)
        for name, conf, rt in self.netns:
            step(f"CNI DEL {name}", lambda conf=conf, rt=rt: asyncio.run(self.cni.delete(conf, rt)))
            step(f"netns del {name}", _sh, "ip", "netns", "del", name)
        self.netns = []
        if self.c is not None:
            step("containerd cleanup", self.c.cleanup)
        if os.path.exists(f"/sys/class/net/{self.bridge}"):
            step(f"bridge del {self.bridge}", _sh, "ip", "link", "del", self.bridge)
        shutil.rmtree(self.work, ignore_errors=True)
        errors += self.leftovers()
        if errors:
            raise RuntimeError("network bench teardown: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        found = []
        ours = {f"spbb-{i}" for i in self.started} | {f"spinbox-{i}" for i in self.started}
        ns = [n for n in _sh("ip", "netns", "list", check=False).split() if n in ours]
        if ns:
            found.append(f"netns left: {ns}")
        if os.path.exists(f"/sys/class/net/{self.bridge}"):
            found.append(f"bridge left: {self.bridge}")
        mark = str(self.work).encode()
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and mark in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(f"process left: {entry}")
            except OSError:
                continue
        if self.work.exists():
            found.append(f"dir left: {self.work}")
        return found


def _ms(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.2f} / {t[1]:.2f} / {t[2]:.2f} ms"


def _mbps(r: dict) -> str:
    v = r["mbps"]
    return f"{statistics.median(v):.1f} MB/s ({min(v):.1f}–{max(v):.1f}), {r['mib']} MiB"


def section_network():
    t0 = time.monotonic()
    b = NetBench()
    try:
        busy = _other_qemus(b.work)
        res = {}
        for rt in RUNTIMES:
            res[rt] = b.measure(rt)
            busy = max(busy, _other_qemus(b.work))
    finally:
        b.close()
    wall = time.monotonic() - t0
    s, r = res["spinbox"], res["runc"]
    med = lambda x: statistics.median(x["mbps"])  # noqa: E731
    rows = [
        "| measure | spinbox | runc | spinbox / runc |", "|---|---|---|---|",
        f"| ping host → container, min / avg / max rtt of {PING_COUNT} | {_ms(s['ping_in'])} | "
        f"{_ms(r['ping_in'])} | {s['ping_in'][1] / r['ping_in'][1]:.1f}× |",
        f"| ping container → gateway (exec), min / avg / max rtt of {PING_COUNT} | {_ms(s['ping_out'])} | "
        f"{_ms(r['ping_out'])} | {s['ping_out'][1] / r['ping_out'][1]:.1f}× |",
        f"| TCP host → container (container: `nc -l -e dd of=/dev/null`), median (min–max) of {REPEATS} | "
        f"{_mbps(s['h2c'])} | {_mbps(r['h2c'])} | {med(s['h2c']) / med(r['h2c']):.2f}× |",
        f"| TCP container → host (container: `nc -e dd if=/dev/zero`), median (min–max) of {REPEATS} | "
        f"{_mbps(s['c2h'])} | {_mbps(r['c2h'])} | {med(s['c2h']) / med(r['c2h']):.2f}× |",
    ]
    from spinbox.shim.vm.accel import select_accel
    notes = [
        f"Both runtimes in one run on one private containerd and one private CNI bridge "
        f"(bridge + host-local, ipMasq off), one container at a time. spinbox: the shim runs CNI "
        f"into a netns per sandbox and redirects the veth to the VM's TAP with tc mirred; the guest "
        f"has a virtio-net NIC on that TAP, vhost off (no /dev/vhost-net here), QEMU accel "
        f"{select_accel('auto').value}, on a host with {os.cpu_count()} shared CPUs. runc: the same "
        f"conflist ADDed into a named netns by our CNI client, the container joined to it with "
        f"`ctr run --with-ns network:`.",
        "Ping: `busybox ping -i 0.2` from the host to the container's address, and from inside "
        "the container (`ctr task exec`) to the bridge gateway. Throughput: MB = 10^6 bytes; the "
        "container end is busybox `nc -e dd` with 64 KiB blocks (the same binary for both), the "
        "host end Python with 1 MiB buffers; host → container is timed from connect until the "
        "container's dd has read everything and closed the socket, container → host from accept "
        "to EOF. Each transfer size follows an "
        f"{PROBE_MIB} MiB probe so one run takes about {TARGET_S:.0f} s ({MIN_MIB}–{MAX_MIB} MiB).",
        f"Section wall time: {wall:.0f} s.",
    ]
    if busy:
        notes.append(f"Not a quiet host: up to {busy} other QEMU process(es) ran beside this "
                     "benchmark and shared its CPUs.")
    return ("network: host ↔ container, spinbox vs runc", rows, notes)


SECTIONS = {"network": section_network}
