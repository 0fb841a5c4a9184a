"""Host mounts: the one place the shim mounts, unmounts and reads the mount table.

    await mount_command("overlay", "overlay", "/b/rootfs", ["lowerdir=..."])   # util-linux mount
    bind(source, target, recursive=True); remount_bind_readonly(target)       # mount(2)
    set_tree_attrs(target, readonly=True)   # mount_setattr(2): ro/nosuid/nodev on a whole tree
    mount_syscall(source, target, flags)                                     # netns bind / MS_SHARED
    is_mountpoint(path); mounts_under(path)                                  # /proc/self/mountinfo
    unmount_all(path)                 # everything on and below path, deepest first (idempotent)
    detach(path)                      # one lazy unmount; "not mounted" is fine

Users: the rootfs (containerd's snapshot mounts), the bind staging dirs, the named netns files,
and the "mount" state records' releaser (registered here: see shim.releasers).

Why two ways to mount: containerd's mount options are an fstab-style list that mixes flags and
filesystem data; util-linux `mount` splits them exactly as containerd's `mount.All` does, so the
rootfs shells out. Everything else (binds, netns) knows its flags and calls mount(2) directly.

`unmount_all` tries a plain umount first and detaches (MNT_DETACH) only what is busy, round after
round until nothing is mounted there (containerd's `UnmountAll`): `delete` after a crash may find
zero, one or several stacked mounts. Something it cannot unmount is an error (never "done"):
a caller that removes the directory next must not recurse into a mount.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from spinbox.shim import releasers
from spinbox.shim.errors import HostError

log = logging.getLogger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_REC, MS_PRIVATE, MS_SHARED = 0x1000, 0x4000, 1 << 18, 1 << 20
MNT_DETACH = 2
# mount_setattr(2) (Linux 5.12): no libc wrapper in Debian 12's glibc, hence the raw syscall
SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}
AT_FDCWD, AT_SYMLINK_NOFOLLOW, AT_RECURSIVE = -100, 0x100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
UMOUNT_NOFOLLOW = 8
MOUNTINFO = "/proc/self/mountinfo"
_MAX_ROUNDS = 64                  # stacked mounts; a bound so a broken table cannot spin forever
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class MountError(HostError, OSError):
    """A mount or unmount failed; `errno` is the syscall's (None for the mount command). An
    OSError too, so callers that treat unmounting as file-system work keep catching it."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err          # OSError's attribute: its own __init__ saw one argument only


def _error(err: int, what: str) -> MountError:
    return MountError(f"{what}: {os.strerror(err)}", err)


# ---------------------------------------------------------------------------------------------
# the mount table

def decode_mountinfo_path(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (octal)."""
    if "\\" not in field:
        return field
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, decoded, in table order."""
    with open(MOUNTINFO) as f:
        return [decode_mountinfo_path(line.split()[4]) for line in f if line.strip()]


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    p = os.path.realpath(path)
    try:
        return p in mount_points()
    except OSError:               # no /proc: the stat-based test (misses bind mounts of a dir
        return os.path.ismount(p)  # on its own file system, hence not the first choice)


def mounts_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at `path` or below it (after resolving symlinks), deepest first."""
    p = os.path.realpath(path)
    prefix = p.rstrip("/") + "/"
    try:
        points = mount_points()
    except OSError:
        return []
    return sorted({m for m in points if m == p or m.startswith(prefix)}, key=len, reverse=True)


# ---------------------------------------------------------------------------------------------
# mounting

def mount_syscall(source: str, target: str, flags: int, fstype: str | None = None,
                  data: str | None = None) -> None:
    """mount(2). Raises MountError with the errno."""
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype is not None else None,
                     ctypes.c_ulong(flags), data.encode() if data is not None else None)
    if rc != 0:
        raise _error(ctypes.get_errno(), f"mount {source or '(none)'} on {target}")


def bind(source: str, target: str, *, recursive: bool = False) -> None:
    """`mount --bind` (or `--rbind`) source on target."""
    try:
        mount_syscall(source, target, MS_BIND | (MS_REC if recursive else 0))
    except MountError as e:
        raise MountError(f"mount --bind {source} {target}: {os.strerror(e.errno or 0)}", e.errno) from None


def remount_bind_readonly(target: str) -> None:
    """Make a bind mount read-only (and nosuid, nodev): a bind ignores MS_RDONLY until it is
    remounted."""
    try:
        mount_syscall("", target, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    except MountError as e:
        raise MountError(f"mount -o remount,bind,ro {target}: {os.strerror(e.errno or 0)}",
                         e.errno) from None


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def set_tree_attrs(target: str, *, readonly: bool, private: bool = False) -> None:
    """nosuid + nodev (+ read-only) on the mount at `target` AND every mount below it; with
    `private`, the tree also stops receiving mounts propagated from its source.

    A remount (MS_REMOUNT|MS_BIND) changes one mount only: the submounts an rbind carried along
    would stay writable, and virtiofsd serves them to the guest as they are. mount_setattr(2)
    with AT_RECURSIVE changes the whole tree at once. A kernel without it (before 5.12) gets
    a clear error: there is no safe per-mount fallback for a tree (a submount mounted between
    the listing and the remounts would be missed)."""
    nr = SYS_MOUNT_SETATTR.get(os.uname().machine)
    attr = _MountAttr(MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if readonly else 0), 0,
                      MS_PRIVATE if private else 0, 0)
    rc = -1 if nr is None else _libc.syscall(ctypes.c_long(nr), ctypes.c_int(AT_FDCWD), target.encode(),
                                             ctypes.c_uint(AT_RECURSIVE | AT_SYMLINK_NOFOLLOW),
                                             ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    if rc == 0:
        return
    err = errno.ENOSYS if nr is None else ctypes.get_errno()
    what = "ro,nosuid,nodev" if readonly else "nosuid,nodev"
    if err == errno.ENOSYS:
        raise MountError(f"mount_setattr {target} ({what}, recursive): this kernel ({os.uname().release}, "
                         f"{os.uname().machine}) lacks mount_setattr(2) (Linux 5.12+), which spinbox "
                         "needs to make a mount and all its submounts " + what, err)
    raise _error(err, f"mount_setattr {target} ({what}, recursive)")


def mount_command_argv(fstype: str, source: str, target: str, options: Sequence[str] = ()) -> list[str]:
    """The util-linux `mount` argv for one containerd mount (`bind`/`rbind` as a type or an
    option become `-o bind`/`-o rbind`; --no-mtab: the shim keeps its own records)."""
    opts = [o for o in options if o]
    if fstype in ("bind", "rbind") or "bind" in opts or "rbind" in opts:
        if fstype == "rbind" and "rbind" not in opts:
            opts.insert(0, "rbind")
        elif "bind" not in opts and "rbind" not in opts:
            opts.insert(0, "bind")
        argv = ["mount", "--no-mtab"]
    else:
        argv = ["mount", "--no-mtab", "-t", fstype or "none"]
    if opts:
        argv += ["-o", ",".join(opts)]
    return argv + ["--", source, target]


async def mount_command(fstype: str, source: str, target: str, options: Sequence[str] = ()) -> None:
    """Run util-linux `mount`; its output is the error message when it fails."""
    argv = mount_command_argv(fstype, source, target, options)
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise MountError(f"{' '.join(argv)} failed ({proc.returncode}): "
                         f"{out.decode(errors='replace').strip()}")


# ---------------------------------------------------------------------------------------------
# unmounting

def detach(path: str) -> bool:
    """One lazy unmount of `path` (no symlink followed). False if nothing was mounted there."""
    if _libc.umount2(path.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):          # not a mount point / no such path
        return False
    raise _error(err, f"umount {path}")


def _unmount_one(target: str) -> bool:
    """Unmount one mount point; detach it when busy. False if it was not (or no longer) one."""
    if _libc.umount2(target.encode(), UMOUNT_NOFOLLOW) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if err == errno.EBUSY:
        log.warning("unmount %s: busy; detaching it", target)
        return detach(target)
    raise _error(err, f"unmount {target}")


def unmount_all(path: str | os.PathLike[str]) -> int:
    """Unmount everything on `path` and below it, deepest first, until nothing is left; returns
    how many unmounts were made. A path that does not exist or has nothing mounted is fine."""
    p = os.path.realpath(path)
    count = 0
    for _ in range(_MAX_ROUNDS):
        targets = mounts_under(p)
        if not targets:
            return count
        progress = False
        for t in targets:
            if _unmount_one(t):
                count += 1
                progress = True
        if not progress:   # listed, yet umount says "not mounted" (another namespace's view)
            raise MountError(f"unmount {p}: {', '.join(targets)} still mounted and cannot be unmounted")
    raise MountError(f"unmount {p}: still mounted after {_MAX_ROUNDS} rounds")


@releasers.releaser("mount")
async def release_mount_record(r: dict[str, Any]) -> str:
    """A "mount" record (a container's rootfs): unmount every mount stacked on its path."""
    n = await asyncio.to_thread(unmount_all, r["path"])
    return f"unmounted {r['path']} ({n})" if n else f"{r['path']} not mounted"
