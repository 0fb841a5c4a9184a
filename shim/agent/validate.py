"""Checks on everything the guest sends (untrusted) and on our own request ids.

A guest value that breaks the contract raises `AgentProtocolError`; a bad id of ours raises
`ValueError` before anything is sent. The id rule and the pid bound are the wire contract's
(`spinbox.api.contract`).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from spinbox.api import contract

from .errors import AgentProtocolError

log = logging.getLogger(__name__)

PID_MAX = contract.PID_MAX
MAX_STRING = 4096                # any string from the guest
MAX_ERROR_MESSAGE = 2048         # a guest error message is truncated to this

_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")   # a Linux link name (IFNAMSIZ)


def protocol_error(msg: str) -> AgentProtocolError:
    """The error for a guest reply or event that breaks the contract."""
    return AgentProtocolError(f"guest agent protocol violation: {msg}")


def check_pid(pid: int, what: str, *, allow_zero: bool = False) -> int:
    if not contract.is_valid_pid(pid, allow_zero=allow_zero):
        raise protocol_error(f"{what}: pid {pid} outside {0 if allow_zero else 1}..{PID_MAX - 1}")
    return pid


def check_exit_status(status: int, what: str) -> int:
    if not 0 <= status <= 255:
        raise protocol_error(f"{what}: exit status {status} outside 0..255")
    return status


def check_time_ns(t: int, what: str) -> int:
    if t < 0:
        raise protocol_error(f"{what}: negative time {t}")
    return t


def check_string(s: str, what: str, limit: int = MAX_STRING) -> str:
    if len(s) > limit:
        raise protocol_error(f"{what}: string of {len(s)} characters (limit {limit})")
    if any(c in s for c in "\0\r\n"):
        raise protocol_error(f"{what}: control characters in {s[:80]!r}")
    return s


def check_guest_id(s: str, what: str, *, allow_empty: bool = False) -> str:
    if s == "" and allow_empty:
        return s
    if not contract.is_valid_id(s):
        raise protocol_error(f"{what}: invalid id {s[:80]!r}")
    return s


def check_link_name(name: str, what: str) -> str:
    if not _IFNAME_RE.fullmatch(name):
        raise protocol_error(f"{what}: invalid link name {check_string(name, 'name', 64)!r}")
    return name


def check_request_id(s: str, what: str, *, allow_empty: bool = False) -> str:
    """Our own arguments: refuse early with ValueError (the guest would refuse them too)."""
    if s == "" and allow_empty:
        return s
    problem = contract.id_problem(s)
    if problem is not None:
        raise ValueError(f"invalid {what} {s!r}: {problem}")
    return s


def sanitize(message: str) -> str:
    """A guest error message made safe to log and pass on: printable and bounded."""
    clean = "".join(c if c.isprintable() else "?" for c in message[:MAX_ERROR_MESSAGE])
    return clean + ("..." if len(message) > MAX_ERROR_MESSAGE else "")


def as_json(value: dict[str, Any] | bytes | str) -> bytes:
    """An OCI document for the wire: bytes pass through, str is encoded, a dict is dumped."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()
