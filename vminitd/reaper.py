"""SIGCHLD-driven reaper: vminitd is PID 1 (or a child subreaper), so every orphaned container
process becomes our child and we collect its exit status ourselves.

The race that matters: a process can exit (and be reaped here) before whoever started it has
learnt its pid (runc writes the pid file after the fact). So every reaped status is either
handed to a registered waiter or parked in a bounded table of unclaimed exits, stamped with the
time it was reaped, which `claim()` consults.
"""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36
_MAX_UNCLAIMED = 4096


def exit_status(wait_status: int) -> int:
    """waitpid status -> containerd exit status: the exit code, or 128 + signal number."""
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return 255  # containerd's "unknown"


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int          # mapped exit status (code or 128 + signal)
    at_ns: int           # wall clock, Unix ns
    mono: float          # monotonic time it was reaped


def become_subreaper() -> None:
    import ctypes  # only outside a VM (PID 1 needs no subreaper): keep it off vminitd's start
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Reaper:
    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[Exit]] = {}
        self._unclaimed: collections.OrderedDict[int, Exit] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler existed

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def reap(self) -> None:
        """Collect every exited child (signals coalesce, so loop until none is left)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._deliver(Exit(pid, exit_status(status), time.time_ns(), time.monotonic()))

    def _deliver(self, ex: Exit) -> None:
        fut = self._waiters.pop(ex.pid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(ex)
            return
        self._unclaimed[ex.pid] = ex
        self._unclaimed.move_to_end(ex.pid)
        while len(self._unclaimed) > _MAX_UNCLAIMED:
            self._unclaimed.popitem(last=False)

    def watch(self, pid: int, since: float | None = None) -> asyncio.Future[Exit]:
        """A future for pid's exit. Call it synchronously right after spawning a direct child
        (the reaper runs on the same loop, so it cannot interleave), or with `since` (a
        monotonic time before the process could have started) for a pid learnt later."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Exit] = loop.create_future()
        ex = self._unclaimed.get(pid)
        if ex is not None and (since is None or ex.mono >= since):
            del self._unclaimed[pid]
            fut.set_result(ex)
            return fut
        self._waiters[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        fut = self._waiters.pop(pid, None)
        if fut is not None and not fut.done():
            fut.cancel()
