"""Turn the host's OCI spec into a bundle runc can run inside the guest.

The host's config.json names host things: a rootfs path, namespace paths (a CNI netns,
/proc/<host pid>/ns/...), a host cgroup path, hooks that are host binaries, LSM labels of the
host. Inside the VM the container uses the guest's root network namespace (the VM's NIC is the
sandbox's network), a cgroup under /spinbox, and the rootfs the host shared; a namespace path
joins the namespace of another container of the pod (podns).
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import podns
from .errors import InvalidArgument
from .ids import validate_guest_path

CGROUP_PARENT = "/spinbox"
_REQUIRED_NAMESPACES = ("pid", "ipc", "uts", "mount")
_BIND_TYPES = ("bind", "rbind")


def cgroup_path(container_id: str, parent: str = CGROUP_PARENT) -> str:
    return f"{parent}/{container_id}"


def parse_spec(raw: bytes, what: str = "OCI spec") -> dict[str, Any]:
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return spec


# crun 1.8.1 (Debian 12's, in the image) refuses a spec whose ociVersion is not 1.0.x ("unknown
# version specified"); ctr 1.7 writes 1.2.0 and ctr 2.1 1.2.1. The fields containerd sets that
# came after 1.0 are ignored by that crun, so the version is pinned for it (runc takes them all).
CRUN_OCI_VERSION = "1.0.2"


def pin_oci_version(spec: dict[str, Any], runtime_binary: str) -> str | None:
    """For crun: ociVersion 1.0.x. Returns a note when it changed the spec."""
    if os.path.basename(runtime_binary) != "crun":
        return None
    v = str(spec.get("ociVersion", ""))
    if v.startswith("1.0"):
        return None
    spec["ociVersion"] = CRUN_OCI_VERSION
    return f"ociVersion {v!r} pinned to {CRUN_OCI_VERSION} for crun"


def adapt_spec(spec: dict[str, Any], container_id: str, rootfs: str, *, terminal: bool,
               readonly: bool | None = None, guest_root: str = "/",
               cgroup_parent: str = CGROUP_PARENT,
               sandbox_files: dict[str, str] | None = None,
               inits: Mapping[int, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Return (adapted spec, notes about what was changed). `guest_root` lets tests check bind
    sources against a different root. `inits` (pid -> container id of the live container inits):
    the containers whose namespaces a namespace path may name (podns.joined_namespace). `sandbox_files` (container path → guest file, what
    Network.Configure wrote: /etc/resolv.conf, /etc/hosts) are bind-mounted read-only where the
    spec does not mount something there itself. The hostname is left as the spec says: the
    container has its own UTS namespace."""
    s = copy.deepcopy(spec)
    notes: list[str] = []
    if not isinstance(s.get("process"), dict) or not s["process"].get("args"):
        raise InvalidArgument("OCI spec has no process.args")
    s.setdefault("ociVersion", "1.0.2")
    root = s.setdefault("root", {})
    root["path"] = validate_guest_path(rootfs, "rootfs path")
    if readonly is not None:
        root["readonly"] = bool(readonly)
    s["process"]["terminal"] = bool(terminal)
    for key in ("selinuxLabel", "apparmorProfile"):
        if s["process"].pop(key, None):
            notes.append(f"dropped process.{key}: the guest kernel has no such LSM")
    if s.pop("hooks", None):
        notes.append("dropped hooks: hook binaries are host paths")

    linux = s.setdefault("linux", {})
    linux["cgroupsPath"] = cgroup_path(container_id, cgroup_parent)
    if linux.pop("mountLabel", None):
        notes.append("dropped linux.mountLabel")
    namespaces = []
    for ns in linux.get("namespaces") or []:
        kind = ns.get("type")
        if kind == "network":
            notes.append("network namespace: the container uses the VM's network")
            continue
        if ns.get("path"):
            ns, note = podns.joined_namespace(kind, ns["path"], inits or {})
            notes.append(note)
        namespaces.append(ns)
    for kind in _REQUIRED_NAMESPACES:
        if not any(ns.get("type") == kind for ns in namespaces):
            namespaces.append({"type": kind})
    linux["namespaces"] = namespaces

    for m in s.get("mounts") or []:
        mtype = m.get("type", "")
        opts = m.get("options") or []
        if mtype in _BIND_TYPES or "bind" in opts or "rbind" in opts:
            src = m.get("source", "")
            host_src = os.path.join(guest_root, src.lstrip("/"))
            if not src.startswith("/") or not os.path.exists(host_src):
                raise InvalidArgument(
                    f"bind mount {src!r} -> {m.get('destination')!r} does not exist in the guest; "
                    "the host must share it into the VM first")
    if sandbox_files:
        _bind_sandbox_files(s, sandbox_files, notes)
    return s, notes


def _exists_in_rootfs(rootfs: str, path: str, hops: int = 8) -> bool:
    """Does `path` exist in the container's rootfs, following a symlink in its last component as
    runc would (inside the rootfs)?"""
    for _ in range(hops):
        full = os.path.join(rootfs, path.lstrip("/"))
        if not os.path.islink(full):
            return os.path.exists(full)
        target = os.readlink(full)
        path = target if target.startswith("/") else os.path.join(os.path.dirname(path), target)
    return False


def _bind_sandbox_files(s: dict[str, Any], files: dict[str, str], notes: list[str]) -> None:
    mounts = s.setdefault("mounts", [])
    taken = {os.path.normpath(d) for m in mounts
             if isinstance(m, dict) and isinstance(d := m.get("destination"), str) and d}
    for dest, source in sorted(files.items()):
        if dest in taken:
            notes.append(f"{dest}: the spec mounts its own, not the sandbox's")
            continue
        if s["root"].get("readonly") and not _exists_in_rootfs(s["root"]["path"], dest):
            # runc would have to create the mount point in a read-only rootfs and fail.
            notes.append(f"{dest}: not bind-mounted, the read-only rootfs has no file there")
            continue
        mounts.append({"destination": dest, "type": "bind", "source": source,
                       "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})


def adapt_process(process: dict[str, Any], *, terminal: bool) -> dict[str, Any]:
    """An exec's OCI Process for `runc exec --process`."""
    p = copy.deepcopy(process)
    if not isinstance(p, dict) or not p.get("args"):
        raise InvalidArgument("exec process has no args")
    if "cwd" not in p:
        p["cwd"] = "/"
    p["terminal"] = bool(terminal)
    for key in ("selinuxLabel", "apparmorProfile"):
        p.pop(key, None)
    return p


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
