"""mount(2)/umount2(2) through libc, with fstab-style options split into flags and data."""
from __future__ import annotations

import ctypes
import os

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_SYNCHRONOUS, MS_REMOUNT, MS_MANDLOCK, MS_DIRSYNC = 16, 32, 64, 128
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_SLAVE, MS_SHARED, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 24
MNT_DETACH = 2

_FLAGS = {
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "noatime": (MS_NOATIME, True), "nodiratime": (MS_NODIRATIME, True),
    "relatime": (MS_RELATIME, True), "strictatime": (MS_STRICTATIME, True),
    "bind": (MS_BIND, True), "rbind": (MS_BIND | MS_REC, True), "remount": (MS_REMOUNT, True),
    "dirsync": (MS_DIRSYNC, True), "defaults": (0, True),
}

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def parse_options(options: list[str]) -> tuple[int, str]:
    flags, data = 0, []
    for opt in options:
        if opt in _FLAGS:
            bit, on = _FLAGS[opt]
            flags = flags | bit if on else flags & ~bit
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str, target: str, fstype: str, options: list[str] | None = None,
          flags: int = 0, data: str | None = None) -> None:
    if options is not None:
        oflags, odata = parse_options(options)
        flags |= oflags
        data = odata if data is None else data
    if _lib().mount(source.encode(), target.encode(), (fstype or "").encode() or None,
                    ctypes.c_ulong(flags), (data or "").encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or '(none)'} {source} on {target} "
                      f"({','.join(options or []) or flags}): {os.strerror(err)}")
    if flags & MS_BIND and flags & MS_RDONLY and not flags & MS_REMOUNT:
        # A bind mount ignores MS_RDONLY until remounted.
        mount(source, target, "", None, flags | MS_REMOUNT, None)


def umount(target: str, detach: bool = True) -> None:
    if _lib().umount2(target.encode(), MNT_DETACH if detach else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False
