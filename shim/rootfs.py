"""containerd's snapshot mounts on <bundle>/rootfs (mount at Create, unmount at Delete).

containerd sends the snapshotter's mounts (typically one `overlay`, or a `bind` for the native
snapshotter); an empty list means the rootfs is already in place in the bundle. The mounted
tree is then shared into the guest by the sandbox (virtiofs for a VM; the path itself for a
local agent).

The mounting itself is shim.mounts' (util-linux `mount` for containerd's option lists,
`unmount_all` for the way back); this module only knows what a rootfs is. After a crash the
"mount" state record of the rootfs is released by shim.mounts as well.

A read-only rootfs (the spec's root.readonly) is read-only on the host side too: the guest can
mount its share itself, so runc's read-only remount inside the guest is no barrier. The
rootfs gets a recursive bind of itself on top, made read-only (nosuid, nodev) with all its
submounts; virtiofsd (which has no read-only mode in this QEMU version) serves that. runc in
the guest can then no longer create the mount points the spec needs, so they are made first,
as runc would make them: each destination resolved inside the rootfs (openat2 RESOLVE_IN_ROOT:
the image's symlinks cannot lead out of it), a directory, or an empty file for a file bind.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.shim import mounts
from spinbox.shim.errors import HostError
from spinbox.shim.mounts import is_mountpoint

__all__ = ["MountSpec", "RootfsMount", "RootfsError", "mount_rootfs", "release", "is_mountpoint"]

log = logging.getLogger(__name__)

SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class RootfsError(HostError):
    """The rootfs could not be mounted or unmounted (the message names the mount)."""


@dataclass(frozen=True)
class MountSpec:
    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""          # relative to the rootfs ("" = the rootfs itself)

    @staticmethod
    def from_proto(m: Any) -> MountSpec:
        """containerd.types.Mount -> MountSpec (the target is only used by 2.x mount manager)."""
        return MountSpec(m.type, m.source, tuple(m.options), m.target)


@dataclass
class RootfsMount:
    path: Path                       # <bundle>/rootfs
    mounted: bool = False            # we mounted something there (unmount on delete)
    specs: list[MountSpec] = field(default_factory=list)


def _target(root: Path, m: MountSpec) -> Path:
    if not m.target:
        return root
    rel = os.path.normpath(m.target).lstrip("/")
    if rel.startswith(".."):
        raise RootfsError(f"rootfs mount target {m.target!r} leaves the rootfs")
    return root / rel


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _open_in_root(rootfd: int, rel: str) -> int:
    """An O_PATH fd of `rel` resolved inside the root (absolute symlinks and .. stay in it)."""
    nr = SYS_OPENAT2.get(os.uname().machine)
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = -1 if nr is None else _libc.syscall(ctypes.c_long(nr), ctypes.c_int(rootfd), rel.encode(),
                                             ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = errno.ENOSYS if nr is None else ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return fd


def _make_mount_point(rootfd: int, dest: str, is_dir: bool) -> None:
    parts = [p for p in os.path.normpath(dest).split("/") if p and p != "."]
    if ".." in parts:
        raise RootfsError(f"mount destination {dest!r} leaves the rootfs")
    for i, name in enumerate(parts):
        here = "/".join(parts[:i]) or "."
        try:
            os.close(_open_in_root(rootfd, "/".join(parts[:i + 1])))
            continue                                   # exists (whatever it is: runc decides)
        except FileNotFoundError:
            pass
        parent = _open_in_root(rootfd, here)
        try:
            if is_dir or i < len(parts) - 1:
                os.mkdir(name, 0o755, dir_fd=parent)
            else:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o644, dir_fd=parent))
        except FileExistsError:
            return                                     # a dangling symlink: runc decides
        finally:
            os.close(parent)


def make_mount_points(root: Path, mount_points: Sequence[tuple[str, bool]]) -> None:
    """Create the spec's missing mount points (destination, is a directory) in the rootfs."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for dest, is_dir in mount_points:
            try:
                _make_mount_point(rootfd, dest, is_dir)
            except OSError as e:
                raise RootfsError(f"read-only rootfs {root}: cannot make the mount point {dest}: "
                                  f"{e.strerror}") from None
    finally:
        os.close(rootfd)


def _make_readonly(root: Path) -> None:
    try:
        mounts.bind(str(root), str(root), recursive=True)
    except mounts.MountError as e:
        raise RootfsError(f"read-only rootfs {root}: {e}") from None
    try:
        mounts.set_tree_attrs(str(root), readonly=True)
    except mounts.MountError as e:
        raise RootfsError(f"read-only rootfs {root}: {e}") from None


async def mount_rootfs(bundle: str | os.PathLike[str], specs: list[MountSpec], *,
                       readonly: bool = False, mount_points: Sequence[tuple[str, bool]] = ()) -> RootfsMount:
    """Mount containerd's rootfs mounts on <bundle>/rootfs, in order. With no mounts the
    directory must already hold the rootfs. `readonly`: then make the whole tree read-only on
    the host, after creating the `mount_points` (destination, is a directory) the spec needs.
    A failure unmounts what was mounted."""
    root = Path(bundle) / "rootfs"
    if not specs and not root.is_dir():
        raise RootfsError(f"no rootfs mounts were given and {root} is not a directory")
    if not specs and not readonly:
        return RootfsMount(root, False, [])
    root.mkdir(mode=0o711, exist_ok=True)
    done = RootfsMount(root, False, list(specs))
    try:
        for m in specs:
            try:
                await mounts.mount_command(m.type, m.source, str(_target(root, m)), m.options)
            except mounts.MountError as e:
                raise RootfsError(str(e)) from None
            done.mounted = True
        if readonly:
            make_mount_points(root, mount_points)
            done.mounted = True          # from the bind on: unmount_all undoes it as well
            _make_readonly(root)
    except BaseException:
        if done.mounted:
            mounts.unmount_all(root)
        raise
    return done


def release(r: RootfsMount | None) -> None:
    """Undo mount_rootfs (idempotent)."""
    if r is not None and r.mounted:
        try:
            mounts.unmount_all(r.path)
        except mounts.MountError as e:
            raise RootfsError(str(e)) from None
        r.mounted = False
