"""One line per container in the shim log: where the time of a `ctr run` went.

    timeline c1: rootfs=+0.03 network=+0.09 sandbox=cold:+3.12 shared=+3.41 created=+4.02
                 started=+4.31 exit=+4.55 deleted=+4.70 vm_stopped=+4.86 (s since the daemon
                 started serving)

Marks, in the order a `ctr run` passes them: rootfs (mounted on the host), network (the host
side of the sandbox network ready), sandbox (ready: how it started, "cold" or "running" when
it already was), sized (the VM hot-plugged to the workload's size and the guest confirmed
it: shim.sizing; note `<vcpus>cpu/<MiB>MiB`), shared (rootfs and binds attached to the VM), created (in the guest), started,
exit (published), deleted, vm_stopped.

Marks are seconds on the monotonic clock since the container manager was built (the daemon is
serving then). A container's line is written when the sandbox stops, so that it ends with the
VM's stop; containers deleted earlier keep their marks until then (a few floats each).
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

class Timelines:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self._marks: dict[str, dict[str, float]] = {}
        self._notes: dict[str, dict[str, str]] = {}

    def mark(self, container_id: str, what: str, note: str = "", *, at: float | None = None) -> None:
        """Record `what` for the container now, or at monotonic time `at` (the first time only)."""
        marks = self._marks.setdefault(container_id, {})
        if what not in marks:
            marks[what] = (time.monotonic() if at is None else at) - self.t0
            if note:
                self._notes.setdefault(container_id, {})[what] = note

    def forget(self, container_id: str) -> None:
        """A create that failed: its marks would describe nothing."""
        self._marks.pop(container_id, None)
        self._notes.pop(container_id, None)

    def mark_all(self, what: str) -> None:
        for cid in self._marks:
            self.mark(cid, what)

    def line(self, container_id: str) -> str:
        marks = self._marks.get(container_id, {})
        notes = self._notes.get(container_id, {})
        keys = sorted(marks, key=lambda k: marks[k])      # in the order they happened
        parts = [f"{k}={notes[k] + ':' if k in notes else ''}+{marks[k]:.2f}" for k in keys]
        return f"timeline {container_id}: " + " ".join(parts) + " (s since the daemon started serving)"

    def flush(self) -> None:
        """Log every container's line and forget them (the sandbox stopped)."""
        for cid in list(self._marks):
            log.info("%s", self.line(cid))
        self._marks.clear()
        self._notes.clear()
