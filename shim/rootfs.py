"""containerd's snapshot mounts on <bundle>/rootfs (mount at Create, unmount at Delete).

containerd sends the snapshotter's mounts (typically one `overlay`, or a `bind` for the native
snapshotter); an empty list means the rootfs is already in place in the bundle. The mounted
tree is then shared into the guest by the sandbox (virtiofs for a VM; the path itself for a
local agent).

The mounting itself is shim.mounts' (util-linux `mount` for containerd's option lists,
`unmount_all` for the way back); this module only knows what a rootfs is. After a crash the
"mount" state record of the rootfs is released by shim.mounts as well.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.shim import mounts
from spinbox.shim.errors import HostError
from spinbox.shim.mounts import is_mountpoint

__all__ = ["MountSpec", "RootfsMount", "RootfsError", "mount_rootfs", "release", "is_mountpoint"]

log = logging.getLogger(__name__)


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


async def mount_rootfs(bundle: str | os.PathLike[str], specs: list[MountSpec]) -> RootfsMount:
    """Mount containerd's rootfs mounts on <bundle>/rootfs, in order. With no mounts the
    directory must already hold the rootfs. A failure unmounts what was mounted."""
    root = Path(bundle) / "rootfs"
    if not specs:
        if not root.is_dir():
            raise RootfsError(f"no rootfs mounts were given and {root} is not a directory")
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
