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
needed). `release` unmounts and removes the staging directory; after a crash the staging dir's
"dir" state record is released the same way (`release_dir_record`, registered here).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.shim import mounts, releasers
from spinbox.shim.errors import HostError
from spinbox.shim.spec import BindMount

log = logging.getLogger(__name__)

# never removed, whatever a state file says (a "dir" record is a staging dir below these)
_REFUSED_DIRS = ("", "/run", "/tmp", "/var", "/var/run")


class BindError(HostError):
    """A bind source could not be staged or a staging dir released (names the path)."""


@dataclass
class StagedBinds:
    dir: Path
    paths: dict[int, str] = field(default_factory=dict)   # spec mount index -> path under dir


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
            try:
                mounts.bind(b.source, str(target), recursive=b.is_dir)
                if b.readonly:
                    mounts.remount_bind_readonly(str(target))
            except mounts.MountError as e:
                raise BindError(str(e)) from None
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
        mounts.unmount_all(d)
    except mounts.MountError as e:
        raise BindError(str(e)) from None
    shutil.rmtree(d, ignore_errors=True)   # only after: never recurse into a mounted source


@releasers.releaser("dir")
async def release_dir_record(r: dict[str, Any]) -> str:
    """A "dir" record (a bind staging dir whose shim crashed): unmount, then remove the tree."""
    path = r["path"]
    if not os.path.isabs(path) or path.rstrip("/") in _REFUSED_DIRS:
        return f"refused to remove {path!r}"
    if not os.path.lexists(path):
        return f"{path} already gone"
    await asyncio.to_thread(mounts.unmount_all, path)
    shutil.rmtree(path, ignore_errors=True)
    return f"removed {path}"
