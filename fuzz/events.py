"""Target `events`: the guest's event stream as the shim follows it. The real `AgentClient`
(`events()`, `_event_from`) reads a Subscribe stream from a scripted hostile guest over a real
connection, and a real `GuestEventFollower` (shim/exits.py) with one real `ExitSequencer` per
container turns what it yields into published exits and OOMs.

The guest sends sequences of events: well-formed ones with wrong or unknown ids, hostile ids,
pids that are not the process's (or huge, or 0), statuses and times off the edges, seqs that
repeat, go back, jump or overflow, gaps, OOM floods of a few hundred, malformed payloads
(fuzz/messages.py) and raw bytes; then the stream ends with a status (hostile code and
message), a hang-up, or nothing. A gap makes the follower ask the state of live processes:
`query_state` answers from the input (stopped, running, or fails). Each input ends either with
the sandbox lost (every live process must then be reported exited) or closed on purpose.

Invariants: the follower's task never dies of an exception and no task leaks one; a published
exit is about a process we have, at most once per process, with a status 0..255 and a pid that
is the process's own (or 0), and only if the guest named that process in an exit event with
its pid (or 0), a state query said it stopped, or the sandbox was lost; an OOM is published
only for a container we have and the guest named; the OOM publisher holds at most one pending
report per container and stays within its budget; the exit queues hold at most one entry per
process; log lines caused by the guest stay bounded (the throttles).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from ttrpc.frame import Flags, MessageType

from spinbox.api import contract
from spinbox.api._pb.spinbox.agent.v1 import events_pb2 as epb
from spinbox.shim import exits
from spinbox.shim.agent import AgentError, AgentUnavailable
from spinbox.shim.agent.records import ProcessState
from spinbox.shim.process import Container, ExitInfo, Process, StdioPaths

from . import messages
from .data import Input
from .driver import AsyncHarness, Finding, Target
from .guest import GuestLink, next_request, response
from .replies import CODES, MESSAGES, check_error

SENTINEL = "zz-fuzz-sentinel"          # an OOM for no container we have: "the script is over"
SENTINEL_SEQ = (1 << 64) - 1
SETTLE_S = 0.5                         # how long the follower may take to reach the sentinel
FLUSH_S = 1.0
IDS = ("c1", "c2", "c3", "e1", "e2", "", "c4", "..", "c1/e1", "c1\n", "a" * 77, SENTINEL)
EXEC_IDS = ("", "e1", "e2", "e3", "c1", "..", "e1\0")
MAX_LOG_LINES = 400                    # per input: what the throttles let through, generously


class _CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class _Script:
    """What the guest sent and answered, in the follower's terms."""

    def __init__(self) -> None:
        self.exit_named: set[tuple[str, str]] = set()     # (id, exec id) named with a fitting pid
        self.oom_named: set[str] = set()
        self.stopped: set[tuple[str, str]] = set()         # a state query said stopped


class _Source:
    """The follower's `EventSource`: the agent client's events, noting when the sentinel passed
    (after the follower handled it: a generator resumes when its consumer asks for more)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.lost = asyncio.Event()
        self.settled = asyncio.Event()

    async def guest_events(self, after_seq: int) -> Any:
        try:
            async for e in self.agent.events(after_seq):
                yield e
                if e.id == SENTINEL:
                    self.settled.set()
        finally:
            self.settled.set()


def _sandbox(inp: Input, published: list[tuple[Process, ExitInfo]]) -> dict[str, Container]:
    """c1 (running init pid 100, exec e1 running pid 101, exec e2 created), c2 (running, pid
    200), c3 (created, pid 300); some start events still pending (the exit waits for them)."""
    async def publish_exit(p: Process, info: ExitInfo) -> None:
        published.append((p, info))

    containers: dict[str, Container] = {}
    for cid, pid, start in (("c1", 100, True), ("c2", 200, True), ("c3", 300, False)):
        c = Container(cid, f"/nonexistent/{cid}", StdioPaths())
        c.sequencer = exits.ExitSequencer(publish_exit, start_timeout=0.05, drain_timeout=0.05,
                                          exec_grace=0.05, container=c)
        if start:
            c.init.started(pid)
        else:
            c.init.pid = pid
        containers[cid] = c
    c1 = containers["c1"]
    e1 = c1.add_exec("e1", StdioPaths())
    e1.started(101)
    c1.add_exec("e2", StdioPaths())
    for c in containers.values():
        for p in c.processes():
            if p.pid and not inp.chance(6):
                p.start_published.set()
    return containers


class EventsHarness(AsyncHarness):
    def __init__(self) -> None:
        super().__init__(time_bound_s=4.0)
        self.link: GuestLink | None = None
        self.logs = _CountingHandler()
        self._loggers = [logging.getLogger(n) for n in ("spinbox.shim", "ttrpc")]
        self._saved = [(lg.propagate, lg.level) for lg in self._loggers]
        for lg in self._loggers:           # the guest's lines are counted, not printed
            lg.addHandler(self.logs)
            lg.propagate = False
            lg.setLevel(logging.INFO)

    async def run(self, inp: Input) -> None:
        if self.link is None:
            self.link = GuestLink()
        agent, guest = await self.link.connect()
        published: list[tuple[Process, ExitInfo]] = []
        ooms: list[str] = []
        script = _Script()
        containers = _sandbox(inp, published)
        pids = {(c.id, p.exec_id): p.pid for c in containers.values() for p in c.processes()}

        async def on_oom(cid: str) -> None:
            ooms.append(cid)

        query_plan = [inp.byte() for _ in range(8)]

        async def query_state(cid: str, exec_id: str) -> ProcessState:
            b = query_plan.pop(0) if query_plan else 0
            if b % 5 == 0:
                raise AgentUnavailable("fuzz: no answer")
            if b % 5 == 1:
                raise TimeoutError
            stopped = b % 5 in (2, 3)
            if stopped:
                script.stopped.add((cid, exec_id))
            return ProcessState(cid, exec_id, pids.get((cid, exec_id), 0) if b & 0x80 else b, 3 if stopped else 2,
                                False, b % 256, b * 10**9, False, False, False)

        closing = inp.flag()
        follower = exits.GuestEventFollower(containers, on_oom, lambda: closing, query_state=query_state)
        source = _Source(agent)
        self.logs.count = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        follower.start(source)
        try:
            got = await next_request(guest)
            if got is None:
                raise Finding("the follower did not subscribe")
            frame, req = got
            if req.method != "Subscribe":
                raise Finding(f"the follower sent {req.method}, not Subscribe")
            sid = frame.stream_id
            self._send_events(inp, guest, sid, script, pids)
            guest.send(sid, MessageType.DATA, 0, epb.Event(seq=SENTINEL_SEQ, oom=epb.OomEvent(id=SENTINEL))
                       .SerializeToString())
            await guest.drain()
            try:
                await asyncio.wait_for(source.settled.wait(), SETTLE_S)
            except TimeoutError:
                pass     # the input used the last seq itself, or ended the stream in a way we wait out
            self._end_stream(inp, guest, sid)
            await guest.drain()
            await asyncio.sleep(0)
            self._check_alive(follower)
            self._check_bounds(follower, containers, ooms, loop.time() - started)
            if not closing:
                source.lost.set()          # QEMU exited: every live process must be reported
            await asyncio.sleep(0)
            for _ in range(3):             # the follower reaches report_lost in a few turns
                await asyncio.sleep(0)
            self._check_alive(follower)
            for c in containers.values():
                assert c.sequencer is not None
                try:
                    await asyncio.wait_for(c.sequencer.flush(), FLUSH_S)
                except TimeoutError:
                    raise Finding(f"{c.id}: exits not reported within {FLUSH_S}s") from None
        finally:
            await follower.stop()
            await agent.close()
            guest.close()
        self._check_published(containers, published, ooms, script, pids, lost=not closing)
        if self.logs.count > MAX_LOG_LINES:
            raise Finding(f"{self.logs.count} log lines for one input (bound {MAX_LOG_LINES})")

    def _send_events(self, inp: Input, guest: Any, sid: int, script: _Script,
                     pids: dict[tuple[str, str], int]) -> None:
        seq = inp.below(4)
        for _ in range(inp.below(48)):
            how = inp.below(16)
            if how == 0:
                data = messages.hostile(epb.Event, inp, pool=IDS)
                # whatever it says may be taken as an exit or an OOM: note what it names
                try:
                    self._note(epb.Event.FromString(data), script, pids)
                except Exception:
                    pass
                guest.send(sid, MessageType.DATA, inp.pick((0, 0, 0, Flags.NO_DATA)), data)
                continue
            if how == 1:                                      # an OOM flood
                cid = inp.pick(IDS)
                script.oom_named.add(cid)
                for _ in range(inp.below(300)):
                    seq += 1
                    guest.send(sid, MessageType.DATA, 0, epb.Event(seq=seq, oom=epb.OomEvent(id=cid))
                               .SerializeToString())
                continue
            step = inp.pick((1, 1, 1, 1, 0, -1, -3, 2, 100, 1 << 32))
            seq = min(max(0, seq + step), SENTINEL_SEQ - 1)
            msg = epb.Event(seq=seq, timestamp_ns=inp.pick((0, 1, 10**18, -1, (1 << 63) - 1)),
                            gap=inp.chance(6))
            if inp.flag():
                cid = inp.pick(IDS)
                exec_id = inp.pick(EXEC_IDS)
                pid = inp.pick((pids.get((cid, exec_id), 0), pids.get((cid, exec_id), 0), 0, 1,
                                contract.PID_MAX - 1, contract.PID_MAX, 101, (1 << 32) - 1))
                msg.exit.CopyFrom(epb.ExitEvent(id=cid, exec_id=exec_id, pid=pid,
                                                exit_status=inp.pick((0, 1, 137, 255, 256, (1 << 32) - 1, 1 << 30)),
                                                exited_at_ns=inp.pick((0, 1, 10**18, -5, 1 << 62))))
            elif inp.flag():
                msg.oom.CopyFrom(epb.OomEvent(id=inp.pick(IDS)))
            self._note(msg, script, pids)
            data = msg.SerializeToString()
            if inp.chance(12):
                data = messages.mutate(data, inp)
            guest.send(sid, MessageType.DATA, 0, data)

    @staticmethod
    def _note(msg: epb.Event, script: _Script, pids: dict[tuple[str, str], int]) -> None:
        kind = msg.WhichOneof("event")
        # a process without a pid yet (its Start reply may come after the exit) takes any pid
        if kind == "exit" and (msg.exit.pid == 0 or pids.get((msg.exit.id, msg.exit.exec_id)) in (0, msg.exit.pid)):
            script.exit_named.add((msg.exit.id, msg.exit.exec_id))
        elif kind == "oom":
            script.oom_named.add(msg.oom.id)

    @staticmethod
    def _end_stream(inp: Input, guest: Any, sid: int) -> None:
        how = inp.below(4)
        if how == 0:
            code = inp.pick(CODES)
            guest.send(sid, MessageType.RESPONSE, 0, response(code, inp.pick(MESSAGES) if code else "", b""))
        elif how == 1:
            guest.close()
        elif how == 2:
            guest.send(sid, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"")
        # else: the guest goes quiet

    @staticmethod
    def _check_alive(follower: exits.GuestEventFollower) -> None:
        t = follower._task
        if t is not None and t.done() and not t.cancelled() and t.exception() is not None:
            e = t.exception()
            assert e is not None
            if isinstance(e, AgentError):
                check_error(e, "events")
            raise Finding(f"the event follower died: {type(e).__name__}: {e}") from e

    @staticmethod
    def _check_bounds(follower: exits.GuestEventFollower, containers: dict[str, Container],
                      ooms: list[str], elapsed: float) -> None:
        pending = follower.ooms._pending
        if len(pending) > len(containers) or not set(pending) <= set(containers):
            raise Finding(f"OOM reports pending for {list(pending)[:5]} ({len(pending)})")
        budget = exits.OOM_BURST + exits.OOM_RATE * elapsed + 1
        if len(ooms) > budget:
            raise Finding(f"{len(ooms)} OOMs published in {elapsed:.2f}s (budget {budget:.0f})")
        for c in containers.values():
            assert c.sequencer is not None
            if len(c.sequencer._queue) > len(c.processes()):
                raise Finding(f"{c.id}: {len(c.sequencer._queue)} exits queued for {len(c.processes())} processes")

    @staticmethod
    def _check_published(containers: dict[str, Container], published: list[tuple[Process, ExitInfo]],
                         ooms: list[str], script: _Script, pids: dict[tuple[str, str], int], *,
                         lost: bool) -> None:
        ours = {id(p): (c, p) for c in containers.values() for p in c.processes()}
        seen: set[int] = set()
        for p, info in published:
            if id(p) not in ours:
                raise Finding(f"exit published for a process we do not have: {p.name}")
            if id(p) in seen:
                raise Finding(f"{p.name}: exit published twice")
            seen.add(id(p))
            if not 0 <= info.status <= 255:
                raise Finding(f"{p.name}: exit status {info.status} published")
            key = (p.container_id, p.exec_id)
            if pids[key] and info.pid not in (0, pids[key]):
                raise Finding(f"{p.name} (pid {pids[key]}): exit published with pid {info.pid}")
            if not lost and key not in script.exit_named and key not in script.stopped:
                raise Finding(f"{p.name}: exit published though the guest never reported it")
        for cid in ooms:
            if cid not in containers or cid not in script.oom_named:
                raise Finding(f"OOM published for {cid!r}")
        if lost:
            left = [p.name for c in containers.values() for p in c.processes() if p.allows("kill")]
            if left:
                raise Finding(f"sandbox lost, yet no exit reported for {left}")

    def close(self) -> None:
        if self.link is not None:
            self.loop.run_until_complete(self.link.close())
        for lg, (propagate, level) in zip(self._loggers, self._saved, strict=True):
            lg.removeHandler(self.logs)
            lg.propagate = propagate
            lg.setLevel(level)
        super().close()


def seeds() -> list[bytes]:
    return [b"", bytes(range(64)), b"\x01\x00\x05" + b"\x02\x01" * 30, b"\x00\x02\x10\x01\x01" + b"\xff" * 40,
            bytes(range(255, 0, -2)), b"\x01\x01\x00\x20" + bytes(12) + b"\x01\x80" * 8]


TARGET = Target("events", "the guest event stream: AgentClient.events and GuestEventFollower with real "
                "exit sequencers, fed hostile event sequences by a scripted guest",
                EventsHarness, seeds, weight=0.6, time_bound_s=4.0, memory_bound_mb=48, smoke_inputs=400)
