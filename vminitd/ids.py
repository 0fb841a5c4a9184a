"""Validation of everything the host names: container/exec ids, paths, signals."""
from __future__ import annotations

import re

from spinbox.api import contract

from .errors import InvalidArgument

_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def validate_id(value: str, what: str = "container id") -> str:
    """An id becomes a directory name and a runc id: the shim's rule too (api/contract.py)."""
    problem = contract.id_problem(value)
    if problem is not None:
        raise InvalidArgument(f"invalid {what} {value!r}: {problem}")
    return value


def validate_exec_id(value: str) -> str:
    """'' names the init process; anything else must be a valid id."""
    if value == "":
        return value
    return validate_id(value, "exec id")


def validate_guest_path(value: str, what: str = "path") -> str:
    """An absolute, normalised guest path without '..' components or NULs."""
    if not value or not value.startswith("/") or "\0" in value:
        raise InvalidArgument(f"invalid {what} {value!r}: must be an absolute path")
    parts = value.split("/")
    if any(p == ".." for p in parts):
        raise InvalidArgument(f"invalid {what} {value!r}: must not contain '..'")
    if len(value) > 4096:
        raise InvalidArgument(f"invalid {what}: longer than 4096 bytes")
    return value


def validate_relative_target(value: str, what: str = "mount target") -> str:
    """A path relative to a container rootfs ('' = the rootfs itself), no escape by '..'."""
    if "\0" in value or any(p == ".." for p in value.split("/")):
        raise InvalidArgument(f"invalid {what} {value!r}: must not contain '..'")
    return value.strip("/")


def validate_signal(value: int) -> int:
    if not 1 <= value <= 64:
        raise InvalidArgument(f"invalid signal {value}: must be 1..64")
    return value


def validate_hostname(value: str) -> str:
    if len(value) > 64 or not _HOSTNAME_RE.fullmatch(value):
        raise InvalidArgument(f"invalid hostname {value!r}")
    return value
