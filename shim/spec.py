"""Adapt containerd's OCI spec (config.json in the bundle) for the guest.

The spec names host things. What the shim changes before it goes to the agent:
* `root.path`: the guest path of the shared rootfs;
* the network namespace: the VM is the sandbox's network, so the namespace (and its host CNI
  netns `path`) is dropped -- the container runs in the guest's network namespace;
* other namespace paths: CRI gives a pod's containers `/proc/<pid>/ns/{pid,ipc,uts}` of the
  pod's sandbox (pause) container, where <pid> is the pid this shim reported for it, which is
  its pid in the guest. A path naming a container of this sandbox is kept: the guest's runc
  joins that container's namespace (vminitd.podns checks it again). Any other path is a host
  namespace, which a VM cannot join: refused, never replaced by a new namespace;
* a CRI pod that asks for the host's network, PID or IPC namespace (its spec has no entry of
  that type) is refused before anything is made (`refuse_host_namespaces`): a VM cannot share
  them, and running it with the VM's own instead would be a silent lie;
* hooks: host binaries, dropped;
* bind mounts of host paths: each one is shared into the guest (as the rootfs is) and its
  source rewritten to the guest path, or refused with an error naming the mount. Never
  silently ignored.

Two steps so the sharing (async, sandbox specific) stays out of this pure module:
`plan_binds(spec)` lists what must be shared, `adapt_spec(spec, rootfs, shared)` rewrites.
"""
from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument

_BIND_TYPES = ("bind", "rbind")
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"     # as shim.manager reads it
_NS_PATH_RE = re.compile(r"/proc/([1-9][0-9]{0,9})/ns/([a-z]{1,8})")
_NS_FILES = {"pid": "pid", "ipc": "ipc", "uts": "uts", "mount": "mnt", "user": "user",
             "cgroup": "cgroup", "time": "time"}
# what a CRI pod asking for a host namespace calls it (the spec then has no entry of the type)
_HOST_NAMESPACE_FIELDS = (("network", "hostNetwork"), ("pid", "hostPID"), ("ipc", "hostIPC"))


class SpecError(InvalidArgument, ValueError):
    """The spec cannot run in the guest (maps to INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class BindMount:
    index: int            # position in spec["mounts"]
    source: str           # host path (absolute, normalised)
    destination: str
    readonly: bool
    is_dir: bool
    recursive: bool = False   # rbind: the source's submounts come along (plain bind: not)

    def describe(self) -> str:
        return f"bind mount {self.source!r} -> {self.destination!r}"


def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"OCI spec {path} does not exist") from None
    except ValueError as e:
        raise SpecError(f"OCI spec {path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"OCI spec {path} is not a JSON object")
    return spec


def root_readonly(spec: dict[str, Any]) -> bool:
    """The spec's root.readonly: the rootfs is then shared read-only (on the host side too)."""
    root = spec.get("root")
    return isinstance(root, dict) and root.get("readonly") is True


def mount_points(spec: dict[str, Any], binds: list[BindMount]) -> list[tuple[str, bool]]:
    """(destination, is a directory) of every spec mount: what runc must find in the rootfs.
    A bind of a file needs a file there; everything else a directory."""
    files = {b.index for b in binds if not b.is_dir}
    out = []
    for i, m in enumerate(spec.get("mounts") or []):
        dest = m.get("destination") if isinstance(m, dict) else None
        if isinstance(dest, str) and dest:
            out.append((dest, i not in files))
    return out


def _namespace_types(spec: dict[str, Any]) -> set[Any]:
    linux = spec.get("linux")
    entries = linux.get("namespaces") if isinstance(linux, dict) else None
    return {ns.get("type") for ns in entries or [] if isinstance(ns, dict)}


def refuse_host_namespaces(spec: dict[str, Any]) -> None:
    """A CRI sandbox or container spec without a network/pid/ipc namespace entry asks for the
    host's (hostNetwork/hostPID/hostIPC): refused, naming them and why. Outside CRI (ctr) a
    missing entry keeps meaning "the sandbox's own", as before."""
    ann = spec.get("annotations")
    if not isinstance(ann, dict) or CRI_CONTAINER_TYPE not in ann:
        return
    have = _namespace_types(spec)
    asked = [name for kind, name in _HOST_NAMESPACE_FIELDS if kind not in have]
    if asked:
        raise SpecError(f"the pod asks for {', '.join(asked)}: a spinbox pod runs in its own VM, which "
                        "cannot share the host's network, PID or IPC namespace (run such pods with a "
                        "runtime that shares the host kernel, e.g. runc)")


def _joined_namespace(kind: Any, path: Any, inits: Mapping[int, str]) -> tuple[dict[str, str], str]:
    m = _NS_PATH_RE.fullmatch(path) if isinstance(path, str) else None
    owner = inits.get(int(m.group(1))) if m else None
    if m is None or owner is None or m.group(2) != _NS_FILES.get(kind):
        raise SpecError(f"{kind} namespace path {path!r} is not a namespace of a container in this "
                        "sandbox: a VM cannot join a host namespace")
    return {"type": kind, "path": path}, f"{kind} namespace: joins container {owner}'s in the guest"


def parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """An OCI type that containerd sends as JSON in an Any (exec Process, LinuxResources)."""
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise SpecError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise SpecError(f"{what} must be a JSON object")
    return value


def is_bind(m: dict[str, Any]) -> bool:
    opts = m.get("options") or []
    return m.get("type", "") in _BIND_TYPES or "bind" in opts or "rbind" in opts


def is_recursive(m: dict[str, Any]) -> bool:
    """`rbind` (an option, or the type without a `bind` option) carries the submounts along, as
    runc does; `bind` is the one mount only."""
    opts = m.get("options") or []
    return "rbind" in opts or (m.get("type") == "rbind" and "bind" not in opts)


def plan_binds(spec: dict[str, Any]) -> list[BindMount]:
    """The host paths the spec bind-mounts (to be shared into the guest). A missing or
    relative source is refused here, naming the mount."""
    out = []
    mounts = spec.get("mounts") or []
    if not isinstance(mounts, list):
        raise SpecError("OCI spec mounts must be a list")
    for i, m in enumerate(mounts):
        if not isinstance(m, dict) or not is_bind(m):
            continue
        src = m.get("source", "")
        dest = m.get("destination", "")
        if not isinstance(src, str) or not src.startswith("/"):
            raise SpecError(f"bind mount {src!r} -> {dest!r}: the source must be an absolute host path")
        src = os.path.normpath(src)
        if not os.path.exists(src):
            raise SpecError(f"bind mount {src!r} -> {dest!r}: the source does not exist on the host")
        opts = m.get("options") or []
        out.append(BindMount(i, src, dest, "ro" in opts, os.path.isdir(src), is_recursive(m)))
    return out


def adapt_spec(spec: dict[str, Any], *, rootfs: str, shared: dict[int, str] | None = None,
               terminal: bool | None = None,
               inits: Mapping[int, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Return (spec for the guest, notes on what changed).

    `inits`: pid (as reported, i.e. in the guest) -> id of each container of this sandbox whose
    init runs: the namespaces a namespace path may name.

    `rootfs`: the guest path of the container's root filesystem. `shared`: for every bind
    (`BindMount.index`) the sandbox shared, the guest path of its source; a bind missing there
    is refused with an error naming the mount. `shared=None` means host paths are guest paths
    (a local agent, no VM).
    """
    s = copy.deepcopy(spec)
    notes: list[str] = []
    proc = s.get("process")
    if not isinstance(proc, dict) or not proc.get("args"):
        raise SpecError("OCI spec has no process.args")
    root = s.setdefault("root", {})
    if not isinstance(root, dict):
        raise SpecError("OCI spec root must be an object")
    root["path"] = rootfs
    if terminal is not None:
        proc["terminal"] = bool(terminal)
    if s.pop("hooks", None):
        notes.append("dropped hooks: hook binaries are host paths")

    linux = s.get("linux")
    if isinstance(linux, dict):
        namespaces = []
        for ns in linux.get("namespaces") or []:
            if not isinstance(ns, dict):
                raise SpecError("OCI spec linux.namespaces entries must be objects")
            kind = ns.get("type")
            if kind == "network":
                # The VM's NIC lives in the guest's namespace: that is the sandbox network.
                notes.append(f"network namespace {ns.get('path') or '(new)'!r}: the VM provides the network")
                continue
            if ns.get("path"):
                ns, note = _joined_namespace(kind, ns["path"], inits or {})
                notes.append(note)
            namespaces.append(ns)
        if "namespaces" in linux:
            linux["namespaces"] = namespaces

    for b in plan_binds(spec):
        m = s["mounts"][b.index]
        if shared is None:
            m["source"] = b.source
            continue
        guest_source = shared.get(b.index)
        if guest_source is None:
            raise SpecError(f"{b.describe()}: the host path cannot be shared into the guest")
        m["source"] = guest_source
        notes.append(f"{b.describe()}: shared as {m['source']!r}")
    return s, notes


def adapt_process(process: dict[str, Any], *, terminal: bool) -> dict[str, Any]:
    """An exec's OCI Process for the guest."""
    if not process.get("args"):
        raise SpecError("exec process has no args")
    p = copy.deepcopy(process)
    p["terminal"] = bool(terminal)
    return p


def to_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
