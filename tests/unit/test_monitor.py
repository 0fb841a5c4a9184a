"""spinbox monitor (shim.monitor) and the shim's figures (shim.monitor_service, shim.counters):
the exposition text of given figures, label escaping, replies refused, shims found from their
state files, an unresponsive shim counted as a failure within the bound, the unix socket
endpoint, and the VM -> cgroups Metrics mapping of Stats."""
from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import ttrpc
from spinbox.api._pb.containerd.cgroups.v2 import metrics_pb2
from spinbox.api._pb.spinbox.monitor.v1 import monitor_pb2
from spinbox.shim import counters, monitor, monitor_service
from spinbox.shim.agent import GuestInfo
from spinbox.shim.state import GroupPaths, State
from spinbox.shim.stdio import pump_input, pump_output

MiB = 1 << 20


def figures(**kw) -> monitor_pb2.FiguresResponse:
    calls = counters.AgentCalls()
    calls.observe("Create", 0.3, True)
    calls.observe("Create", 0.02, False)
    calls.observe("Info", 0.004, True)
    r = monitor_pb2.FiguresResponse(
        state="ready", start_kind="template", start_seconds=0.14, vcpus=2, vcpus_base=1,
        memory_bytes=1280 * MiB, memory_base_bytes=256 * MiB, hotplugged_vcpus=1,
        hotplugged_memory_bytes=1024 * MiB, guest_answered=True, guest_memory_total_bytes=1200 * MiB,
        guest_memory_used_bytes=100 * MiB, guest_cpus_online=2, vm_cpu_user_seconds=3.5,
        vm_cpu_system_seconds=0.5, vm_rss_bytes=190 * MiB, containers=1, tasks_started=1, execs_started=4,
        stdio_out_bytes=12345, stdio_in_bytes=6, uptime_seconds=9.0, latency_bounds=counters.LATENCY_BOUNDS,
        guest_cpu_busy_seconds=4.2, guest_cpu_idle_seconds=9.0, vcpu_hotplug_events=3,
        memory_hotplug_events=2)
    for m, f in sorted(calls.methods.items()):
        r.agent_calls.append(monitor_pb2.AgentCall(method=m, calls=f.calls, failures=f.failures,
                                                   seconds_sum=f.seconds, bucket_counts=f.cumulative()))
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def ref(ns: str = "default", sb: str = "sb1") -> monitor.ShimRef:
    return monitor.ShimRef(ns, sb, "/nonexistent")


def samples(text: str) -> dict[str, float]:
    """{'name{k="v",...}': value} with the labels in a fixed order: namespace, sandbox, then the
    rest sorted (parsed by prometheus_client's own parser)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = dict(smp.labels)
            first = [k for k in ("namespace", "sandbox") if k in labels]
            order = first + sorted(k for k in labels if k not in first)
            inner = ",".join(f'{k}="{_escape(labels[k])}"' for k in order)
            out[f"{smp.name}{{{inner}}}" if inner else smp.name] = smp.value
    return out


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---------------------------------------------------------------------------------------------
# exposition

def test_exposition_of_given_figures():
    text = monitor.exposition([monitor.Outcome(ref(), figures())], {})
    s = samples(text)
    lab = 'namespace="default",sandbox="sb1"'
    assert s[f"spinbox_shim_up{{{lab}}}"] == 1
    assert s[f"spinbox_shim_scrape_failures_total{{{lab}}}"] == 0
    assert s[f'spinbox_sandbox_info{{{lab},start_kind="template",state="ready"}}'] == 1
    assert s[f'spinbox_sandbox_start_seconds{{{lab},kind="template"}}'] == pytest.approx(0.14)
    assert s[f"spinbox_sandbox_vcpus{{{lab}}}"] == 2
    assert s[f"spinbox_sandbox_memory_bytes{{{lab}}}"] == 1280 * MiB
    assert s[f"spinbox_sandbox_hotplugged_memory_bytes{{{lab}}}"] == 1024 * MiB
    assert s[f"spinbox_sandbox_guest_memory_used_bytes{{{lab}}}"] == 100 * MiB
    assert s[f'spinbox_sandbox_vm_cpu_seconds_total{{{lab},mode="user"}}'] == 3.5
    assert s[f'spinbox_sandbox_guest_cpu_seconds_total{{{lab},mode="busy"}}'] == 4.2
    assert s[f'spinbox_sandbox_stdio_bytes_total{{{lab},direction="out"}}'] == 12345
    assert s[f"spinbox_sandbox_execs_started_total{{{lab}}}"] == 4
    assert s[f'spinbox_sandbox_agent_calls_total{{{lab},method="Create"}}'] == 2
    assert s[f'spinbox_sandbox_agent_call_failures_total{{{lab},method="Create"}}'] == 1
    # histogram: 0.02 s in le=0.025, 0.3 s in le=0.5; +Inf is every call
    assert s[f'spinbox_sandbox_agent_call_seconds_bucket{{{lab},le="0.01",method="Create"}}'] == 0
    assert s[f'spinbox_sandbox_agent_call_seconds_bucket{{{lab},le="0.025",method="Create"}}'] == 1
    assert s[f'spinbox_sandbox_agent_call_seconds_bucket{{{lab},le="0.5",method="Create"}}'] == 2
    assert s[f'spinbox_sandbox_agent_call_seconds_bucket{{{lab},le="+Inf",method="Create"}}'] == 2
    assert s[f'spinbox_sandbox_agent_call_seconds_sum{{{lab},method="Create"}}'] == pytest.approx(0.32)
    assert s["spinbox_monitor_shims"] == 1
    assert s[f'spinbox_sandbox_hotplug_events_total{{{lab},resource="vcpu"}}'] == 3
    assert s[f'spinbox_sandbox_hotplug_events_total{{{lab},resource="memory"}}'] == 2


def test_a_shim_that_did_not_answer_is_up_0_with_its_failures_and_no_figures():
    text = monitor.exposition([monitor.Outcome(ref(sb="gone"), None, "no answer")], {("default", "gone"): 3})
    s = samples(text)
    assert s['spinbox_shim_up{namespace="default",sandbox="gone"}'] == 0
    assert s['spinbox_shim_scrape_failures_total{namespace="default",sandbox="gone"}'] == 3
    assert not any(k.startswith("spinbox_sandbox_") for k in s), s


def test_guest_figures_only_when_the_guest_answered():
    s = samples(monitor.exposition([monitor.Outcome(ref(), figures(guest_answered=False))], {}))
    assert s['spinbox_sandbox_guest_up{namespace="default",sandbox="sb1"}'] == 0
    assert not any(k.startswith("spinbox_sandbox_guest_memory") for k in s)
    assert s['spinbox_sandbox_vcpus{namespace="default",sandbox="sb1"}'] == 2   # host truth stays


def test_label_values_are_escaped():
    text = monitor.exposition([monitor.Outcome(monitor.ShimRef('we"ird\\ns\nx', "sb1", ""), None, "x")], {})
    assert 'spinbox_shim_up{namespace="we\\"ird\\\\ns\\nx",sandbox="sb1"} 0.0' in text
    assert '\nx"' not in text            # no raw newline inside a label value


@pytest.mark.parametrize("change, problem", [
    (lambda r: setattr(r, "start_seconds", float("nan")), "not finite"),
    (lambda r: setattr(r, "uptime_seconds", -1.0), "negative"),
    (lambda r: setattr(r, "guest_cpu_busy_seconds", float("inf")), "not finite"),
    (lambda r: setattr(r.agent_calls[0], "method", 'Create",x="1'), "method name"),
    (lambda r: r.agent_calls[0].bucket_counts.append(1), "inconsistent"),
    (lambda r: setattr(r.agent_calls[0], "failures", 99), "inconsistent"),
    (lambda r: r.latency_bounds.append(0.5), "bounds"),
])
def test_bad_replies_are_refused(change, problem):
    r = figures()
    assert monitor.reply_problem(r) is None
    change(r)
    assert problem in (monitor.reply_problem(r) or "")


# ---------------------------------------------------------------------------------------------
# finding shims, asking them

class FixedFigures:
    def __init__(self, r: monitor_pb2.FiguresResponse, delay: float = 0.0) -> None:
        self.r, self.delay = r, delay

    async def Figures(self, req, ctx):
        await asyncio.sleep(self.delay)
        return self.r


class Shims:
    """Real ttrpc servers serving the Monitor service, on a loop in a thread (the collector
    runs its own loop per scrape, as in the HTTP server's threads)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[ttrpc.Server] = []

    def serve(self, path: Path, servicer: object) -> None:
        async def start() -> None:
            s = ttrpc.Server()
            s.register(monitor_pb2.DESCRIPTOR.services_by_name["Monitor"], servicer)
            await s.serve_unix(str(path), require_same_user=True)
            self.servers.append(s)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def close(self) -> None:
        async def stop() -> None:
            for s in self.servers:
                await s.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def shims():
    s = Shims()
    yield s
    s.close()


def make_state(state_dir: Path, ns: str, group: str, address: str, pid: int | None = None) -> None:
    st = State.open(GroupPaths(state_dir, ns, group))
    st.set_daemon(pid or os.getpid(), address)


def test_find_shims_reads_state_files_and_skips_what_is_not_a_sandbox(tmp_path):
    sd = tmp_path / "st"
    make_state(sd, "default", "a", f"unix://{tmp_path}/a.sock")
    make_state(sd, "k8s.io", "b", f"unix://{tmp_path}/b.sock")
    (sd / "vm" / "0123456789abcdef").mkdir(parents=True, mode=0o700)       # VM dirs: no state.json
    (sd / "templates" / "key").mkdir(parents=True, mode=0o700)
    refs = monitor.find_shims(sd)
    assert [(r.namespace, r.sandbox, r.address, r.problem) for r in refs] == [
        ("default", "a", f"{tmp_path}/a.sock", ""), ("k8s.io", "b", f"{tmp_path}/b.sock", "")]
    assert monitor.find_shims(tmp_path / "missing") == []
    # a state removed between the listing and the read is a deleted sandbox, not a failure
    assert monitor._ref(sd, "default", "deleted-meanwhile") is None


def test_a_state_whose_daemon_is_gone_is_reported_not_asked(tmp_path):
    sd = tmp_path / "st"
    make_state(sd, "default", "crashed", f"unix://{tmp_path}/x.sock")
    doc = State.load(GroupPaths(sd, "default", "crashed"))
    assert doc is not None
    doc.doc["daemon"]["start_time"] += 1          # the pid now names another process
    doc.save()
    [r] = monitor.find_shims(sd)
    assert r.problem == "the shim daemon is gone"
    [o] = asyncio.run(monitor.ask_all([r], 1.0))
    assert o.figures is None and o.error == r.problem


def test_an_unresponsive_shim_counts_a_failure_and_never_holds_the_scrape(tmp_path, shims):
    sd = tmp_path / "st"
    shims.serve(tmp_path / "ok.sock", FixedFigures(figures()))
    shims.serve(tmp_path / "slow.sock", FixedFigures(figures(), delay=30))
    make_state(sd, "default", "ok", f"unix://{tmp_path}/ok.sock")
    make_state(sd, "default", "slow", f"unix://{tmp_path}/slow.sock")
    # a socket that accepts and never reads (no server loop behind it at all)
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(1)
    make_state(sd, "default", "mute", f"unix://{tmp_path}/mute.sock")
    c = monitor.ShimCollector(sd, timeout=0.5)
    try:
        for n in (1, 2):
            t = time.monotonic()
            reg = monitor.CollectorRegistry(auto_describe=False)
            reg.register(c)
            s = samples(monitor.generate_latest(reg).decode())
            took = time.monotonic() - t
            assert took < 2.5, f"scrape took {took:.2f} s with a 0.5 s bound per shim"
            assert s['spinbox_shim_up{namespace="default",sandbox="ok"}'] == 1
            assert s['spinbox_sandbox_vcpus{namespace="default",sandbox="ok"}'] == 2
            for bad in ("slow", "mute"):
                assert s[f'spinbox_shim_up{{namespace="default",sandbox="{bad}"}}'] == 0
                assert s[f'spinbox_shim_scrape_failures_total{{namespace="default",sandbox="{bad}"}}'] == n
            assert s['spinbox_shim_scrape_failures_total{namespace="default",sandbox="ok"}'] == 0
    finally:
        mute.close()
    # a sandbox that is gone is forgotten: the failure table holds only what exists
    (sd / "default" / "slow" / "state.json").unlink()
    c.count(c.scrape())
    assert ("default", "slow") not in c.failures and c.failures[("default", "mute")] == 3


def test_a_shim_refusing_the_service_is_a_failure(tmp_path, shims):
    class Other:
        pass
    srv_path = tmp_path / "old.sock"

    async def start() -> None:
        s = ttrpc.Server()           # serves nothing: an older shim without the Monitor service
        await s.serve_unix(str(srv_path))
        shims.servers.append(s)
    asyncio.run_coroutine_threadsafe(start(), shims.loop).result(5)
    [o] = asyncio.run(monitor.ask_all([monitor.ShimRef("default", "old", str(srv_path))], 1.0))
    assert o.figures is None and o.error


# ---------------------------------------------------------------------------------------------
# serving

def test_parse_listen():
    assert monitor.parse_listen("127.0.0.1:9110") == ("127.0.0.1", 9110)
    assert monitor.parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("9110", "host:", "host:0", "host:70000", "[::1]"):
        with pytest.raises(monitor.MonitorError, match="--listen"):
            monitor.parse_listen(bad)


def _http_get_unix(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_unix_socket_endpoint_0600_and_refuses_a_non_socket(tmp_path):
    sd = tmp_path / "st"
    sd.mkdir(mode=0o700)
    reg = monitor.CollectorRegistry(auto_describe=False)
    reg.register(monitor.ShimCollector(sd, 0.5))
    path = tmp_path / "m.sock"
    path.touch()
    with pytest.raises(monitor.MonitorError, match="not a socket"):
        monitor.make_server(reg, socket_path=path)
    path.unlink()
    srv = monitor.make_server(reg, socket_path=path)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reply = _http_get_unix(path)
        assert reply.startswith(b"HTTP/1.0 200"), reply[:200]
        assert b"spinbox_monitor_shims 0.0" in reply
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


# ---------------------------------------------------------------------------------------------
# the shim's side: counters, VM figures, the Stats mapping

def test_agent_call_counters_bucket_and_accumulate():
    c = counters.AgentCalls()
    c.observe("Ping", 0.0005, True)
    c.observe("Ping", 0.001, True)           # a bound is inclusive (le)
    c.observe("Ping", 99.0, False)
    f = c.methods["Ping"]
    assert (f.calls, f.failures) == (3, 1)
    cum = f.cumulative()
    assert cum[0] == 2 and cum[-1] == 2      # 99 s only in +Inf
    c.started("")
    c.started("e1")
    assert (c.tasks_started, c.execs_started) == (1, 1)
    for i in range(counters.MAX_METHODS + 5):
        c.observe(f"M{i}", 0.1, True)
    assert len(c.methods) == counters.MAX_METHODS


async def test_stdio_pumps_count_bytes(tmp_path):
    class Source:
        def __init__(self, chunks):
            self.chunks = list(chunks)

        async def read(self):
            return self.chunks.pop(0) if self.chunks else None

        async def consumed(self, n):
            pass

    class Sink:
        def __init__(self):
            self.got = b""

        async def write(self, data):
            self.got += data

        async def close_stdin(self):
            pass

    before_out, before_in = counters.STDIO.out, counters.STDIO.into
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        assert await pump_output(Source([b"abc", b"de"]), w) == 5
    finally:
        os.close(w)
    assert os.read(r, 100) == b"abcde"
    assert counters.STDIO.out - before_out == 5
    os.close(r)
    r, w = os.pipe()
    os.write(w, b"input!")
    os.close(w)
    os.set_blocking(r, False)
    sink = Sink()
    try:
        assert await pump_input(r, sink) == 6
    finally:
        os.close(r)
    assert sink.got == b"input!" and counters.STDIO.into - before_in == 6


def test_host_usage_of_a_live_process_and_of_a_gone_one():
    u = monitor_service.host_usage(os.getpid())
    assert u is not None and u.rss_bytes > 1 * MiB and u.user_s + u.system_s > 0
    assert monitor_service.host_usage(None) is None
    assert monitor_service.host_usage(1 << 30) is None


def _vm(guest: GuestInfo | None) -> monitor_service.VMFigures:
    return monitor_service.VMFigures(2, 1, 1280 * MiB, 256 * MiB, monitor_service.HostUsage(3.0, 0.5, 190 * MiB),
                                     guest)


def test_stats_mapping_the_sandbox_task_reports_the_vm():
    m = metrics_pb2.Metrics()
    m.memory.usage, m.memory.usage_limit, m.cpu.usage_usec, m.pids.current = 5 * MiB, 64 * MiB, 1000, 3
    m.cpu.user_usec, m.cpu.system_usec = 600, 400
    guest = GuestInfo("6.1", 2, 2, 1200 * MiB, 1100 * MiB, 10.0, True, cpu_busy_ms=4200, cpu_idle_ms=9000)
    monitor_service.apply_vm_figures(m, _vm(guest))
    assert m.memory.usage == 100 * MiB                 # guest used: MemTotal - MemAvailable
    assert m.memory.usage_limit == 1280 * MiB          # the VM's memory, base + plugged
    # all vCPUs' busy time in the guest (no split: not the container's user/system either)
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (4_200_000, 0, 0)
    assert m.pids.current == 3                         # the container's own
    vm = _vm(guest)
    assert (vm.hotplugged_vcpus, vm.hotplugged_memory_bytes) == (1, 1024 * MiB)


def test_stats_mapping_without_the_guest_keeps_the_containers_memory_use():
    m = metrics_pb2.Metrics()
    m.memory.usage, m.cpu.usage_usec = 5 * MiB, 1234
    monitor_service.apply_vm_figures(m, _vm(None))
    assert m.memory.usage == 5 * MiB and m.memory.usage_limit == 1280 * MiB
    assert m.cpu.usage_usec == 1234


async def test_the_shims_monitor_service_over_ttrpc_before_any_sandbox(tmp_path):
    from spinbox.shim.assembly import build_task_service

    def no_sandbox():
        raise AssertionError("Figures must not start a sandbox")

    svc = build_task_service(no_sandbox, None)
    server = ttrpc.Server()
    monitor_service.MonitorService(svc.manager).register(server)
    path = tmp_path / "shim.sock"
    await server.serve_unix(str(path), require_same_user=True)
    try:
        o = await monitor.ask(monitor.ShimRef("default", "sb", str(path)), 5.0)
    finally:
        await server.close()
    assert o.error == "" and o.figures is not None
    r = o.figures
    assert (r.state, r.start_kind, r.vcpus, r.containers, r.guest_answered) == ("none", "", 0, 0, False)
    assert list(r.latency_bounds) == list(counters.LATENCY_BOUNDS)
    assert r.uptime_seconds >= 0 and svc.manager.sandbox is None
    s = samples(monitor.exposition([o], {}))
    assert s['spinbox_sandbox_info{namespace="default",sandbox="sb",start_kind="",state="none"}'] == 1
    assert 'spinbox_sandbox_vcpus{namespace="default",sandbox="sb"}' not in s    # no VM: no VM figures


def test_resize_counters_count_vcpus_moved_and_memory_changes():
    r = counters.Resizes()
    r.observe(1, 3, 256, 1024)      # +2 vCPUs, memory grown
    r.observe(3, 1, 1024, 1024)     # -2 vCPUs
    r.observe(1, 1, 1024, 512)      # memory shrunk
    assert (r.vcpu_changes, r.memory_changes) == (4, 2)
