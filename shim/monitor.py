"""`spinbox monitor`: one Prometheus endpoint for every sandbox of this node.

    spinbox monitor [--listen 127.0.0.1:9110 | --socket /run/spinbox-monitor.sock]
                    [--state-dir DIR] [--shim-timeout 2]

Each scrape finds the running shim daemons from their state files
(`<state_dir>/<namespace>/<group>/state.json`, shim.state: the daemon's pid, start time and
socket address; the directory chain is checked to be root's before a file is read) and asks
each one, concurrently, for its figures (`spinbox.monitor.v1.Monitor/Figures`,
shim.monitor_service) on its own socket. The shims' sockets are 0600 with a peer uid check:
the monitor runs as root. A shim that does not answer within `--shim-timeout` (connect and
call together) is reported `spinbox_shim_up 0` and counted in
`spinbox_shim_scrape_failures_total`; it never holds the scrape longer than that bound.

Labels come from the state directory's names (containerd's namespace and the sandbox id,
both containerd identifiers), never from a shim's answer. What each metric means:
docs/monitoring.md.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import logging
import math
import os
import re
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, MetricsHandler, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

import ttrpc
from spinbox.api import contract
from spinbox.api._pb.spinbox.monitor.v1 import monitor_pb2

from .errors import SpinboxError
from .state import GroupPaths, State

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9110"
SHIM_TIMEOUT_S = 2.0
MAX_CONCURRENT = 32          # shims asked at once (a node with 500 sandboxes: 16 rounds at worst)
MAX_SHIMS = 4096             # state dirs looked at per scrape
SERVICE = "spinbox.monitor.v1.Monitor"
_METHOD_RE = re.compile(r"[A-Z][A-Za-z0-9]{0,39}")
MAX_METHODS = 64
MAX_BOUNDS = 32


class MonitorError(SpinboxError):
    """A bad --listen / --socket, or a socket path that is not ours to replace."""


@dataclass(frozen=True)
class ShimRef:
    namespace: str
    sandbox: str
    address: str            # the daemon's socket path; "" when there is no live daemon
    problem: str = ""       # why it cannot be asked (gone daemon, unreadable state)


@dataclass(frozen=True)
class Outcome:
    ref: ShimRef
    figures: monitor_pb2.FiguresResponse | None
    error: str = ""


# ---------------------------------------------------------------------------------------------
# finding the shims

def find_shims(state_dir: Path) -> list[ShimRef]:
    """Every group dir with a state file. A daemon that is gone (crashed, its state left for
    containerd's delete) or a state that cannot be read is listed with its problem: it is a
    sandbox that is not being served, which is what `up 0` says."""
    refs: list[ShimRef] = []
    try:
        namespaces = sorted(os.scandir(state_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for ns in namespaces:
        if not ns.is_dir(follow_symlinks=False) or contract.id_problem(ns.name):
            continue
        try:
            groups = sorted(os.scandir(ns.path), key=lambda e: e.name)
        except OSError:
            continue
        for g in groups:
            if len(refs) >= MAX_SHIMS:
                log.warning("monitor: more than %d sandboxes under %s: the rest not scraped", MAX_SHIMS, state_dir)
                return refs
            if (not g.is_dir(follow_symlinks=False) or contract.id_problem(g.name)
                    or not os.path.exists(os.path.join(g.path, "state.json"))):
                continue
            ref = _ref(state_dir, ns.name, g.name)
            if ref is not None:
                refs.append(ref)
    return refs


def _ref(state_dir: Path, namespace: str, group: str) -> ShimRef | None:
    try:
        st = State.load(GroupPaths(state_dir, namespace, group))
    except (SpinboxError, OSError) as e:
        return ShimRef(namespace, group, "", f"state unreadable: {e}")
    if st is None:                 # removed since the listing: the sandbox is gone, not failing
        return None
    address = (st.daemon or {}).get("address")
    if not isinstance(address, str) or not address.startswith("unix://"):
        return ShimRef(namespace, group, "", "no daemon address recorded")
    if not st.daemon_alive():
        return ShimRef(namespace, group, "", "the shim daemon is gone")
    return ShimRef(namespace, group, address[len("unix://"):])


# ---------------------------------------------------------------------------------------------
# asking them

async def ask(ref: ShimRef, timeout: float) -> Outcome:
    """One shim's figures, within `timeout` seconds for connect and call together."""
    if ref.problem:
        return Outcome(ref, None, ref.problem)
    client: ttrpc.Client | None = None
    try:
        async with asyncio.timeout(timeout):
            client = await ttrpc.Client.connect(ref.address)
            r = await client.call(SERVICE, "Figures", monitor_pb2.FiguresRequest(), monitor_pb2.FiguresResponse)
        problem = reply_problem(r)
        return Outcome(ref, None, f"bad reply: {problem}") if problem else Outcome(ref, r)
    except TimeoutError:
        return Outcome(ref, None, f"no answer within {timeout:g} s")
    except (OSError, ttrpc.TTRPCError) as e:
        return Outcome(ref, None, str(e) or type(e).__name__)
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 1.0)


def reply_problem(r: monitor_pb2.FiguresResponse) -> str | None:
    """Why a reply cannot be exposed as it is (a shim of another version, or a bug), or None."""
    floats = (r.start_seconds, r.vm_cpu_user_seconds, r.vm_cpu_system_seconds, r.uptime_seconds,
              r.guest_cpu_busy_seconds, r.guest_cpu_idle_seconds)
    if not all(math.isfinite(x) and x >= 0 for x in floats):
        return "a time that is negative or not finite"
    bounds = list(r.latency_bounds)
    if len(bounds) > MAX_BOUNDS or any(not math.isfinite(b) or b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
        return "latency bounds not increasing positive numbers"
    if len(r.agent_calls) > MAX_METHODS:
        return f"{len(r.agent_calls)} agent methods (at most {MAX_METHODS})"
    for c in r.agent_calls:
        if not _METHOD_RE.fullmatch(c.method):
            return f"agent method name {c.method[:40]!r}"
        counts = list(c.bucket_counts)
        if (len(counts) != len(bounds) or counts != sorted(counts) or (counts and counts[-1] > c.calls)
                or c.failures > c.calls or not (math.isfinite(c.seconds_sum) and c.seconds_sum >= 0)):
            return f"agent method {c.method}: inconsistent counts"
    return None


async def ask_all(refs: list[ShimRef], timeout: float) -> list[Outcome]:
    sem = asyncio.Semaphore(MAX_CONCURRENT)

    async def one(ref: ShimRef) -> Outcome:
        async with sem:
            return await ask(ref, timeout)

    return list(await asyncio.gather(*(one(r) for r in refs)))


# ---------------------------------------------------------------------------------------------
# exposition

SB = ["namespace", "sandbox"]


def _gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=SB + (extra or []))


def _counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=SB + (extra or []))


def families(outcomes: Iterable[Outcome], failures: dict[tuple[str, str], int],
             scrape_seconds: float | None = None) -> list:
    """The metric families of one scrape (pure: the unit tests feed it outcomes)."""
    up = _gauge("spinbox_shim_up", "1 if the sandbox's shim answered this scrape, else 0")
    fail = _counter("spinbox_shim_scrape_failures", "Scrapes in which the shim did not answer (in time)")
    info = _gauge("spinbox_sandbox_info", "The sandbox's state and how its VM started (value 1)",
                  ["state", "start_kind"])
    start = _gauge("spinbox_sandbox_start_seconds", "QEMU exec to the guest agent answering", ["kind"])
    g = {k: _gauge(f"spinbox_sandbox_{k}", doc) for k, doc in (
        ("vcpus", "vCPUs of the VM (confirmed by the guest)"),
        ("vcpus_base", "vCPUs the VM booted with"),
        ("memory_bytes", "Memory of the VM: base + hot-plugged (confirmed by the guest)"),
        ("memory_base_bytes", "Memory the VM booted with"),
        ("hotplugged_vcpus", "vCPUs hot-plugged now"),
        ("hotplugged_memory_bytes", "Memory hot-plugged now"),
        ("guest_up", "1 if the guest answered its Info call within the shim's bound"),
        ("guest_memory_total_bytes", "MemTotal in the guest (guest-reported)"),
        ("guest_memory_used_bytes", "MemTotal - MemAvailable in the guest (guest-reported)"),
        ("guest_cpus_online", "CPUs online in the guest (guest-reported)"),
        ("vm_rss_bytes", "QEMU's resident memory on the host"),
        ("containers", "Containers the shim holds"),
        ("lost", "1 if the VM or its agent connection died under the shim"),
        ("shim_uptime_seconds", "Since the shim daemon started serving"))}
    vm_cpu = _counter("spinbox_sandbox_vm_cpu_seconds", "QEMU's CPU time on the host", ["mode"])
    guest_cpu = _counter("spinbox_sandbox_guest_cpu_seconds", "All vCPUs' time since the guest booted "
                         "(guest-reported)", ["mode"])
    tasks = _counter("spinbox_sandbox_tasks_started", "Container inits started in the guest")
    execs = _counter("spinbox_sandbox_execs_started", "Exec processes started in the guest")
    stdio = _counter("spinbox_sandbox_stdio_bytes", "stdio bytes copied between containerd and the guest",
                     ["direction"])
    hotplug = _counter("spinbox_sandbox_hotplug_events", "The VM's confirmed size changes: vCPUs added or "
                       "given back, memory grown or shrunk", ["resource"])
    calls = _counter("spinbox_sandbox_agent_calls", "Guest agent calls", ["method"])
    call_fail = _counter("spinbox_sandbox_agent_call_failures", "Guest agent calls that failed", ["method"])
    latency = HistogramMetricFamily("spinbox_sandbox_agent_call_seconds", "Guest agent call latency",
                                    labels=SB + ["method"])
    shims = 0
    for o in outcomes:
        shims += 1
        key = [o.ref.namespace, o.ref.sandbox]
        up.add_metric(key, 1 if o.figures is not None else 0)
        fail.add_metric(key, failures.get((o.ref.namespace, o.ref.sandbox), 0))
        r = o.figures
        if r is None:
            continue
        info.add_metric(key + [r.state, r.start_kind], 1)
        if r.start_kind:
            start.add_metric(key + [r.start_kind], r.start_seconds)
        if r.vcpus:
            for k in ("vcpus", "vcpus_base", "memory_bytes", "memory_base_bytes", "hotplugged_vcpus",
                      "hotplugged_memory_bytes", "vm_rss_bytes"):
                g[k].add_metric(key, getattr(r, k))
            vm_cpu.add_metric(key + ["user"], r.vm_cpu_user_seconds)
            vm_cpu.add_metric(key + ["system"], r.vm_cpu_system_seconds)
            g["guest_up"].add_metric(key, 1 if r.guest_answered else 0)
        if r.guest_answered:
            g["guest_memory_total_bytes"].add_metric(key, r.guest_memory_total_bytes)
            g["guest_memory_used_bytes"].add_metric(key, r.guest_memory_used_bytes)
            g["guest_cpus_online"].add_metric(key, r.guest_cpus_online)
            guest_cpu.add_metric(key + ["busy"], r.guest_cpu_busy_seconds)
            guest_cpu.add_metric(key + ["idle"], r.guest_cpu_idle_seconds)
        g["containers"].add_metric(key, r.containers)
        g["lost"].add_metric(key, 1 if r.lost else 0)
        g["shim_uptime_seconds"].add_metric(key, r.uptime_seconds)
        tasks.add_metric(key, r.tasks_started)
        execs.add_metric(key, r.execs_started)
        stdio.add_metric(key + ["out"], r.stdio_out_bytes)
        stdio.add_metric(key + ["in"], r.stdio_in_bytes)
        hotplug.add_metric(key + ["vcpu"], r.vcpu_hotplug_events)
        hotplug.add_metric(key + ["memory"], r.memory_hotplug_events)
        bounds = [f"{b:g}" for b in r.latency_bounds]
        for c in r.agent_calls:
            calls.add_metric(key + [c.method], c.calls)
            call_fail.add_metric(key + [c.method], c.failures)
            buckets = list(zip(bounds, c.bucket_counts, strict=True)) + [("+Inf", c.calls)]
            latency.add_metric(key + [c.method], buckets, sum_value=c.seconds_sum)
    out = [up, fail, info, start, *g.values(), vm_cpu, guest_cpu, tasks, execs, stdio, hotplug, calls, call_fail,
           latency]
    n = GaugeMetricFamily("spinbox_monitor_shims", "Sandbox state dirs found by this scrape")
    n.add_metric([], shims)
    out.append(n)
    if scrape_seconds is not None:
        d = GaugeMetricFamily("spinbox_monitor_scrape_seconds", "How long this scrape took")
        d.add_metric([], scrape_seconds)
        out.append(d)
    return out


class ShimCollector(Collector):
    """A prometheus_client collector that scrapes the shims on every collect()."""

    def __init__(self, state_dir: Path, timeout: float = SHIM_TIMEOUT_S) -> None:
        self.state_dir = state_dir
        self.timeout = timeout
        self.failures: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()       # scrapes run in the HTTP server's threads

    def scrape(self) -> list[Outcome]:
        refs = find_shims(self.state_dir)
        # a fresh loop per scrape: collect() runs in a server thread, never inside a loop
        return asyncio.run(ask_all(refs, self.timeout))

    def count(self, outcomes: list[Outcome]) -> dict[tuple[str, str], int]:
        """Add this scrape's failures; forget sandboxes that are gone (bounded by what exists)."""
        with self._lock:
            seen = {(o.ref.namespace, o.ref.sandbox) for o in outcomes}
            self.failures = {k: v for k, v in self.failures.items() if k in seen}
            for o in outcomes:
                if o.figures is None:
                    k = (o.ref.namespace, o.ref.sandbox)
                    self.failures[k] = self.failures.get(k, 0) + 1
                    log.info("monitor: %s/%s: %s", o.ref.namespace, o.ref.sandbox, o.error)
            return dict(self.failures)

    def collect(self) -> Iterator:
        t = time.monotonic()
        outcomes = self.scrape()
        yield from families(outcomes, self.count(outcomes), time.monotonic() - t)


def exposition(outcomes: list[Outcome], failures: dict[tuple[str, str], int]) -> str:
    """The Prometheus text of given outcomes (tests, and a one-shot `--once`)."""
    class Fixed(Collector):
        def collect(self) -> Iterator:
            yield from families(outcomes, failures)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Fixed())
    return generate_latest(reg).decode()


# ---------------------------------------------------------------------------------------------
# serving

class _TCPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class _UnixHandler(MetricsHandler):
    def address_string(self) -> str:
        return "unix"                                # a unix peer has no (host, port)


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); MonitorError naming the value otherwise."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value)
    if not m:
        raise MonitorError(f"--listen {value!r}: want host:port (e.g. {DEFAULT_LISTEN}) or [v6]:port")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 < int(port) < 65536:
        raise MonitorError(f"--listen {value!r}: port {port} is not 1..65535")
    return host, int(port)


def _unix_server(path: Path, registry: CollectorRegistry) -> _UnixServer:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise MonitorError(f"--socket {path}: exists and is not a socket: refused")
        path.unlink()                                # a socket a previous monitor left
    old = os.umask(0o177)                            # 0600 from the start: root reads it
    try:
        return _UnixServer(str(path), _handler(registry, _UnixHandler))
    finally:
        os.umask(old)


def _handler(registry: CollectorRegistry, base: type[MetricsHandler]) -> type:
    return type(base.__name__, (base,), {"registry": registry})


def make_server(registry: CollectorRegistry, *, listen: str | None = None,
                socket_path: Path | None = None) -> socketserver.BaseServer:
    if socket_path is not None:
        return _unix_server(socket_path, registry)
    host, port = parse_listen(listen or DEFAULT_LISTEN)
    if ":" in host:
        class _V6(_TCPServer):
            address_family = socket.AF_INET6
        return _V6((host, port), _handler(registry, MetricsHandler))
    return _TCPServer((host, port), _handler(registry, MetricsHandler))


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="spinbox monitor", description="Prometheus metrics of this node's sandboxes")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--listen", help=f"HTTP on host:port (default {DEFAULT_LISTEN})")
    where.add_argument("--socket", type=Path, help="HTTP on this unix socket instead (0600)")
    ap.add_argument("--state-dir", type=Path, help="the shims' state dir (default: paths.state_dir of the config)")
    ap.add_argument("--shim-timeout", type=float, default=SHIM_TIMEOUT_S,
                    help=f"seconds a shim has to answer, connect included (default {SHIM_TIMEOUT_S:g})")
    ap.add_argument("--once", action="store_true", help="print one scrape and exit")
    args = ap.parse_args(argv)
    if not 0 < args.shim_timeout <= 60:
        print(f"spinbox monitor: --shim-timeout {args.shim_timeout}: want 0 < seconds <= 60", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="spinbox monitor: %(levelname)s %(message)s")
    try:
        state_dir = args.state_dir
        if state_dir is None:
            from . import config as config_mod
            state_dir = Path(config_mod.load().paths.state_dir)
        collector = ShimCollector(state_dir, args.shim_timeout)
        if args.once:
            reg = CollectorRegistry(auto_describe=False)
            reg.register(collector)
            sys.stdout.write(generate_latest(reg).decode())
            return 0
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        server = make_server(registry, listen=args.listen, socket_path=args.socket)
    except (SpinboxError, OSError) as e:
        print(f"spinbox monitor: {e}", file=sys.stderr)
        return 1
    where_to = args.socket or (args.listen or DEFAULT_LISTEN)
    print(f"spinbox monitor: serving {where_to} (shims under {state_dir})", file=sys.stderr, flush=True)

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()   # shutdown() waits for serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if args.socket is not None:                  # ours: removed at exit
            with contextlib.suppress(FileNotFoundError):
                args.socket.unlink()
    return 0
