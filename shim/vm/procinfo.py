"""Identify processes safely: a pid alone may have been reused, pid + start time may not.

Used for the persisted VM state (vm.json) and crash cleanup (`kill_from_state`).
"""
from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def start_time(pid: int, proc_root: str | Path = "/proc") -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None if the pid is gone."""
    try:
        raw = Path(proc_root, str(pid), "stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parens: split after the last ')'
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[19])  # fields[0] is field 3 (state)


def state(pid: int, proc_root: str | Path = "/proc") -> str | None:
    try:
        raw = Path(proc_root, str(pid), "stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2:].split()[0].decode()


def cmdline(pid: int, proc_root: str | Path = "/proc") -> list[str] | None:
    try:
        raw = Path(proc_root, str(pid), "cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_same_process(pid: int, expected_start: int, tag: str | None = None,
                    proc_root: str | Path = "/proc", uid: int | None = None) -> bool:
    """True if `pid` is still the process that started at `expected_start` (and, if `tag` is
    given, has it as a substring of one of its arguments; if `uid` is, runs as that uid) and
    has not exited (zombie = exited)."""
    if pid <= 1 or start_time(pid, proc_root) != expected_start:
        return False
    if state(pid, proc_root) in ("Z", "X", None):
        return False
    if uid is not None:
        try:
            if os.stat(Path(proc_root, str(pid))).st_uid != uid:
                return False
        except OSError:
            return False
    if tag is not None:
        args = cmdline(pid, proc_root) or []
        return any(tag in a for a in args)
    return True


def kill_verified(pid: int, expected_start: int, tag: str | None, *, timeout: float = 5.0,
                  group: bool = True, uid: int | None = None) -> bool:
    """SIGKILL the process (its group when it leads one) if it is still ours; wait until it is
    gone or a zombie (not our child: someone else reaps it). Returns True if it was killed."""
    if not is_same_process(pid, expected_start, tag, uid=uid):
        return False
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_same_process(pid, expected_start):
        # our own child (same process): reap it, or it stays a zombie
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.01)
    return True


def set_pdeathsig() -> None:
    """preexec_fn: the child gets SIGKILL when the thread that forked it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def describe_returncode(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"
