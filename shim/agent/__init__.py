"""Host-side client of the guest agent (vminitd), by concern:

    errors      AgentError / AgentProtocolError / AgentUnavailable (branches of shim.errors)
    records     the typed results: ExitStatus, ProcessState, Stats, AgentEvent, Mount, ...
    validate    checks on every guest value, and on our own request ids
    transport   opening the unix-socket / vsock channel; the connection and its readiness probe
    client      AgentClient: one method per agent call, plus events() and the stream openers
    streams     OutputStream / InputStream: a process's stdio, credit-controlled
"""
from __future__ import annotations

from spinbox.api.contract import SHARES_ROOT

from .client import AgentClient
from .errors import AgentError, AgentProtocolError, AgentUnavailable
from .records import (AgentEvent, CpuOnline, ExitStatus, GuestInfo, GuestVersion, MemoryOnline,
                      Mount, ProcessInfo, ProcessState, Stats)
from .streams import InputStream, OutputStream
from .transport import Address
from .validate import (PID_MAX, check_exit_status, check_guest_id, check_pid, check_string,
                       check_time_ns)

__all__ = [
    "PID_MAX", "SHARES_ROOT", "Address", "AgentClient", "AgentError",
    "AgentEvent", "AgentProtocolError", "AgentUnavailable", "CpuOnline", "ExitStatus",
    "GuestInfo", "GuestVersion", "InputStream", "MemoryOnline", "Mount", "OutputStream",
    "ProcessInfo", "ProcessState", "Stats", "check_exit_status", "check_guest_id", "check_pid",
    "check_string", "check_time_ns",
]
