"""The typed results of agent calls and events, built only from validated guest values."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# containerd.v1.types.Status numbers -> names
STATUS_NAMES = {0: "unknown", 1: "created", 2: "running", 3: "stopped", 4: "paused", 5: "pausing"}

@dataclass(frozen=True)
class ExitStatus:
    exit_status: int
    exited_at_ns: int
    pid: int


@dataclass(frozen=True)
class ProcessState:
    id: str
    exec_id: str
    pid: int
    status: int           # containerd.v1.types.Status numbers
    terminal: bool
    exit_status: int
    exited_at_ns: int
    stdin: bool
    stdout: bool
    stderr: bool

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, "unknown")


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    exec_id: str


@dataclass(frozen=True)
class Stats:
    cpu_usage_ns: int
    cpu_user_ns: int
    cpu_system_ns: int
    memory_usage_bytes: int
    memory_limit_bytes: int
    pids_current: int
    pids_limit: int
    oom_kills: int
    raw: bytes            # `runc events --stats` JSON (bounded); parse with care


@dataclass(frozen=True)
class GuestVersion:
    agent_version: str
    api: str
    runtime: str


@dataclass(frozen=True)
class GuestInfo:
    kernel: str
    cpus_online: int
    cpus_present: int
    memory_total_bytes: int
    memory_available_bytes: int
    uptime_s: float
    pid1: bool
    cpu_busy_ms: int = 0        # all CPUs since boot (/proc/stat): the vCPU controller's input
    cpu_idle_ms: int = 0

    @property
    def memory_used_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_available_bytes)


@dataclass(frozen=True)
class CpuOnline:
    onlined: int
    online: int
    present: int


@dataclass(frozen=True)
class MemoryOnline:
    blocks_onlined: int
    blocks_online: int
    memory_total_bytes: int


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str = ""
    options: Sequence[str] = ()


@dataclass(frozen=True)
class AgentEvent:
    seq: int
    timestamp_ns: int
    gap: bool                 # events before this one were dropped from the guest's ring
    kind: str                 # "exit" | "oom"
    id: str
    exec_id: str = ""
    pid: int = 0
    exit_status: int = 0
    exited_at_ns: int = 0

