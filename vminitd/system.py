"""Guest-wide operations: info, time, hostname, CPU and memory onlining."""
from __future__ import annotations

import ctypes
import glob
import os

from .errors import InvalidArgument

CLOCK_REALTIME = 0


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _count_range_list(text: str) -> int:
    """'0-3,5' -> 5"""
    n = 0
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        n += (int(b) - int(a) + 1) if b else 1
    return n


def meminfo() -> dict[str, int]:
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts:
            out[k] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def info() -> dict:
    mi = meminfo()
    return {
        "kernel": os.uname().release,
        "cpus_online": _count_range_list(_read("/sys/devices/system/cpu/online", "0")),
        "cpus_present": _count_range_list(_read("/sys/devices/system/cpu/present", "0")),
        "memory_total_bytes": mi.get("MemTotal", 0),
        "memory_available_bytes": mi.get("MemAvailable", 0),
        "uptime_s": float((_read("/proc/uptime", "0") or "0").split()[0]),
        "pid1": os.getpid() == 1,
    }


def set_time(unix_ns: int) -> None:
    if unix_ns <= 0:
        raise InvalidArgument(f"invalid time {unix_ns}")
    libc = ctypes.CDLL(None, use_errno=True)
    ts = _Timespec(unix_ns // 1_000_000_000, unix_ns % 1_000_000_000)
    if libc.clock_settime(CLOCK_REALTIME, ctypes.byref(ts)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clock_settime: {os.strerror(err)}")


def online_cpus(root: str = "/sys/devices/system/cpu") -> dict[str, int]:
    onlined = 0
    for path in sorted(glob.glob(os.path.join(root, "cpu[0-9]*", "online"))):
        if _read(path) == "0":
            try:
                with open(path, "w") as f:
                    f.write("1")
                onlined += 1
            except OSError:
                pass
    return {"onlined": onlined,
            "online": _count_range_list(_read(os.path.join(root, "online"), "0")),
            "present": _count_range_list(_read(os.path.join(root, "present"), "0"))}


def online_memory(root: str = "/sys/devices/system/memory") -> dict[str, int]:
    onlined = online = 0
    for path in sorted(glob.glob(os.path.join(root, "memory[0-9]*", "state"))):
        state = _read(path)
        if state == "offline":
            try:
                with open(path, "w") as f:
                    # movable keeps hot-added memory removable again
                    f.write("online_movable")
                onlined += 1
                state = "online"
            except OSError:
                try:
                    with open(path, "w") as f:
                        f.write("online")
                    onlined += 1
                    state = "online"
                except OSError:
                    pass
        if state.startswith("online"):
            online += 1
    return {"blocks_onlined": onlined, "blocks_online": online,
            "memory_total_bytes": meminfo().get("MemTotal", 0)}
