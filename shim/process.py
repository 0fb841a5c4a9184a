"""Host-side records of each container and exec: state (shim.states), exit info, waiters.

No I/O here. The guest is the source of truth for exits; shim.exits decides *when* an exit is
reported to containerd. Waiters (`Wait` RPCs) wake up at the moment the exit event is
published, never before, so a client that sees Wait return finds the exit event already
queued behind the start event.
"""
from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import AlreadyExists, InvalidArgument, NotFound
from .states import ProcessMachine, ProcessState

if TYPE_CHECKING:
    from .exits import ExitSequencer
    from .rootfs import RootfsMount
    from .stdio import ProcessIO

UNKNOWN_EXIT_STATUS = 255       # containerd's "exit status unknown"


class Status(enum.IntEnum):
    """containerd.v1.types.Status numbers."""
    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


# What containerd's State RPC shows for each host state. An exit that is not yet published is
# still "running" for containerd: Wait has not returned either.
_STATUS = {
    ProcessState.CREATED: Status.CREATED,
    ProcessState.RUNNING: Status.RUNNING,
    ProcessState.PAUSED: Status.PAUSED,
    ProcessState.EXIT_PENDING: Status.RUNNING,
    ProcessState.STOPPED: Status.STOPPED,
    ProcessState.DELETED: Status.STOPPED,
}


def signal_exit_status(signo: int) -> int:
    """Exit status containerd reports for a process killed by `signo` (128 + signal)."""
    return 128 + signo


@dataclass(frozen=True)
class ExitInfo:
    pid: int
    status: int
    at_ns: int

    @staticmethod
    def unknown(pid: int) -> ExitInfo:
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
        self.machine = ProcessMachine(self.name)
        self.exit: ExitInfo | None = None
        self._exited = asyncio.Event()
        # /tasks/start or /tasks/exec-started is out: an exit that raced the Start reply waits
        # for it (a signal between two tasks, not a state: the exit may arrive either side).
        self.start_published = asyncio.Event()
        self.io: ProcessIO | None = None

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    @property
    def event_id(self) -> str:
        """TaskExit.id: the exec id, or the container id for the init."""
        return self.exec_id or self.container_id

    @property
    def state(self) -> ProcessState:
        return self.machine.state

    @property
    def status(self) -> Status:
        return _STATUS[self.machine.state]

    @property
    def exited(self) -> bool:
        """The exit was published (Wait returns)."""
        return self.exit is not None

    @property
    def deleted(self) -> bool:
        return self.machine.state == ProcessState.DELETED

    def check(self, op: str) -> None:
        self.machine.check(op)

    def allows(self, op: str) -> bool:
        return self.machine.allows(op)

    # --- transitions ----------------------------------------------------------------------

    def started(self, pid: int) -> None:
        self.pid = pid
        self.machine.apply("started")

    def exit_arrived(self) -> bool:
        """The guest reported the exit; False for a duplicate (or a process already gone)."""
        return self.machine.apply("exit_arrived")

    def set_exited(self, info: ExitInfo) -> None:
        if self.exit is not None:
            return
        if self.pid == 0:
            self.pid = info.pid
        self.exit = info
        self.machine.apply("exited")
        self._exited.set()

    def mark_deleted(self) -> None:
        if self.exit is None:
            # Deleted while only created: it never ran; waiters get containerd's "unknown".
            self.set_exited(ExitInfo.unknown(self.pid))
        self.machine.apply("deleted")

    async def wait(self) -> ExitInfo:
        await self._exited.wait()
        assert self.exit is not None
        return self.exit


class Container:
    """A container: its init process, its execs, and what was set up for it on the host.
    Container-wide states (paused, running) are the init process's."""

    def __init__(self, id: str, bundle: str, stdio: StdioPaths) -> None:
        self.id = id
        self.bundle = bundle
        self.init = Process(id, "", stdio)
        self.execs: dict[str, Process] = {}
        self.rootfs: RootfsMount | None = None
        self.sequencer: ExitSequencer | None = None

    @property
    def paused(self) -> bool:
        return self.init.state == ProcessState.PAUSED

    def process(self, exec_id: str = "") -> Process:
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise NotFound(f"exec {exec_id} of container {self.id} does not exist")
        return p

    def processes(self) -> list[Process]:
        """Execs first: the order in which exits and closes are reported."""
        return [*self.execs.values(), self.init]

    def add_exec(self, exec_id: str, stdio: StdioPaths) -> Process:
        if not exec_id:
            raise InvalidArgument("exec id must not be empty")
        if exec_id in self.execs:
            raise AlreadyExists(f"id {exec_id}: exec already exists in container {self.id}")
        self.init.check("exec")
        p = Process(self.id, exec_id, stdio)
        self.execs[exec_id] = p
        return p

    def status_of(self, p: Process) -> Status:
        """The status containerd sees: running processes of a paused container are paused."""
        if p.status == Status.RUNNING and self.paused:
            return Status.PAUSED
        return p.status

    def live_execs(self) -> list[Process]:
        """Execs that were started and whose exit has not been reported yet."""
        return [p for p in self.execs.values() if p.pid and not p.exited]
