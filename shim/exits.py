"""From the guest's events to containerd's /tasks/exit and /tasks/oom, in containerd's order.

* `TaskEvents`: publishes task events in the namespace of the container they are about, and
  never fails the caller (a lost event is logged; containerd's own shim does the same).
* `ExitSequencer`, one per container, decides *when* an exit may be reported:
  - a process's /tasks/exit only after its /tasks/start or /tasks/exec-started went out (an
    exit can race the Start reply: the guest may report it first);
  - only after its stdout/stderr were written into containerd's FIFOs (bounded wait);
  - per container in arrival order, exec exits before the init's exit (bounded wait for the
    execs that are still running when the init's exit arrives).
* `GuestEventFollower` reads the agent's event stream and hands exits to the sequencers; when
  the sandbox is lost it reports every live process as exited with the "unknown" status, so
  Wait returns and containerd can clean up.
* `OOMReports`: the guest raises OOM events at will, so they are coalesced per container (one
  pending /tasks/oom each, later ones merged into it) and published by one worker within a
  per-sandbox budget (a token bucket). What waits is a set of container ids, never a task or a
  message per event; exits do not go through it, so they never wait behind OOMs.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from spinbox.api import contract
from spinbox.api._pb.containerd.events import task_pb2 as ev

from .agent import AgentEvent
from .aio import race
from .agent.records import ProcessState
from .process import Container, ExitInfo, Process
from .ratelimit import LogThrottle, TokenBucket

log = logging.getLogger(__name__)

START_EVENT_TIMEOUT = 10.0      # an exit waits at most this long for its start event
DRAIN_TIMEOUT = 30.0            # ... for its output to reach the FIFOs
EXEC_EXITS_BEFORE_INIT = 5.0    # ... the init's exit for the exits of running execs
RESUBSCRIBE_DELAY_S = 0.5
RECONCILE_INTERVAL_S = 1.0      # after an event gap, the guest's process states at most this often
RECONCILE_CALL_TIMEOUT_S = 5.0  # ... each State call bounded
OOM_RATE = 5.0                  # /tasks/oom per second per sandbox, after a burst of
OOM_BURST = 20


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(ns))
    return t


def guest_exit(pid: int, status: int, at_ns: int) -> ExitInfo:
    """An exit as the guest reported it, clamped to what containerd can represent (the guest is
    untrusted); a missing or future time is now."""
    status = status if 0 <= status <= 255 else 255
    now = time.time_ns()
    at = at_ns if 0 < at_ns <= now + 60 * 10**9 else now
    return ExitInfo(pid if contract.is_valid_pid(pid) else 0, status, at)


class Publisher(Protocol):
    """containerd's event sink (shim.publisher.Publisher; tests record). Sync or async."""
    def publish(self, namespace: str, topic: str, event: Message) -> Awaitable[None] | None: ...


class TaskEvents:
    """Task events for containerd, each in the namespace its container was created in."""

    def __init__(self, publisher: Publisher | None, namespace: str) -> None:
        self.publisher = publisher
        self.namespace = namespace
        self._namespaces: dict[str, str] = {}

    def bind(self, container_id: str, namespace: str | None) -> None:
        self._namespaces[container_id] = namespace or self.namespace

    def unbind(self, container_id: str) -> None:
        self._namespaces.pop(container_id, None)

    async def publish(self, container_id: str, topic: str, msg: Message) -> None:
        if self.publisher is None:
            log.debug("no publisher: dropping %s", topic)
            return
        ns = self._namespaces.get(container_id, self.namespace)
        try:
            r = self.publisher.publish(ns, topic, msg)
            if inspect.isawaitable(r):
                await r
        except Exception as e:
            log.warning("publishing %s for %s failed: %s", topic, container_id, e)

    async def exit(self, p: Process, info: ExitInfo) -> None:
        await self.publish(p.container_id, "/tasks/exit", ev.TaskExit(
            container_id=p.container_id, id=p.event_id, pid=info.pid, exit_status=info.status,
            exited_at=timestamp(info.at_ns)))


PublishExit = Callable[[Process, ExitInfo], Awaitable[None]]
DrainWait = Callable[[Process, float], Awaitable[bool]]


async def _no_drain(p: Process, timeout: float) -> bool:
    return True


async def drain_output(p: Process, timeout: float) -> bool:
    """The production `DrainWait`: the process's output pumps are done (False = gave up)."""
    return True if p.io is None else await p.io.drained(timeout)


@dataclass
class _Pending:
    process: Process
    info: ExitInfo


class ExitSequencer:
    """Reports the exits of one container in order (see the module docstring).

    `publish_exit(process, info)` is called once per process, in the final order; the process is
    marked exited (waking `Wait`) right after it returns. `drain(process, timeout)` waits until
    the process's output reached the FIFOs (False = gave up).
    """

    def __init__(self, publish_exit: PublishExit, drain: DrainWait = _no_drain, *,
                 start_timeout: float = START_EVENT_TIMEOUT, drain_timeout: float = DRAIN_TIMEOUT,
                 exec_grace: float = EXEC_EXITS_BEFORE_INIT, container: Container | None = None) -> None:
        self._publish_exit = publish_exit
        self._drain = drain
        self.start_timeout = start_timeout
        self.drain_timeout = drain_timeout
        self.exec_grace = exec_grace
        self._queue: list[_Pending] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.container = container    # for "running execs" when the init exits

    def submit(self, process: Process, info: ExitInfo) -> None:
        """The guest reported `process`'s exit. Duplicates (a replayed event) are ignored."""
        if not process.exit_arrived():
            return
        self._queue.append(_Pending(process, info))
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    @property
    def idle(self) -> bool:
        return not self._queue and (self._task is None or self._task.done())

    def _next(self) -> _Pending:
        # Exec exits go before the init's exit even when they arrived after it.
        for i, item in enumerate(self._queue):
            if item.process.exec_id:
                if i > 0 and not self._queue[0].process.exec_id:
                    return self._queue.pop(i)
                break
        return self._queue.pop(0)

    async def _wait_for_exec_exits(self) -> None:
        c = self.container
        if c is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.exec_grace
        while True:
            pending = [p for p in c.live_execs() if p.allows("kill")]    # exit not arrived
            if not pending or any(item.process.exec_id for item in self._queue):
                return
            left = deadline - loop.time()
            if left <= 0:
                log.warning("container %s: init exited; execs %s reported no exit within %.0fs",
                            c.id, [p.exec_id for p in pending], self.exec_grace)
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def _run(self) -> None:
        while self._queue:
            if not self._queue[0].process.exec_id and not any(i.process.exec_id for i in self._queue):
                await self._wait_for_exec_exits()
            item = self._next()
            p = item.process
            try:
                await asyncio.wait_for(p.start_published.wait(), self.start_timeout)
            except asyncio.TimeoutError:
                # The Start RPC never completed (the guest ran it but the reply was lost).
                log.warning("%s: exit reported without a start event after %.0fs", p.name, self.start_timeout)
            if not await self._drain(p, self.drain_timeout):
                log.warning("%s: output not fully written to the FIFOs within %.0fs; reporting the exit",
                            p.name, self.drain_timeout)
            try:
                await self._publish_exit(p, item.info)
            except Exception:
                log.exception("%s: publishing the exit failed", p.name)
            p.set_exited(item.info)

    async def flush(self) -> None:
        """Wait until every submitted exit was reported."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        for item in self._queue:
            item.process.set_exited(item.info)
        self._queue.clear()


class EventSource(Protocol):
    """What the follower needs of a sandbox: its agent's event stream and its `lost` flag."""
    lost: asyncio.Event

    def guest_events(self, after_seq: int) -> AsyncIterator[AgentEvent]: ...


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` and wait for it to end; whatever it raised is its own business now."""
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass


class OOMReports:
    """The guest's OOM events as `on_oom(container_id)` calls, bounded (module docstring):
    pending ids are at most the containers that exist, publishes at most `burst` at once and
    `rate` per second per sandbox; a container's OOMs while its report waits are merged."""

    def __init__(self, on_oom: Callable[[str], Awaitable[None]], *, rate: float = OOM_RATE,
                 burst: int = OOM_BURST, throttle: LogThrottle | None = None) -> None:
        self._on_oom = on_oom
        self._bucket = TokenBucket(rate, burst)
        self._pending: dict[str, None] = {}      # insertion-ordered set of container ids
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._log = throttle or LogThrottle(log)
        self.published = 0
        self.merged = 0

    def add(self, container_id: str) -> None:
        if container_id in self._pending:
            self.merged += 1
            if self._bucket.wait_s() > 0:     # merging is normal; say so when over the budget
                self._log.warning("oom-over-budget", "guest OOM events over the budget of %d/s: %s's "
                                  "merged into its pending /tasks/oom (%d merged in this sandbox)",
                                  self._bucket.rate, container_id, self.merged)
            return
        self._pending[container_id] = None
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._bucket.wait_s()
            if delay > 0:
                await asyncio.sleep(delay)    # over budget: more OOMs merge meanwhile
                continue
            self._bucket.take()
            container_id = next(iter(self._pending))
            del self._pending[container_id]
            try:
                await self._on_oom(container_id)
                self.published += 1
            except Exception:
                log.exception("publishing the OOM of %s failed", container_id)

    async def stop(self) -> None:
        t, self._task = self._task, None
        await _cancel(t)
        self._pending.clear()


QueryState = Callable[[str, str], Awaitable[ProcessState]]


class GuestEventFollower:
    """Follows one sandbox's guest events for the containers in `containers` (see the module
    docstring). `on_oom(container_id)` publishes an OOM; `closing()` tells a lost sandbox from
    one we are stopping on purpose.

    A `gap` (the guest's event ring overflowed, e.g. under an OOM flood) may have swallowed
    exits, and a Wait would then never return: so after a gap the guest is asked for the state
    of every process whose exit has not arrived (`query_state`), at most once per
    RECONCILE_INTERVAL_S by one task, and a stopped one is reported as its exit event would
    have been. Gaps themselves cost nothing more: they only wake that task."""

    def __init__(self, containers: Mapping[str, Container], on_oom: Callable[[str], Awaitable[None]],
                 closing: Callable[[], bool], query_state: QueryState | None = None) -> None:
        self.containers = containers
        self.on_oom = on_oom
        self.closing = closing
        self.query_state = query_state
        self.last_seq = 0
        self._task: asyncio.Task[None] | None = None
        self._reconcile_wanted = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self.reconciled = 0             # exits recovered after gaps (for tests and the log)
        self._log = LogThrottle(log)        # lines the guest's events cause, per message
        self.ooms = OOMReports(on_oom, throttle=self._log)

    def start(self, source: EventSource) -> None:
        self._task = asyncio.ensure_future(self._follow(source))

    async def stop(self) -> None:
        t, self._task = self._task, None
        await _cancel(t)
        r, self._reconciler = self._reconciler, None
        await _cancel(r)
        await self.ooms.stop()

    def _want_reconcile(self) -> None:
        if self.query_state is None:
            return
        self._reconcile_wanted.set()
        if self._reconciler is None or self._reconciler.done():
            self._reconciler = asyncio.ensure_future(self._reconcile_loop())

    async def _reconcile_loop(self) -> None:
        while self._reconcile_wanted.is_set():
            self._reconcile_wanted.clear()
            await self.reconcile()
            await asyncio.sleep(RECONCILE_INTERVAL_S)   # gaps meanwhile: one more pass, later

    async def reconcile(self) -> None:
        """Ask the guest about every process whose exit has not arrived; report the stopped."""
        assert self.query_state is not None
        for c in list(self.containers.values()):
            for p in c.processes():
                if not p.allows("kill") or p.deleted or c.sequencer is None or not p.pid:
                    continue
                try:
                    st = await asyncio.wait_for(self.query_state(c.id, p.exec_id), RECONCILE_CALL_TIMEOUT_S)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    # Asked again on the next pass (one per RECONCILE_INTERVAL_S): its exit may
                    # be lost for good otherwise, and its Wait (ctr task exec) would never end.
                    self._reconcile_wanted.set()
                    self._log.warning("reconcile", "after an event gap, the state of %s is unknown "
                                      "(asked again): %s: %s", p.name, type(e).__name__, e)
                    continue
                if st.pid and p.pid and st.pid != p.pid:
                    # as for an exit event: a stopped process of another pid is not this one
                    # (the fuzz target `events` found its pid published as this process's)
                    self._log.warning("pid-mismatch", "after an event gap, the guest reported pid %d for %s "
                                      "(pid %d): ignored", st.pid, p.name, p.pid)
                    continue
                if st.status_name == "stopped" and p.allows("kill"):
                    log.info("%s: its exit was lost in an event gap; reported from its state (status %d)",
                             p.name, st.exit_status)
                    self.reconciled += 1
                    c.sequencer.submit(p, guest_exit(st.pid or p.pid, st.exit_status, st.exited_at_ns))

    async def _follow(self, source: EventSource) -> None:
        # The event stream itself may wait forever on a dead VM's channel, so it is raced
        # against `source.lost`, the VM layer's verdict (QEMU exited).
        await race(self._consume(source), source.lost.wait())
        if not self.closing():
            await self.report_lost()

    async def _consume(self, source: EventSource) -> None:
        """Resubscribes after a hiccup (no event is lost: the agent keeps a ring and we ask for
        everything after the last seq we saw)."""
        while not source.lost.is_set():
            try:
                async for e in source.guest_events(self.last_seq):
                    self.on_event(e)
                return          # the agent client was closed
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if source.lost.is_set():
                    return
                self._log.warning("resubscribe", "agent event stream failed (%s); resubscribing", e)
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)

    def on_event(self, e: AgentEvent) -> None:
        """One event (already validated by the agent client)."""
        if e.seq <= self.last_seq:
            return                     # replay after a resubscribe
        self.last_seq = e.seq
        if e.gap:
            self._log.warning("gap", "agent event ring overflowed: some events were lost before seq %d", e.seq)
            self._want_reconcile()
        c = self.containers.get(e.id)
        if c is None:
            return
        if e.kind == "exit":
            p = c.execs.get(e.exec_id) if e.exec_id else c.init
            if p is None or p.deleted or c.sequencer is None:
                return
            if p.pid and e.pid and e.pid != p.pid:
                self._log.warning("pid-mismatch", "agent reported exit of pid %d for %s (pid %d): ignored",
                                  e.pid, p.name, p.pid)
                return
            c.sequencer.submit(p, guest_exit(e.pid or p.pid, e.exit_status, e.exited_at_ns))
        elif e.kind == "oom":
            self.ooms.add(e.id)

    async def report_lost(self) -> None:
        """The agent is gone (VM died): every process that has not exited is reported exited with
        containerd's "unknown" status. Their output streams can never end now: they are closed
        first (containerd's readers see EOF) so the exits do not wait for a drain that cannot
        happen."""
        log.error("sandbox lost: reporting every live process as exited (status %d)",
                  ExitInfo.unknown(0).status)
        for c in list(self.containers.values()):
            for p in c.processes():
                if p.io is not None and not p.exited:
                    await p.io.close()
        for c in list(self.containers.values()):
            for p in c.processes():
                if p.allows("kill") and c.sequencer is not None:     # exit not arrived yet
                    p.start_published.set()          # no start event can come now
                    c.sequencer.submit(p, ExitInfo.unknown(p.pid))
