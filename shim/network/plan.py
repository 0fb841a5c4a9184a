"""Which network a sandbox gets, decided from its first container's OCI spec (pure).

* `none`     -- loopback only: the config says `network.enabled: false`, or the spec's
                annotation `io.containerd.spinbox.v1.network` is `none`.
* `existing` -- CRI: the spec's network namespace has a `path` (containerd's CRI created the pod
                netns and already ran CNI in it); the shim only plumbs what it finds there.
* `cni`      -- `ctr run`: the shim creates a netns and runs CNI itself. When no network is named
                (config or annotation) and the CNI conf dir holds no config at all, the sandbox
                gets loopback only with a warning, as `ctr run` with runc gets an empty netns
                -- containerd without CNI configured must keep working. A named network that is
                missing, or a broken config, is an error.

A spec without a network namespace (`ctr run --net-host`) cannot share the host's network from
inside a VM; it gets the sandbox network like any other (noted in the reason).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spinbox.shim.errors import InvalidArgument

from . import cni

log = logging.getLogger(__name__)

ANNOTATION = "io.containerd.spinbox.v1.network"             # "none" | "cni" | "cni:<network name>"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class PlanError(InvalidArgument):
    """A spec or annotation names an impossible network (message names the field)."""


@dataclass(frozen=True)
class NetworkChoice:
    mode: str                  # "none" | "cni" | "existing"
    reason: str
    netns_path: str = ""       # existing
    network: str = ""          # cni: network name ("" = the first config in the conf dir)
    required: bool = False     # cni: fail (rather than fall back to loopback) without a config


def _netns_entry(spec: Mapping[str, Any]) -> dict | None:
    linux = spec.get("linux") if isinstance(spec, Mapping) else None
    for ns in (linux or {}).get("namespaces") or [] if isinstance(linux, Mapping) else []:
        if isinstance(ns, Mapping) and ns.get("type") == "network":
            return dict(ns)
    return None


def choose(spec: Mapping[str, Any], *, enabled: bool = True, network: str = "") -> NetworkChoice:
    """`enabled`/`network`: the config's network.enabled / network.network."""
    ann = spec.get("annotations") if isinstance(spec, Mapping) else None
    value = (ann or {}).get(ANNOTATION, "") if isinstance(ann, Mapping) else ""
    if not isinstance(value, str):
        raise PlanError(f"annotation {ANNOTATION} must be a string")
    value = value.strip()
    if value and value != "none" and value != "cni" and not value.startswith("cni:"):
        raise PlanError(f"annotation {ANNOTATION}={value!r}: want none, cni or cni:<network name>")
    if value.startswith("cni:"):
        network = value[4:]
        if not _NAME_RE.fullmatch(network):
            raise PlanError(f"annotation {ANNOTATION}={value!r}: {network!r} is not a CNI network name")
    if not enabled:
        return NetworkChoice("none", "network.enabled is false in the spinbox config")
    if value == "none":
        return NetworkChoice("none", f"annotation {ANNOTATION}=none")
    entry = _netns_entry(spec)
    path = (entry or {}).get("path") or ""
    if path:
        if not isinstance(path, str) or not path.startswith("/"):
            raise PlanError(f"linux.namespaces network path {path!r} is not an absolute path")
        return NetworkChoice("existing", "the spec joins an existing network namespace (CRI)", netns_path=path)
    reason = ("the spec asks for the host network, which a VM cannot share: using the sandbox network"
              if entry is None else "a new network namespace: the shim runs CNI")
    return NetworkChoice("cni", reason, network=network, required=bool(network))


def resolve(choice: NetworkChoice, conf_dir: str) -> tuple[NetworkChoice, cni.NetworkConfigList | None]:
    """Load the CNI config for a `cni` choice. No config anywhere and none named: loopback only.
    Raises cni.CNIConfigError for a broken config or a named network that is missing."""
    if choice.mode != "cni":
        return choice, None
    if not choice.required and not cni.conf_files(conf_dir):
        return NetworkChoice("none", f"no CNI network config in {conf_dir}: loopback only"), None
    return choice, cni.load_network(conf_dir, choice.network)


def guest_hostname(spec: Mapping[str, Any]) -> str:
    """The spec's hostname when it is a valid RFC 1123 host name (the guest takes it), else ""
    (the guest keeps its own; the container's UTS namespace still gets the spec's value)."""
    name = spec.get("hostname") if isinstance(spec, Mapping) else None
    if not isinstance(name, str) or not 0 < len(name) <= 253:
        return ""
    return name if all(_LABEL_RE.fullmatch(label) for label in name.split(".")) else ""
