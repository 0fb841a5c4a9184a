"""containerd's snapshot mounts on <bundle>/rootfs (mount at Create, unmount at Delete).

containerd sends the snapshotter's mounts (typically one `overlay`, or a `bind` for the native
snapshotter); an empty list means the rootfs is already in place in the bundle. The mounted
tree is then shared into the guest by the sandbox (virtiofs for a VM; the path itself for a
local agent).

Mounting shells out to util-linux `mount`, which parses the fstab-style option list
(flags vs. data) exactly as containerd's `mount.All` does; unmounting uses umount2 directly
and repeats until nothing is mounted there (containerd's `UnmountAll`), so `delete` after a
crash can call it on a path with zero, one or several stacked mounts.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("spinbox.shim.rootfs")

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


class RootfsError(RuntimeError):
    pass


@dataclass(frozen=True)
class MountSpec:
    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""          # relative to the rootfs ("" = the rootfs itself)

    @staticmethod
    def from_proto(m) -> "MountSpec":
        """containerd.types.Mount -> MountSpec (the target is only used by 2.x mount manager)."""
        return MountSpec(m.type, m.source, tuple(m.options), m.target)


@dataclass
class RootfsMount:
    path: Path                       # <bundle>/rootfs
    mounted: bool = False            # we mounted something there (unmount on delete)
    specs: list[MountSpec] = field(default_factory=list)


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    p = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == p for line in f)
    except OSError:
        return os.path.ismount(p)


def _mount_argv(m: MountSpec, target: str) -> list[str]:
    opts = [o for o in m.options if o]
    if m.type in ("bind", "rbind") or "bind" in opts or "rbind" in opts:
        if m.type == "rbind" and "rbind" not in opts:
            opts.insert(0, "rbind")
        elif "bind" not in opts and "rbind" not in opts:
            opts.insert(0, "bind")
        argv = ["mount", "--no-mtab"]
    else:
        argv = ["mount", "--no-mtab", "-t", m.type or "none"]
    if opts:
        argv += ["-o", ",".join(opts)]
    return argv + ["--", m.source, target]


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RootfsError(f"{' '.join(argv)} failed ({proc.returncode}): {out.decode(errors='replace').strip()}")


async def mount_rootfs(bundle: str | os.PathLike[str], mounts: list[MountSpec]) -> RootfsMount:
    """Mount containerd's rootfs mounts on <bundle>/rootfs, in order. With no mounts the
    directory must already hold the rootfs. A failure unmounts what was mounted."""
    root = Path(bundle) / "rootfs"
    if not mounts:
        if not root.is_dir():
            raise RootfsError(f"no rootfs mounts were given and {root} is not a directory")
        return RootfsMount(root, False, [])
    root.mkdir(mode=0o711, exist_ok=True)
    done = RootfsMount(root, False, list(mounts))
    try:
        for m in mounts:
            target = root
            if m.target:
                rel = os.path.normpath(m.target).lstrip("/")
                if rel.startswith(".."):
                    raise RootfsError(f"rootfs mount target {m.target!r} leaves the rootfs")
                target = root / rel
            await _run(_mount_argv(m, str(target)))
            done.mounted = True
    except BaseException:
        if done.mounted:
            unmount_all(root)
        raise
    return done


def unmount_all(path: str | os.PathLike[str]) -> int:
    """Unmount everything stacked on `path` (and below it, deepest first). Returns how many
    unmounts were made; a path that does not exist or has nothing mounted is fine."""
    p = os.path.realpath(path)
    count = 0
    for _ in range(64):
        targets = _mounts_under(p)
        if not targets:
            break
        for t in sorted(targets, key=len, reverse=True):
            if _libc.umount2(t.encode(), UMOUNT_NOFOLLOW) != 0:
                err = ctypes.get_errno()
                if err in (errno.EINVAL, errno.ENOENT):
                    continue
                if err == errno.EBUSY:
                    log.warning("unmount %s: busy; detaching it", t)
                    if _libc.umount2(t.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
                        count += 1
                        continue
                    err = ctypes.get_errno()
                raise RootfsError(f"unmount {t}: {os.strerror(err)}")
            count += 1
    else:
        raise RootfsError(f"unmount {p}: still mounted after 64 rounds")
    return count


def _mounts_under(p: str) -> list[str]:
    out = []
    prefix = p.rstrip("/") + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = _unescape(line.split()[4])
                if mp == p or mp.startswith(prefix):
                    out.append(mp)
    except OSError:
        pass
    return out


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 0 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def release(r: RootfsMount | None) -> None:
    """Undo mount_rootfs (idempotent)."""
    if r is not None and r.mounted:
        unmount_all(r.path)
        r.mounted = False
