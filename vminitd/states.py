"""The process state machine, after containerd's runc shim (process/*_state.go):

    created --start--> running --pause--> paused --resume--> running
    created|running|paused --exit--> stopped
    created|stopped --delete--> deleted

Pure logic: the servicer asks `check(op)` before acting and `apply(event)` after.
"""
from __future__ import annotations

import enum

from .errors import FailedPrecondition, NotFound


class State(enum.IntEnum):
    # Values match containerd.v1.types.Status / spinbox.agent.v1.Status; DELETED is internal.
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5
    DELETED = 100


# op -> states it is allowed in
_ALLOWED: dict[str, frozenset[State]] = {
    "start": frozenset({State.CREATED}),
    "pause": frozenset({State.RUNNING}),
    "resume": frozenset({State.PAUSED}),
    "kill": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "delete": frozenset({State.CREATED, State.STOPPED}),
    "exec": frozenset({State.RUNNING}),           # on the init: the container must be running
    "update": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "resize": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "stats": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
}

# event -> (from states, to state)
_TRANSITIONS: dict[str, tuple[frozenset[State], State]] = {
    "started": (frozenset({State.CREATED}), State.RUNNING),
    "paused": (frozenset({State.RUNNING}), State.PAUSED),
    "resumed": (frozenset({State.PAUSED}), State.RUNNING),
    "exited": (frozenset({State.CREATED, State.RUNNING, State.PAUSED, State.PAUSING}), State.STOPPED),
    "deleted": (frozenset({State.CREATED, State.STOPPED}), State.DELETED),
}


class ProcessState:
    def __init__(self, name: str) -> None:
        self.name = name
        self.state = State.CREATED

    def check(self, op: str) -> None:
        allowed = _ALLOWED[op]
        if self.state in allowed:
            return
        if op == "kill" and self.state in (State.STOPPED, State.DELETED):
            raise NotFound(f"{self.name}: process already finished")
        if self.state == State.DELETED:
            raise NotFound(f"{self.name}: process was deleted")
        if op == "delete":
            raise FailedPrecondition(f"{self.name}: cannot delete a {self.state.name.lower()} process")
        if op == "exec":
            raise FailedPrecondition(f"{self.name}: container init process is not running "
                                     f"({self.state.name.lower()})")
        raise FailedPrecondition(f"{self.name}: cannot {op} a {self.state.name.lower()} process")

    def apply(self, event: str) -> bool:
        """Apply an event; returns False (and changes nothing) if it does not apply in this
        state (an exit racing a delete is not an error), True when the state changed."""
        sources, target = _TRANSITIONS[event]
        if self.state not in sources:
            return False
        self.state = target
        return True
