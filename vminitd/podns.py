"""A pod's shared namespaces inside the guest.

Under CRI every container of a pod joins namespaces of the pod's sandbox (pause) container:
UTS always, IPC and PID when the pod shares them, PID of another container for a debug
container that targets it. The host sends those as `/proc/<guest pid>/ns/<kind>` paths (the
pid is the one the guest reported for that container's init: the shim checked that it names a
container of this sandbox). Here each path is checked against the containers the agent runs:
a path that names anything else (a process that is not a live container init, another kind of
namespace, a file that is not under /proc) is refused, never silently replaced by a new
namespace (that was the bug: a pod's containers did not share its PID/IPC namespaces and did
not see its sysctls).

The network namespace is the VM's own (the VM is the pod's network), so `net.*` sysctls of a
spec cannot be set by runc (it refuses them outside a private network namespace): the agent
writes them into the guest's network namespace itself, which is the pod's, as runc would have
in the pod's netns.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidArgument

# OCI namespace type -> the file under /proc/<pid>/ns/
NS_FILES = {"pid": "pid", "ipc": "ipc", "uts": "uts", "mount": "mnt", "user": "user",
            "cgroup": "cgroup", "time": "time"}
_NS_PATH_RE = re.compile(r"/proc/([1-9][0-9]{0,9})/ns/([a-z]{1,8})")
_SYSCTL_KEY_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+){1,9}")
MAX_SYSCTL_VALUE = 256
MAX_SYSCTLS = 64
PROC_SYS = "/proc/sys"


def joined_namespace(kind: str, path: Any, inits: Mapping[int, str]) -> tuple[dict[str, str], str]:
    """({"type", "path"} for runc, a note) for a namespace entry with a path. `inits`: pid ->
    container id of every container init the agent runs that has not exited."""
    if kind not in NS_FILES:
        raise InvalidArgument(f"namespace type {kind!r} is not one the guest knows")
    m = _NS_PATH_RE.fullmatch(path) if isinstance(path, str) else None
    if m is None:
        raise InvalidArgument(f"{kind} namespace path {path!r}: the guest can only join a namespace of "
                              "another container of the pod (/proc/<pid>/ns/<kind>)")
    pid, file = int(m.group(1)), m.group(2)
    if file != NS_FILES[kind]:
        raise InvalidArgument(f"{kind} namespace path {path!r} names a {file} namespace")
    owner = inits.get(pid)
    if owner is None:
        raise InvalidArgument(f"{kind} namespace path {path!r}: pid {pid} is not a running container "
                              "of this sandbox")
    return {"type": kind, "path": path}, f"{kind} namespace: joins container {owner}'s"


def joins_pid_namespace(spec: Mapping[str, Any]) -> bool:
    """The container shares a PID namespace it does not own: when its init exits the kernel
    does not end the rest of its processes, the agent must (as containerd's runc shim does)."""
    linux = spec.get("linux")
    for ns in (linux.get("namespaces") or []) if isinstance(linux, Mapping) else []:
        if isinstance(ns, Mapping) and ns.get("type") == "pid" and ns.get("path"):
            return True
    return False


def split_net_sysctls(linux: dict[str, Any]) -> dict[str, str]:
    """Remove the `net.*` sysctls from `linux.sysctl` and return them (checked): they are set in
    the guest's network namespace, the pod's. Others stay for runc (it sets them in the
    container's namespaces: the shared IPC namespace for kernel.shm*, fs.mqueue.*)."""
    sysctls = linux.get("sysctl")
    if sysctls is None:
        return {}
    if not isinstance(sysctls, dict):
        raise InvalidArgument("linux.sysctl must be an object")
    if len(sysctls) > MAX_SYSCTLS:
        raise InvalidArgument(f"linux.sysctl has {len(sysctls)} entries (at most {MAX_SYSCTLS})")
    net: dict[str, str] = {}
    for key in list(sysctls):
        value = sysctls[key]
        if not isinstance(key, str) or not _SYSCTL_KEY_RE.fullmatch(key):
            raise InvalidArgument(f"sysctl {key!r} is not a sysctl name")
        if not isinstance(value, str) or len(value) > MAX_SYSCTL_VALUE or "\n" in value or "\0" in value:
            raise InvalidArgument(f"sysctl {key}: value must be one line of at most {MAX_SYSCTL_VALUE} characters")
        if key.startswith("net."):
            net[key] = sysctls.pop(key)
    if not sysctls:
        linux.pop("sysctl")
    return net


def sysctl_path(key: str, root: str = PROC_SYS) -> str:
    return os.path.join(root, *key.split("."))


def apply_sysctls(values: Mapping[str, str], root: str = PROC_SYS) -> None:
    """Write checked sysctls (split_net_sysctls) in the agent's own namespaces."""
    for key, value in values.items():
        path = sysctl_path(key, root)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)   # never creates one
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise InvalidArgument(f"sysctl {key}: the guest kernel has no such sysctl") from None
        except OSError as e:
            raise InvalidArgument(f"sysctl {key}={value!r}: {os.strerror(e.errno or 0)}") from None
