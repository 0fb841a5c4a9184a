"""Who releases each kind of state record: a registry filled by the modules that own the kinds.

shim.state records *what* exists on the host (crash-safe, see its docstring); it does not know
how any of it is released. The module that creates a kind of resource registers the async
function that releases one record of that kind, at import:

    @releasers.releaser("mount")
    async def release_mount_record(r: dict[str, Any]) -> str: ...   # returns what it did

| kind      | recorded by                           | released by (module: function)                  |
|-----------|---------------------------------------|-------------------------------------------------|
| `mount`   | shim.containers (a container's rootfs)| shim.mounts: release_mount_record (unmount all) |
| `dir`     | shim.sandbox (a bind staging dir)     | shim.binds: release_dir_record (unmount, remove)|
| `vm`      | shim.assembly (the VM's state dir)    | shim.vm.machine: release_vm_record              |
| `network` | shim.network.attachment               | shim.network.attachment: release_network_record |
| `cgroup`  | shim.vm.hostcgroup (a sandbox's cgroup)| shim.vm.hostcgroup: release_cgroup_record     |
| `socket`  | manager `start`, daemon (-socket)     | here: release_socket_record                     |
| `vmsize`  | shim.resize (a VM's confirmed size)   | shim.resize: release_size_record (says it; the devices go with QEMU) |

A process that only cleans up (`delete`, the daemon's exit) may never have imported an owner:
`lookup` of a kind nobody registered yet runs `register_all()`, which imports every owner, so
cleanup never misses a kind and no caller has to remember to register first.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Releaser = Callable[[dict[str, Any]], Awaitable[str]]

# The modules whose import registers a kind (the table above). Imported lazily: they import
# this module themselves, and `start` should not pay for modules it does not need.
OWNERS = (
    "spinbox.shim.mounts",
    "spinbox.shim.binds",
    "spinbox.shim.vm.machine",
    "spinbox.shim.vm.hostcgroup",
    "spinbox.shim.network.attachment",
    "spinbox.shim.resize",
)

_registry: dict[str, Releaser] = {}


def register(kind: str, fn: Releaser) -> None:
    """Make `fn` the releaser of records of `kind` (one per kind; re-registering replaces)."""
    _registry[kind] = fn


def releaser(kind: str) -> Callable[[Releaser], Releaser]:
    """Decorator form of `register`."""
    def deco(fn: Releaser) -> Releaser:
        register(kind, fn)
        return fn
    return deco


def register_all() -> None:
    """Import every owning module, so every kind has its releaser (idempotent, cheap after the
    first call)."""
    for name in OWNERS:
        importlib.import_module(name)


def lookup(kind: str) -> Releaser | None:
    """The releaser of `kind`, or None if no module registers one."""
    fn = _registry.get(kind)
    if fn is None:
        register_all()
        fn = _registry.get(kind)
    return fn


def kinds() -> frozenset[str]:
    """Every registered kind (after importing every owner)."""
    register_all()
    return frozenset(_registry)


# ---------------------------------------------------------------------------------------------
# kinds without a module of their own

@releaser("socket")
async def release_socket_record(r: dict[str, Any]) -> str:
    """The daemon's listening socket: unlinked only if the path is still that inode (a new
    shim of the same group may have bound a new socket there meanwhile)."""
    path = r["path"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path} already gone"
    if "ino" in r and (st.st_ino, st.st_dev) != (r["ino"], r.get("dev", st.st_dev)):
        return f"{path} belongs to someone else now (kept)"
    os.unlink(path)
    return f"removed {path}"
