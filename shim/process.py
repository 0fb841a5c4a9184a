"""Host-side view of each container and exec: state machine, exit info, waiters, exit ordering.

No I/O here: the Task service drives these objects, the guest is the source of truth for
exits, and `ExitSequencer` decides *when* an exit may be reported to containerd:

* a process's `/tasks/exit` only after its `/tasks/start` or `/tasks/exec-started` went out
  (an exit can race the Start reply: the guest may report it first),
* only after its stdout/stderr were written into containerd's FIFOs (bounded wait),
* per container in arrival order, exec exits before the init's exit (bounded wait for the
  execs that are still running when the init exit arrives).

Waiters (`Wait` RPCs) wake up at the moment the exit event is published, never before, so a
client that sees Wait return finds the exit event already queued behind the start event.

Errors are ttrpc status errors with the codes containerd expects (NOT_FOUND "process already
finished" for a kill of a finished process, FAILED_PRECONDITION for a bad transition).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import ttrpc

log = logging.getLogger("spinbox.shim.process")

UNKNOWN_EXIT_STATUS = 255       # containerd's "exit status unknown"
START_EVENT_TIMEOUT = 10.0      # an exit waits at most this long for its start event
DRAIN_TIMEOUT = 30.0            # ... for its output to reach the FIFOs
EXEC_EXITS_BEFORE_INIT = 5.0    # ... the init's exit for the exits of running execs


class Status(enum.IntEnum):
    """containerd.v1.types.Status numbers."""
    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


def signal_exit_status(signo: int) -> int:
    """Exit status containerd reports for a process killed by `signo` (128 + signal)."""
    return 128 + signo


@dataclass(frozen=True)
class ExitInfo:
    pid: int
    status: int
    at_ns: int

    @staticmethod
    def unknown(pid: int) -> "ExitInfo":
        return ExitInfo(pid, UNKNOWN_EXIT_STATUS, time.time_ns())


@dataclass(frozen=True)
class StdioPaths:
    """What containerd gave us: FIFO paths or URIs, "" = not connected."""
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Process:
    """One container init or exec as the shim sees it."""

    def __init__(self, container_id: str, exec_id: str, stdio: StdioPaths) -> None:
        self.container_id = container_id
        self.exec_id = exec_id                  # "" = the container's init
        self.stdio = stdio
        self.pid = 0
        self.status = Status.CREATED
        self.deleted = False
        self.exit: ExitInfo | None = None
        self._exited = asyncio.Event()
        self.start_published = asyncio.Event()  # /tasks/start or /tasks/exec-started is out
        self.exit_arrived = False               # the guest reported the exit (maybe unpublished)
        self.io = None                          # stdio pumps (shim.stdio.ProcessIO), if any

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    @property
    def event_id(self) -> str:
        """TaskExit.id: the exec id, or the container id for the init."""
        return self.exec_id or self.container_id

    @property
    def exited(self) -> bool:
        return self.exit is not None

    # --- transitions ----------------------------------------------------------------------

    def check_start(self) -> None:
        if self.deleted:
            raise ttrpc.NotFound(f"process {self.name} was deleted")
        if self.status != Status.CREATED or self.exit_arrived:
            what = "has exited" if (self.exited or self.exit_arrived) else f"is {self.status.name.lower()}"
            raise ttrpc.FailedPrecondition(f"process {self.name} {what}: cannot start it")

    def started(self, pid: int) -> None:
        self.pid = pid
        if self.status == Status.CREATED and not self.exited:
            self.status = Status.RUNNING

    def check_kill(self) -> None:
        if self.deleted or self.exited or self.exit_arrived:
            raise ttrpc.NotFound(f"process {self.name}: process already finished")

    def check_delete(self) -> None:
        if self.deleted:
            raise ttrpc.NotFound(f"process {self.name} was already deleted")
        if self.status in (Status.RUNNING, Status.PAUSED, Status.PAUSING) and not self.exited:
            raise ttrpc.FailedPrecondition(f"cannot delete a running process ({self.name}); kill it first")

    def set_exited(self, info: ExitInfo) -> None:
        if self.exit is not None:
            return
        if self.pid == 0:
            self.pid = info.pid
        self.exit = info
        self.status = Status.STOPPED
        self._exited.set()

    def mark_deleted(self) -> None:
        self.deleted = True
        if self.exit is None:
            # Deleted while only created: it never ran; waiters get containerd's "unknown".
            self.set_exited(ExitInfo.unknown(self.pid))

    async def wait(self) -> ExitInfo:
        await self._exited.wait()
        assert self.exit is not None
        return self.exit


class Container:
    """A container: its init process, its execs, and what was set up for it on the host."""

    def __init__(self, id: str, bundle: str, stdio: StdioPaths) -> None:
        self.id = id
        self.bundle = bundle
        self.init = Process(id, "", stdio)
        self.execs: dict[str, Process] = {}
        self.paused = False
        self.rootfs = None      # shim.rootfs.RootfsMount
        self.shares: list = []  # sandbox shares made for this container (rootfs, binds)
        self.sequencer: ExitSequencer | None = None

    def process(self, exec_id: str = "") -> Process:
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise ttrpc.NotFound(f"exec {exec_id} of container {self.id} does not exist")
        return p

    def add_exec(self, exec_id: str, stdio: StdioPaths) -> Process:
        if not exec_id:
            raise ttrpc.InvalidArgument("exec id must not be empty")
        if exec_id in self.execs:
            raise ttrpc.AlreadyExists(f"id {exec_id}: exec already exists in container {self.id}")
        if self.init.deleted or self.init.exited or self.init.exit_arrived:
            raise ttrpc.FailedPrecondition(f"container {self.id} init process is not running")
        p = Process(self.id, exec_id, stdio)
        self.execs[exec_id] = p
        return p

    def check_exec_start(self) -> None:
        if self.init.status != Status.RUNNING and not self.paused or self.init.exited or self.init.exit_arrived:
            raise ttrpc.FailedPrecondition(f"container {self.id} init process is not running")

    def status_of(self, p: Process) -> Status:
        """The status containerd sees: running processes of a paused container are paused."""
        if p.status == Status.RUNNING and self.paused:
            return Status.PAUSED
        return p.status

    def check_pause(self) -> None:
        if self.init.exited or self.init.exit_arrived or self.init.status != Status.RUNNING:
            raise ttrpc.FailedPrecondition(f"container {self.id} is {self.status_of(self.init).name.lower()}: cannot pause")
        if self.paused:
            raise ttrpc.FailedPrecondition(f"container {self.id} is already paused")

    def check_resume(self) -> None:
        if not self.paused:
            raise ttrpc.FailedPrecondition(f"container {self.id} is not paused")

    def live_execs(self) -> list[Process]:
        """Execs that were started and whose exit has not been reported yet."""
        return [p for p in self.execs.values() if p.pid and not p.exited]


PublishExit = Callable[[Process, ExitInfo], Awaitable[None]]
DrainWait = Callable[[Process, float], Awaitable[bool]]


async def _no_drain(p: Process, timeout: float) -> bool:
    return True


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
                 exec_grace: float = EXEC_EXITS_BEFORE_INIT) -> None:
        self._publish_exit = publish_exit
        self._drain = drain
        self.start_timeout = start_timeout
        self.drain_timeout = drain_timeout
        self.exec_grace = exec_grace
        self._queue: list[_Pending] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.container: Container | None = None    # for "running execs" when the init exits

    def submit(self, process: Process, info: ExitInfo) -> None:
        """The guest reported `process`'s exit. Duplicates (a replayed event) are ignored."""
        if process.exit_arrived or process.exited:
            return
        process.exit_arrived = True
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
        deadline = asyncio.get_running_loop().time() + self.exec_grace
        while True:
            pending = [p for p in c.live_execs() if not p.exit_arrived]
            if not pending or any(item.process.exec_id for item in self._queue):
                return
            left = deadline - asyncio.get_running_loop().time()
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
