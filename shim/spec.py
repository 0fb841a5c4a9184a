"""Adapt containerd's OCI spec (config.json in the bundle) for the guest.

The spec names host things. What the shim changes before it goes to the agent:
* `root.path`: the guest path of the shared rootfs;
* the network namespace: the VM is the sandbox's network, so the namespace (and its host CNI
  netns `path`) is dropped -- the container runs in the guest's network namespace;
* other namespace paths (`/proc/<host pid>/ns/...`) mean nothing in the guest: dropped with a
  note (a new namespace is made);
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
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument

_BIND_TYPES = ("bind", "rbind")


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
               terminal: bool | None = None) -> tuple[dict[str, Any], list[str]]:
    """Return (spec for the guest, notes on what changed).

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
                notes.append(f"{kind} namespace path {ns['path']!r} is a host path: using a new namespace")
                ns = {"type": kind}
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
