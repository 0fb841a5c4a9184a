"""A container's host bind mounts, staged for the VM (host side).

The guest cannot see host paths. For one container, every bind source (a directory, or a
single file such as CRI's /etc/hosts) is bind-mounted into a staging directory of its own:

    <stage>/b0          <- mount --bind <dir source>      (--rbind for an "rbind": its submounts too)
    <stage>/b1/hosts    <- mount --bind <file source>

and the staging directory -- only it -- is shared into the guest with one virtiofs device.
Sharing a file's parent directory instead would hand the guest everything beside the file
(for a bind of /etc/passwd: all of /etc), writable unless the bind is read-only.

The guest is hostile: it can mount the share itself and bypass whatever the container's
mounts say. So what the host stages is what the guest may do, nothing more:
* a plain `bind` stages the one mount (its submounts stay out); `rbind` carries them along;
* a "ro" bind is read-only on the host side, recursively (every submount an rbind carried),
  every staged tree is nosuid,nodev, and private: a mount made later below the source does
  not propagate into it (shim.mounts.set_tree_attrs, mount_setattr(2));
* the source is resolved once: opened with O_PATH, checked through that handle, and mounted
  from /proc/self/fd/<fd>, so a symlink swapped in after the check (through a writable share)
  cannot redirect the mount to another host path.

All mounts are made before virtiofsd starts. `release` unmounts the known slots and removes
them one by one (never a recursive delete: a mount left below would be walked into); anything
still mounted, or not ours, keeps the staging dir and is an error. After a crash the staging
dir's "dir" state record is released the same way (`release_dir_record`, registered here).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.shim import mounts, releasers
from spinbox.shim.errors import HostError
from spinbox.shim.spec import BindMount

log = logging.getLogger(__name__)

# never removed, whatever a state file says (a "dir" record is a staging dir below these)
_REFUSED_DIRS = ("", "/run", "/tmp", "/var", "/var/run")
_SLOT_RE = re.compile(r"b[0-9]+")


class BindError(HostError):
    """A bind source could not be staged or a staging dir released (names the path)."""


@dataclass
class StagedBinds:
    dir: Path
    paths: dict[int, str] = field(default_factory=dict)   # spec mount index -> path under dir


def _open_source(b: BindMount) -> int:
    """The source resolved once, as an O_PATH handle: what is checked here is what is mounted."""
    try:
        fd = os.open(b.source, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise BindError(f"{b.describe()}: cannot open the source: {e.strerror}") from None
    is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
    if is_dir != b.is_dir:
        os.close(fd)
        raise BindError(f"{b.describe()}: the source changed from a {'directory' if b.is_dir else 'file'} "
                        f"to a {'directory' if is_dir else 'file'} since the spec was checked")
    return fd


def _stage_one(b: BindMount, slot: Path) -> Path:
    fd = _open_source(b)
    try:
        target = slot
        if not b.is_dir:
            target = slot / (os.path.basename(b.source) or "file")
            target.touch()
        try:
            mounts.bind(f"/proc/self/fd/{fd}", str(target), recursive=b.recursive)
            mounts.set_tree_attrs(str(target), readonly=b.readonly, private=True)
        except mounts.MountError as e:
            raise BindError(f"{b.describe()}: {e}") from None
        return target
    finally:
        os.close(fd)


def stage(binds: list[BindMount], dir: str | os.PathLike[str]) -> StagedBinds:
    """Bind every source under `dir` (created, must not exist). All or nothing."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=False)
    staged = StagedBinds(d)
    try:
        for n, b in enumerate(binds):
            slot = d / f"b{n}"
            slot.mkdir()
            staged.paths[b.index] = str(_stage_one(b, slot).relative_to(d))
    except BaseException:
        release(d)
        raise
    return staged


def _still_mounted(d: Path) -> list[str]:
    """Mount points at or below `d`; an unreadable mount table counts as "maybe": refused."""
    real = os.path.realpath(d)          # the mount table names real paths
    prefix = real.rstrip("/") + "/"
    try:
        points = mounts.mount_points()
    except OSError as e:
        raise BindError(f"{d}: cannot read the mount table ({e.strerror}): kept, not removed") from None
    return [m for m in points if m == real or m.startswith(prefix)]


def _remove_slot(slot: Path) -> None:
    """A slot holds nothing (a directory bind's mount point) or the one empty file a file bind
    was mounted on. Anything else was not made by `stage`: kept."""
    entries = list(slot.iterdir())
    if len(entries) > 1 or (entries and (entries[0].is_symlink() or not entries[0].is_file()
                                         or entries[0].stat().st_size)):
        raise BindError(f"{slot}: holds {', '.join(e.name for e in entries)}, which staging did not "
                        "create: kept, not removed")
    for e in entries:
        e.unlink()
    slot.rmdir()


def release(dir: str | os.PathLike[str]) -> None:
    """Unmount the slots of the staging dir, check nothing is mounted below it any more, then
    remove the slots and the dir (idempotent). Anything left mounted, or unknown, is kept and
    raises BindError: a later `delete` retries."""
    d = Path(os.path.abspath(dir))
    if not os.path.lexists(d):
        return
    if d.is_symlink() or not d.is_dir():
        raise BindError(f"{d}: not a staging directory (a symlink or a file): kept, not removed")
    entries = list(d.iterdir())
    unknown = [e.name for e in entries if not _SLOT_RE.fullmatch(e.name) or e.is_symlink() or not e.is_dir()]
    try:
        for entry in entries:
            if entry.name not in unknown:
                mounts.unmount_all(entry)
    except mounts.MountError as err:
        raise BindError(str(err)) from None
    left = _still_mounted(d)
    if left:
        log.error("bind staging dir %s: still mounted after unmounting: %s; kept", d, ", ".join(left))
        raise BindError(f"{d}: {', '.join(left)} still mounted: kept, not removed")
    if unknown:
        raise BindError(f"{d}: holds {', '.join(sorted(unknown))}, which staging did not create: "
                        "kept, not removed")
    for entry in entries:
        _remove_slot(entry)
    d.rmdir()


@releasers.releaser("dir")
async def release_dir_record(r: dict[str, Any]) -> str:
    """A "dir" record (a bind staging dir whose shim crashed): unmount, then remove the slots."""
    path = r["path"]
    if not os.path.isabs(path) or path.rstrip("/") in _REFUSED_DIRS:
        return f"refused to remove {path!r}"
    if not os.path.lexists(path):
        return f"{path} already gone"
    await asyncio.to_thread(release, path)
    return f"removed {path}"
