"""A container's host bind mounts, staged for the VM (host side).

The guest cannot see host paths. For one container, every bind source (a directory, or a
single file such as CRI's /etc/hosts) is bind-mounted into a staging directory of its own:

    <stage>/b0          <- mount --rbind <dir source>      (remounted read-only for "ro" binds)
    <stage>/b1/hosts    <- mount --bind <file source>

and the staging directory -- only it -- is shared into the guest with one virtiofs device.
Sharing a file's parent directory instead would hand the guest everything beside the file
(for a bind of /etc/passwd: all of /etc), writable unless the bind is read-only; and a "ro"
bind is read-only on the host side too, so a compromised guest cannot write through it.

All mounts are made before virtiofsd starts (it sees the tree as it is then: no propagation
needed). `release` unmounts and removes the staging directory; shim.state's "dir" releaser
does the same after a crash (it unmounts before it removes).
"""
from __future__ import annotations

import ctypes
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .rootfs import RootfsError, unmount_all
from .spec import BindMount

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384


class BindError(RuntimeError):
    pass


@dataclass
class StagedBinds:
    dir: Path
    paths: dict[int, str] = field(default_factory=dict)   # spec mount index -> path under dir


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise BindError(f"mount --bind {source} {target}: {os.strerror(err)}")


def stage(binds: list[BindMount], dir: str | os.PathLike[str]) -> StagedBinds:
    """Bind every source under `dir` (created, must not exist). All or nothing."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=False)
    staged = StagedBinds(d)
    try:
        for n, b in enumerate(binds):
            slot = d / f"b{n}"
            slot.mkdir()
            target = slot
            if not b.is_dir:
                target = slot / (os.path.basename(b.source) or "file")
                target.touch()
            _mount(b.source, str(target), MS_BIND | (MS_REC if b.is_dir else 0))
            if b.readonly:
                # a bind mount ignores MS_RDONLY until it is remounted
                _mount("", str(target), MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            staged.paths[b.index] = str(target.relative_to(d))
    except BaseException:
        release(d)
        raise
    return staged


def release(dir: str | os.PathLike[str]) -> None:
    """Unmount everything under the staging dir, then remove it (idempotent)."""
    d = Path(dir)
    if not d.exists():
        return
    try:
        unmount_all(d)
    except RootfsError as e:
        raise BindError(str(e)) from None
    shutil.rmtree(d, ignore_errors=True)
