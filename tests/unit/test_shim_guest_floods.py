"""The guest floods the host: what it sends is bounded in count, rate and memory on the host.

* OOM events (shim.exits.OOMReports): a flood for one container costs a bounded number of
  /tasks/oom, bounded memory, and an exit after it still goes out at once.
* Log lines the guest causes (shim.ratelimit.LogThrottle): bounded per message, with the count.
* QMP events (shim.vm.qmp): the listeners nobody reads keep a bounded number, and the one we
  wait on still gets its event.
* The daemon's log (shim.logwriter): a reader that never reads stalls nothing and costs bounded
  memory.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.shim import daemon, exits
from spinbox.shim.agent import AgentEvent
from spinbox.shim.assembly import build_task_service
from spinbox.shim.logwriter import NonBlockingHandler
from spinbox.shim.publisher import Publisher
from spinbox.shim.ratelimit import LogThrottle, TokenBucket

from fakes import Ctx, FakeSandboxFactory, RecordingPublisher, make_bundle

pytestmark = pytest.mark.timeout(60)

CTX = Ctx.ns("testns")
FLOOD = 100_000


class Box:
    """One sandbox with container c1 running, driven through the Task service."""

    def __init__(self, tmp: Path, publisher) -> None:
        self.tmp = tmp
        self.factory = FakeSandboxFactory()
        self.svc = build_task_service(self.factory, publisher, namespace="default",
                                      request_exit=lambda: None, drain_timeout=2.0, agent_timeout=5.0)
        self.follower = self.svc.manager.follower

    async def run(self, id: str) -> None:
        bundle = make_bundle(self.tmp, f"b-{id}")
        await self.svc.Create(shim_pb2.CreateTaskRequest(id=id, bundle=str(bundle)), CTX)
        await self.svc.Start(shim_pb2.StartRequest(id=id), CTX)

    @property
    def agent(self):
        return self.factory.last.fake_agent

    async def flood_ooms(self, id: str, n: int, *, yield_every: int = 500) -> None:
        """`n` OOM events for `id` as the agent client hands them over: in bursts, with the
        event loop running in between (as it does between reads off the channel)."""
        seq = self.follower.last_seq
        for i in range(n):
            seq += 1
            self.follower.on_event(AgentEvent(seq, time.time_ns(), False, "oom", id))
            if i % yield_every == 0:
                await asyncio.sleep(0)
        self.agent._seq = seq       # the fake's next pushed event follows the flood

    async def close(self) -> None:
        await self.svc.close()


async def until(cond, timeout: float) -> float:
    """Seconds until `cond()` held; fails after `timeout`."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not cond():
        assert loop.time() - t0 < timeout, "condition not reached in time"
        await asyncio.sleep(0.002)
    return loop.time() - t0


@pytest.fixture
async def box(tmp_path):
    pub = RecordingPublisher()
    b = Box(tmp_path, pub)
    b.pub = pub
    yield b
    await b.close()


# --- OOM events ---------------------------------------------------------------------------

async def test_an_oom_flood_costs_bounded_publishes_and_memory(box):
    await box.run("c1")
    t0 = time.monotonic()
    tracemalloc.start()
    try:
        await box.flood_ooms("c1", FLOOD)
        await asyncio.sleep(0.05)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - t0
    ooms = box.pub.topics("c1").count("/tasks/oom")
    assert 1 <= ooms <= exits.OOM_BURST + exits.OOM_RATE * elapsed + 1, (ooms, elapsed)
    assert peak < 2 << 20, f"a flood of {FLOOD} OOM events held {peak} bytes at its peak"
    # the merged ones are counted, and the log says so a bounded number of times
    assert box.follower.ooms.merged + box.follower.ooms.published >= FLOOD - ooms - 1

    box.agent.push_exit("c1", status=0)
    took = await until(lambda: "/tasks/exit" in box.pub.topics("c1"), 2.0)
    assert took < 0.5


async def test_an_exit_after_an_oom_flood_does_not_wait_behind_it(tmp_path):
    """With containerd slow to take events (1 ms per Forward), the exit is out after a few
    OOMs, not after the flood."""
    pub = Publisher(ttrpc_address="/nonexistent")
    forwarded: list[str] = []

    async def forward(env) -> None:
        await asyncio.sleep(0.001)
        forwarded.append(env.topic)

    pub._forward = forward         # type: ignore[method-assign]
    box = Box(tmp_path, pub)
    try:
        await box.run("c1")
        await box.flood_ooms("c1", FLOOD)
        box.agent.push_exit("c1", status=0)
        took = await until(lambda: "/tasks/exit" in forwarded, 20.0)
        assert took < 1.0, f"the exit waited {took:.2f} s behind OOM events"
        assert forwarded.count("/tasks/oom") <= exits.OOM_BURST + 10
    finally:
        await box.close()
        await pub.close(0.1)


async def test_ooms_of_each_container_are_reported_even_over_the_budget():
    """Past the budget nothing is lost that matters: each container that OOMed gets its
    /tasks/oom (later), one per container however many events it had."""
    out: list[str] = []

    async def on_oom(cid: str) -> None:
        out.append(cid)

    r = exits.OOMReports(on_oom, rate=50.0, burst=2)
    try:
        for _ in range(1000):
            for cid in ("a", "b", "c", "d"):
                r.add(cid)
        await until(lambda: len(out) == 4, 2.0)
        assert sorted(out) == ["a", "b", "c", "d"]
        await asyncio.sleep(0.1)
        assert len(out) == 4 and r.merged == 4 * 999
        r.add("a")                        # a later OOM is a new report
        await until(lambda: len(out) == 5, 2.0)
    finally:
        await r.stop()


async def test_oom_publishes_keep_to_the_rate_after_the_burst():
    times: list[float] = []
    loop = asyncio.get_running_loop()

    async def on_oom(cid: str) -> None:
        times.append(loop.time())

    r = exits.OOMReports(on_oom, rate=20.0, burst=3)
    try:
        t0 = loop.time()
        while loop.time() - t0 < 0.5:
            r.add("c1")
            await asyncio.sleep(0.001)
        # 3 at once, then 20/s for 0.5 s (the last may be in flight)
        assert 3 + 8 <= len(times) <= 3 + 11, len(times)
    finally:
        await r.stop()


# --- log lines the guest causes -----------------------------------------------------------

async def test_guest_event_warnings_are_rate_limited(box, caplog):
    await box.run("c1")
    caplog.set_level(logging.WARNING, logger="spinbox.shim.exits")
    seq = box.follower.last_seq
    for _ in range(10_000):
        seq += 1
        box.follower.on_event(AgentEvent(seq, time.time_ns(), True, "exit", "c1", "", 99999, 0, 0))
    lines = [r.getMessage() for r in caplog.records if r.name == "spinbox.shim.exits"]
    gaps = [ln for ln in lines if "ring overflowed" in ln]
    pids = [ln for ln in lines if "pid 99999" in ln]
    assert 1 <= len(gaps) <= 10 and 1 <= len(pids) <= 10, (len(gaps), len(pids))


def test_log_throttle_counts_what_it_held_back(caplog):
    now = [0.0]
    t = LogThrottle(logging.getLogger("t.throttle"), burst=2, interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="t.throttle")
    sent = [t.warning("k", "odd %d", i) for i in range(100)]
    assert sent[:2] == [True, True] and not any(sent[2:])
    assert t.warning("other", "another message")        # keys are separate
    now[0] = 10.0
    assert t.warning("k", "odd %d", 100)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["odd 0", "odd 1", "another message", "odd 100 (98 similar messages suppressed)"]


def test_token_bucket():
    now = [0.0]
    b = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    assert b.wait_s() == pytest.approx(0.5)
    now[0] = 0.5
    assert b.take() and not b.take()
    now[0] = 100.0
    assert sum(b.take() for _ in range(10)) == 3     # never more than the burst
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


# --- the daemon's log: a reader that never reads ------------------------------------------

def _stuck_log_pipe() -> tuple[int, int]:
    """A pipe whose read end nobody reads: containerd's log FIFO with a stuck reader."""
    r, w = os.pipe()
    return r, w


async def test_logging_into_a_log_nobody_reads_never_blocks_the_event_loop():
    r, w = _stuck_log_pipe()
    handler = NonBlockingHandler(w, max_queued_bytes=256 << 10)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("t.stuck-log")
    logger.propagate = False
    logger.addHandler(handler)
    ticks = 0

    async def rpc() -> None:            # what the loop must keep doing: answering
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    async def log_10k() -> None:
        for i in range(10_000):
            logger.warning("guest said something odd: %d %s", i, "x" * 150)
            if i % 100 == 0:
                await asyncio.sleep(0)

    ticker = asyncio.ensure_future(rpc())
    try:
        t0 = time.monotonic()
        await log_10k()
        took = time.monotonic() - t0
        await asyncio.sleep(0.05)
        tracemalloc.start()         # a second round, for its memory (tracemalloc is slow)
        try:
            await log_10k()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        ticker.cancel()
        logger.removeHandler(handler)
    assert took < 2.0, f"10k log records took {took:.2f} s"
    assert ticks > 10, "the event loop stalled"
    assert peak < 1 << 20, peak
    assert handler.queued_bytes <= 256 << 10 and handler.dropped > 0
    # the reader comes back: what was queued goes out, then the count of what was dropped
    got = bytearray()
    os.set_blocking(r, False)

    def counted() -> int:
        return sum(int(n) for n in re.findall(rb"spinbox-shim: (\d+) log lines dropped", got))

    deadline = time.monotonic() + 5
    while counted() < handler.dropped and time.monotonic() < deadline:
        try:
            got += os.read(r, 1 << 20)
        except BlockingIOError:
            time.sleep(0.01)
    assert b"guest said something odd: 0 " in got
    assert counted() == handler.dropped
    handler.close()
    os.close(r)
    os.close(w)


def test_a_log_handler_that_cannot_write_does_not_take_the_caller_down():
    r, w = os.pipe()
    os.close(r)                          # the reader is gone: EPIPE (SIGPIPE is ignored by Python)
    handler = NonBlockingHandler(w)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for i in range(100):
        handler.emit(logging.makeLogRecord({"msg": f"line {i}"}))
    handler.flush()
    assert handler.queued_bytes == 0 and handler.write_errors >= 1
    handler.close()
    os.close(w)


def test_the_daemon_logs_through_the_non_blocking_handler(monkeypatch):
    installed: list[logging.Handler] = []
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(os, "dup2", lambda fd, fd2: None)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(logging, "raiseExceptions", logging.raiseExceptions)
    r, w = os.pipe()
    try:
        daemon.setup_logging(w, False, "ns", "g")
        installed = list(root.handlers)
    finally:
        for h in installed:
            h.close()
        os.close(r)
    assert [type(h) for h in installed] == [NonBlockingHandler]


# --- QMP events: a guest raises them at will ----------------------------------------------

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}


async def fake_qmp_server(path: str, flood: int, last_event: dict | None = None):
    """A QMP server: greeting, capabilities, then for each `query-status` `flood` RTC_CHANGE
    events (and `last_event`) before the reply."""
    event = json.dumps({"event": "RTC_CHANGE", "data": {"offset": 1},
                        "timestamp": {"seconds": 1, "microseconds": 0}}).encode() + b"\n"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(msg: dict) -> None:
            writer.write(json.dumps(msg).encode() + b"\n")

        send(GREETING)
        buf, decoder = "", json.JSONDecoder()
        while chunk := await reader.read(4096):     # qemu.qmp sends JSON without newlines
            buf += chunk.decode()
            while buf.strip():
                try:
                    req, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break                           # the rest of it is still on its way
                buf = buf.lstrip()[end:]
                if req["execute"] == "query-status":
                    for i in range(0, flood, 1000):
                        writer.write(event * min(1000, flood - i))
                        await writer.drain()
                    if last_event is not None:
                        send(last_event)
                    send({"return": {"status": "running", "running": True}, "id": req.get("id")})
                else:
                    send({"return": {}, "id": req.get("id")})
                await writer.drain()

    return await asyncio.start_unix_server(serve, path)


@pytest.mark.parametrize("flood, measure", [(20_000, False), (5_000, True)])
async def test_qmp_events_nobody_reads_are_bounded(tmp_path, flood, measure):
    """(qemu.qmp takes ~50 us per event, ~8x that under tracemalloc: memory on a smaller flood.)"""
    from spinbox.shim.vm.qmp import DEFAULT_KEPT, QMPClient
    sock = str(tmp_path / "qmp.sock")
    server = await fake_qmp_server(sock, flood)
    client = QMPClient("flood")
    try:
        await client.connect(sock)
        if measure:
            tracemalloc.start()
        try:
            r = await asyncio.wait_for(client.execute("query-status"), 40)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r["status"] == "running"               # replies still come through
        assert not client.events.history and client.events.pending <= DEFAULT_KEPT
        assert client.events.dropped == flood - DEFAULT_KEPT
        assert client.events.received == flood
        assert peak < 1 << 20, f"{flood} QMP events held {peak} bytes at the peak"
    finally:
        await client.disconnect()
        server.close()
        await server.wait_closed()


async def test_a_waited_for_qmp_event_arrives_through_a_flood(tmp_path):
    from spinbox.shim.vm.qmp import QMPClient
    sock = str(tmp_path / "qmp.sock")
    deleted = {"event": "DEVICE_DELETED", "data": {"device": "vfs-x", "path": "/machine/peripheral/vfs-x"},
               "timestamp": {"seconds": 1, "microseconds": 0}}
    server = await fake_qmp_server(sock, 20_000, deleted)
    client = QMPClient("flood")
    try:
        await client.connect(sock)
        with client.listener("DEVICE_DELETED") as events:
            await asyncio.wait_for(client.execute("query-status"), 30)
            ev = await asyncio.wait_for(events.get(), 5)
            assert ev["data"]["device"] == "vfs-x"
            assert events.pending == 0 and not events.history
    finally:
        await client.disconnect()
        server.close()
        await server.wait_closed()


async def _lose_c1s_exit(box, monkeypatch, answer) -> list[tuple[str, str]]:
    """c1 runs, then its exit is dropped in the guest's ring (a gap is all the shim sees);
    the guest's State calls go to `answer(pid, asked)`. Returns the (id, exec_id) asked."""
    monkeypatch.setattr(exits, "RECONCILE_INTERVAL_S", 0.01)
    await box.run("c1")
    pid = box.agent.procs[("c1", "")].pid
    asked: list[tuple[str, str]] = []

    async def state(id: str, exec_id: str = "", **kw):
        asked.append((id, exec_id))
        return answer(id, exec_id, pid, asked)

    box.agent.state = state
    for s in box.agent.outputs:
        s.end()
    box.agent.push("oom", "c1", gap=True)         # the exit itself was dropped in the ring
    return asked


def _stopped(id: str, exec_id: str, pid: int, asked: list) -> object:
    from spinbox.shim.agent.records import ProcessState
    return ProcessState(id, exec_id, pid, 3, False, 5, time.time_ns(), False, False, False)


async def test_an_exit_lost_in_an_event_gap_is_recovered_from_the_guest_state(box, monkeypatch):
    """The guest's ring overflowed (a flood) and took c1's exit with it: after the gap the
    follower asks the guest, and the exit reaches containerd with its real status."""
    asked = await _lose_c1s_exit(box, monkeypatch, _stopped)
    await until(lambda: "/tasks/exit" in box.pub.topics("c1"), 5.0)
    assert asked == [("c1", "")] and box.follower.reconciled == 1


async def test_a_state_query_that_fails_after_a_gap_is_asked_again(box, monkeypatch):
    """A busy guest may not answer the State query of the reconcile pass in time (seen under
    the hostile agent's flood): the process is asked again on a later pass, or its lost exit
    would never reach containerd and its Wait would hang."""
    def first_times_out(id: str, exec_id: str, pid: int, asked: list) -> object:
        if len(asked) == 1:
            raise TimeoutError()
        return _stopped(id, exec_id, pid, asked)

    asked = await _lose_c1s_exit(box, monkeypatch, first_times_out)
    await until(lambda: "/tasks/exit" in box.pub.topics("c1"), 5.0)
    assert asked == [("c1", ""), ("c1", "")] and box.follower.reconciled == 1
