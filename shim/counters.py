"""Cheap counters of one shim daemon, read by its Monitor service (shim.monitor_service).

One daemon serves one sandbox, so the counters are per process: the agent client counts each
unary call where it makes it (`AGENT_CALLS.observe`), the stdio pumps the bytes they copied
(`STDIO`). They sit on hot paths: an update is a dict lookup, a bisect and a few integer adds,
with no lock (the daemon is one event loop; a thread reading a figure may see it one call
late, never torn, since every field is replaced by one assignment).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds (seconds) of the agent latency buckets: a TCG guest answers a ping in ~1 ms and
# a Create in ~0.5 s; a call past 10 s has hit its timeout (contract.AGENT_CALL_TIMEOUT_S).
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_METHODS = 64          # the client has ~30 methods; a bound so a bug cannot grow the table


@dataclass
class CallFigures:
    """One method: calls, failures, total seconds and per-bucket counts (not cumulative)."""
    calls: int = 0
    failures: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))

    def cumulative(self) -> list[int]:
        """Counts of calls at or below each bound (the +Inf bucket is `calls`)."""
        out, total = [], 0
        for n in self.buckets[:len(LATENCY_BOUNDS)]:
            total += n
            out.append(total)
        return out


class AgentCalls:
    def __init__(self) -> None:
        self.methods: dict[str, CallFigures] = {}
        self.tasks_started = 0      # container inits started in the guest
        self.execs_started = 0

    def observe(self, method: str, seconds: float, ok: bool) -> None:
        f = self.methods.get(method)
        if f is None:
            if len(self.methods) >= MAX_METHODS:
                return
            f = self.methods[method] = CallFigures()
        f.calls += 1
        if not ok:
            f.failures += 1
        f.seconds += seconds
        f.buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1

    def started(self, exec_id: str) -> None:
        if exec_id:
            self.execs_started += 1
        else:
            self.tasks_started += 1


@dataclass
class StdioBytes:
    out: int = 0        # guest stdout/stderr written into containerd's FIFOs (or discarded)
    into: int = 0       # containerd's stdin sent to the guest


@dataclass
class Resizes:
    """The VM's confirmed size changes (shim.resize: Create's sizing, Update, the controller)."""
    vcpu_changes: int = 0       # vCPUs added or given back (plugged, unplugged, parked, unparked)
    memory_changes: int = 0     # memory grown or shrunk (virtio-mem or pc-dimm)

    def observe(self, vcpus_before: int, vcpus_after: int, mb_before: int, mb_after: int) -> None:
        self.vcpu_changes += abs(vcpus_after - vcpus_before)
        if mb_after != mb_before:
            self.memory_changes += 1


AGENT_CALLS = AgentCalls()
STDIO = StdioBytes()
RESIZES = Resizes()
