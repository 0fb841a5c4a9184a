"""The host's two state machines, as tables (the guest's twin is vminitd/states.py).

A process, as the shim sees it (containerd's runc shim: process/*_state.go):

    created --started--> running --paused--> paused --resumed--> running
    created|running|paused --exit_arrived--> exit_pending       the guest said so
    created|running|paused|exit_pending --exited--> stopped     /tasks/exit is out
    any but deleted --deleted--> deleted

`exit_pending` is the window between the guest's exit event and its publication: the exit
waits there for the start event and for the output to reach containerd's FIFOs (shim.exits).
Kill and Update are refused in it (the process is gone in the guest), Wait still blocks.

A sandbox (the VM and what is attached to it; shim.sandbox):

    new --start--> starting --ready--> ready --lost--> lost
    new|starting|ready|lost --stop--> stopping --stopped--> stopped

Pure logic: callers ask `check(op)` before acting and `apply(event)` after, as qemu.qmp's
run state guards do. Errors are the shim's RequestError branch (shim.errors), so the Task
service answers with the codes containerd expects.
"""
from __future__ import annotations

import enum

from .errors import FailedPrecondition, NotFound


class ProcessState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXIT_PENDING = "exit pending"
    STOPPED = "stopped"
    DELETED = "deleted"


P = ProcessState
_LIVE = frozenset({P.CREATED, P.RUNNING, P.PAUSED})

# op -> the states it is allowed in. Ops on the init process that stand for the container
# ("exec", "exec_start", "pause", "resume", "update") are checked on the init.
PROCESS_OPS: dict[str, frozenset[ProcessState]] = {
    "start": frozenset({P.CREATED}),
    "kill": _LIVE,
    "kill_all": _LIVE | {P.EXIT_PENDING},     # --all still reaches the container's other pids
    "delete": frozenset({P.CREATED, P.EXIT_PENDING, P.STOPPED}),
    "exec": _LIVE,                            # register an exec (ExecProcess)
    "exec_start": frozenset({P.RUNNING, P.PAUSED}),
    "pause": frozenset({P.RUNNING}),
    "resume": frozenset({P.PAUSED}),
    "update": _LIVE,
    "pids": _LIVE,
}

# event -> (from states, to state)
PROCESS_EVENTS: dict[str, tuple[frozenset[ProcessState], ProcessState]] = {
    "started": (frozenset({P.CREATED}), P.RUNNING),
    "paused": (frozenset({P.RUNNING}), P.PAUSED),
    "resumed": (frozenset({P.PAUSED}), P.RUNNING),
    "exit_arrived": (_LIVE, P.EXIT_PENDING),
    "exited": (_LIVE | {P.EXIT_PENDING}, P.STOPPED),
    "deleted": (_LIVE | {P.EXIT_PENDING, P.STOPPED}, P.DELETED),
}

_FINISHED = frozenset({P.EXIT_PENDING, P.STOPPED, P.DELETED})


class ProcessMachine:
    """One process's state; `name` is "container" or "container/exec" for messages."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = P.CREATED

    def allows(self, op: str) -> bool:
        return self.state in PROCESS_OPS[op]

    def check(self, op: str) -> None:
        """Raise the error containerd expects when `op` is not allowed now."""
        if self.allows(op):
            return
        s = self.state
        if op in ("kill", "kill_all") and s in _FINISHED:
            raise NotFound(f"process {self.name}: process already finished")
        if s == P.DELETED:
            raise NotFound(f"process {self.name} was deleted")
        if op == "delete":
            raise FailedPrecondition(f"cannot delete a running process ({self.name}); kill it first")
        if op in ("exec", "exec_start"):
            raise FailedPrecondition(f"container {self.name} init process is not running")
        if op == "start":
            what = "has exited" if s in _FINISHED else f"is {s.value}"
            raise FailedPrecondition(f"process {self.name} {what}: cannot start it")
        if op == "pause" and s == P.PAUSED:
            raise FailedPrecondition(f"container {self.name} is already paused")
        if op == "resume":
            raise FailedPrecondition(f"container {self.name} is not paused")
        if op in ("pause", "update", "pids"):
            raise FailedPrecondition(f"container {self.name} is {s.value}: cannot {op}")
        raise FailedPrecondition(f"process {self.name} is {s.value}: cannot {op}")

    def apply(self, event: str) -> bool:
        """Take `event`; False (nothing changes) when it does not apply in this state: an exit
        that races a delete is not an error."""
        sources, target = PROCESS_EVENTS[event]
        if self.state not in sources:
            return False
        self.state = target
        return True


class SandboxState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    LOST = "lost"
    STOPPING = "stopping"
    STOPPED = "stopped"


S = SandboxState

SANDBOX_EVENTS: dict[str, tuple[frozenset[SandboxState], SandboxState]] = {
    "start": (frozenset({S.NEW}), S.STARTING),
    "ready": (frozenset({S.STARTING}), S.READY),
    "lost": (frozenset({S.STARTING, S.READY}), S.LOST),
    "stop": (frozenset({S.NEW, S.STARTING, S.READY, S.LOST}), S.STOPPING),
    "stopped": (frozenset({S.STOPPING}), S.STOPPED),
}


class SandboxMachine:
    def __init__(self, name: str) -> None:
        self.name = name
        self.state = S.NEW

    def apply(self, event: str) -> bool:
        sources, target = SANDBOX_EVENTS[event]
        if self.state not in sources:
            return False
        self.state = target
        return True

    def require(self, *states: SandboxState) -> None:
        """Guard: the sandbox must be in one of `states` (qmp's @require)."""
        if self.state not in states:
            raise FailedPrecondition(f"sandbox {self.name} is {self.state.value}")
