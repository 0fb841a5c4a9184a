"""Guest-wide operations: info, time, entropy, hostname, CPU and memory onlining."""
from __future__ import annotations

import fcntl
import glob
import logging
import os
import struct
import time

from .errors import InvalidArgument

log = logging.getLogger(__name__)

MAX_CPUS = 4096                  # the shim's bound on CPU counts too
MAX_ENTROPY_BYTES = 512          # one AddEntropy request (the host sends 64)
# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
RANDOM_DEVICE = "/dev/random"


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


def cpu_times_ms(stat: str | None = None) -> tuple[int, int]:
    """(busy, idle) ms over all CPUs since boot, from /proc/stat's aggregate "cpu" line:
    user nice system idle iowait irq softirq steal (guest time is already in user)."""
    text = _read("/proc/stat") if stat is None else stat
    for line in text.splitlines():
        f = line.split()
        if f and f[0] == "cpu":
            t = [int(x) for x in f[1:9]] + [0] * max(0, 9 - len(f))
            ms = 1000 // (os.sysconf("SC_CLK_TCK") or 100)
            return (t[0] + t[1] + t[2] + t[5] + t[6] + t[7]) * ms, (t[3] + t[4]) * ms
    return 0, 0


def info() -> dict:
    mi = meminfo()
    busy_ms, idle_ms = cpu_times_ms()
    return {
        "cpu_busy_ms": busy_ms,
        "cpu_idle_ms": idle_ms,
        "kernel": os.uname().release,
        "cpus_online": _count_range_list(_read("/sys/devices/system/cpu/online", "0")),
        "cpus_present": _count_range_list(_read("/sys/devices/system/cpu/present", "0")),
        "memory_total_bytes": mi.get("MemTotal", 0),
        "memory_available_bytes": mi.get("MemAvailable", 0),
        "uptime_s": float((_read("/proc/uptime", "0") or "0").split()[0]),
        "pid1": os.getpid() == 1,
    }


def set_time(unix_ns: int) -> None:
    """clock_settime(CLOCK_REALTIME): one syscall (no ctypes, no hwclock: the guest has no RTC
    worth writing, QEMU's follows the host)."""
    if unix_ns <= 0:
        raise InvalidArgument(f"invalid time {unix_ns}")
    time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)


def check_entropy(data: bytes) -> bytes:
    if not data:
        raise InvalidArgument("no entropy bytes")
    if len(data) > MAX_ENTROPY_BYTES:
        raise InvalidArgument(f"{len(data)} entropy bytes (at most {MAX_ENTROPY_BYTES})")
    return data


def add_entropy(data: bytes, *, pid1: bool | None = None, device: str = RANDOM_DEVICE) -> bool:
    """Mix `data` into the kernel's input pool, credited at 8 bits a byte (RNDADDENTROPY), then
    reseed the CRNG from it at once (RNDRESEEDCRNG): both need CAP_SYS_ADMIN. Only as the VM's
    init: a vminitd running on a host (tests) must not feed the host's RNG, so it accepts and
    ignores the bytes. True when the kernel took them."""
    check_entropy(data)
    if not (os.getpid() == 1 if pid1 is None else pid1):
        log.debug(f"add_entropy: {len(data)} bytes ignored (not the VM's init)")
        return False
    _feed_kernel(data, device)
    return True


def _feed_kernel(data: bytes, device: str) -> None:
    # struct rand_pool_info { int entropy_count (bits); int buf_size (bytes); __u32 buf[]; }
    info = struct.pack("ii", len(data) * 8, len(data)) + data
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


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


def set_online_cpus(want: int, root: str = "/sys/devices/system/cpu") -> dict[str, int]:
    """Online the lowest-numbered `want` CPUs and offline the others, highest first (cpu0 has
    no `online` file: it is always on)."""
    present = _count_range_list(_read(os.path.join(root, "present"), "0"))
    # more than present: a hot-plugged CPU the kernel has not added yet; the shim asks again
    if not 1 <= want <= MAX_CPUS:
        raise InvalidArgument(f"set_online_cpus: {want} CPUs (1..{MAX_CPUS})")
    cpus = sorted(((int(os.path.basename(os.path.dirname(p))[3:]), p)
                   for p in glob.glob(os.path.join(root, "cpu[0-9]*", "online"))), reverse=True)
    changed = 0
    for i, path in cpus:                  # highest first: the newest hot-plugged go first
        on = _read(path) == "1"
        if (i < want) != on:
            try:
                with open(path, "w") as f:
                    f.write("1" if i < want else "0")
                changed += 1
            except OSError as e:
                log.warning(f"set_online_cpus: {path}: {e}")
    return {"onlined": changed,
            "online": _count_range_list(_read(os.path.join(root, "online"), "0")),
            "present": present}


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
