"""`spinbox.monitor.v1.Monitor`: the sandbox's figures, read-only, on the shim's own socket.

`spinbox monitor` (shim.monitor) finds every shim daemon from its state file and calls
`Figures` on it; the answer is what this daemon knows of its sandbox: how the VM started and
how long that took, its size (host truth: the size the guest confirmed, shim.resize), the
guest's own memory and CPU figures (one bounded System.Info call: a slow guest costs one scrape
GUEST_TIMEOUT_S and reads `guest_answered = false`, never a hang), QEMU's CPU time and RSS on
the host, and the daemon's counters (shim.counters). Nothing here changes the sandbox.

The same VM figures feed the Task API's Stats for the sandbox's own task (`apply_vm_figures`):
ctr and CRI decode only containerd's cgroups Metrics, so the VM is mapped onto that type
(docs/monitoring.md, "Stats").
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ttrpc
from spinbox.api._pb.containerd.cgroups.v2 import metrics_pb2
from spinbox.api._pb.spinbox.monitor.v1 import monitor_pb2

from . import counters
from . import resize as resize_mod
from .agent import GuestInfo
from .containers import ContainerManager
from .errors import maps_errors
from .sandbox import VMSandbox
from .sizing import MiB

log = logging.getLogger(__name__)

GUEST_TIMEOUT_S = 1.0          # the guest's Info during a scrape or a Stats call


@dataclass(frozen=True)
class HostUsage:
    """A process's CPU time and resident set, from /proc/<pid>/stat."""
    user_s: float
    system_s: float
    rss_bytes: int


def host_usage(pid: int | None, proc_root: str | Path = "/proc") -> HostUsage | None:
    """QEMU's usage as the host sees it; None when the process is gone."""
    if pid is None:
        return None
    try:
        raw = Path(proc_root, str(pid), "stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parens: count fields after the last ')'
    fields = raw[raw.rindex(b")") + 2:].split()
    tick = os.sysconf("SC_CLK_TCK")
    # fields[0] is field 3 (state): utime 14, stime 15, rss 24 (pages)
    return HostUsage(int(fields[11]) / tick, int(fields[12]) / tick,
                     int(fields[21]) * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class VMFigures:
    vcpus: int
    vcpus_base: int
    memory_bytes: int
    memory_base_bytes: int
    host: HostUsage | None           # QEMU on the host
    guest: GuestInfo | None          # None: the guest did not answer in time (or is lost)

    @property
    def hotplugged_vcpus(self) -> int:
        return max(0, self.vcpus - self.vcpus_base)

    @property
    def hotplugged_memory_bytes(self) -> int:
        return max(0, self.memory_bytes - self.memory_base_bytes)


async def vm_figures(manager: ContainerManager, *, guest_timeout: float = GUEST_TIMEOUT_S) -> VMFigures | None:
    """The VM's figures now; None when the sandbox is not a running VM."""
    sb = manager.sandbox
    if not isinstance(sb, VMSandbox) or sb.guest is None:
        return None
    vm = sb.guest.vm
    base = resize_mod.base_of(vm)
    # the resizer's size is the one the guest confirmed, whoever resized (Create, Update or the
    # vCPU controller); no resizer yet: the boot shape
    size = sb._resizer.size if sb._resizer is not None else base
    guest: GuestInfo | None = None
    if not sb.lost.is_set():
        try:
            guest = await sb.agent_client.info(timeout=guest_timeout)
        except Exception as e:             # a figure is missing, the scrape goes on
            log.debug("monitor: guest info: %s", e)
    host = host_usage(vm.pid) if vm.alive else None     # a dead QEMU's pid may be another's now
    return VMFigures(size.vcpus, base.vcpus, size.memory_mb * MiB, base.memory_mb * MiB, host, guest)


def apply_vm_figures(m: metrics_pb2.Metrics, vm: VMFigures) -> None:
    """The sandbox's own task reports the whole VM in containerd's cgroups v2 Metrics:
    memory.usage_limit = the VM's memory (base + plugged, host truth); from the guest's Info,
    memory.usage = its used memory (MemTotal - MemAvailable) and cpu.usage_usec = the busy time
    of all its vCPUs (/proc/stat, which has no user/system split in the agent API: both 0).
    When the guest did not answer in time the container's own memory and cpu figures stay.
    pids and OOM kills stay the container's. QEMU's host CPU is in the monitor only: under TCG
    it is mostly translation, not the workload."""
    m.memory.usage_limit = vm.memory_bytes
    if vm.guest is not None:
        m.memory.usage = vm.guest.memory_used_bytes
        m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec = vm.guest.cpu_busy_ms * 1000, 0, 0


def is_sandbox_task(manager: ContainerManager, container_id: str) -> bool:
    """The task that stands for the whole VM: the one named like the sandbox (CRI's pause
    container, whose id is the pod sandbox id; under ctr the task the shim was started for)."""
    sb = manager.sandbox
    return sb is not None and sb.id == container_id


def figures_response(manager: ContainerManager, vm: VMFigures | None, *, uptime_s: float,
                     calls: counters.AgentCalls = counters.AGENT_CALLS,
                     stdio: counters.StdioBytes = counters.STDIO,
                     resizes: counters.Resizes = counters.RESIZES) -> monitor_pb2.FiguresResponse:
    sb = manager.sandbox
    r = monitor_pb2.FiguresResponse(
        state=sb.state.value if sb is not None else "none",
        containers=len(manager.containers), tasks_started=calls.tasks_started,
        execs_started=calls.execs_started, stdio_out_bytes=stdio.out, stdio_in_bytes=stdio.into,
        vcpu_hotplug_events=resizes.vcpu_changes, memory_hotplug_events=resizes.memory_changes,
        lost=sb is not None and sb.lost.is_set(), uptime_seconds=uptime_s,
        latency_bounds=counters.LATENCY_BOUNDS)
    if isinstance(sb, VMSandbox) and sb.guest is not None:
        r.start_kind = sb.start_kind
        r.start_seconds = sb.guest.timeline.get("ready", 0.0)
    if vm is not None:
        r.vcpus, r.vcpus_base = vm.vcpus, vm.vcpus_base
        r.memory_bytes, r.memory_base_bytes = vm.memory_bytes, vm.memory_base_bytes
        r.hotplugged_vcpus, r.hotplugged_memory_bytes = vm.hotplugged_vcpus, vm.hotplugged_memory_bytes
        if vm.host is not None:
            r.vm_cpu_user_seconds, r.vm_cpu_system_seconds = vm.host.user_s, vm.host.system_s
            r.vm_rss_bytes = vm.host.rss_bytes
        if vm.guest is not None:
            r.guest_answered = True
            r.guest_memory_total_bytes = vm.guest.memory_total_bytes
            r.guest_memory_used_bytes = vm.guest.memory_used_bytes
            r.guest_cpus_online = vm.guest.cpus_online
            r.guest_cpu_busy_seconds = vm.guest.cpu_busy_ms / 1000
            r.guest_cpu_idle_seconds = vm.guest.cpu_idle_ms / 1000
    for method, f in sorted(calls.methods.items()):
        r.agent_calls.append(monitor_pb2.AgentCall(method=method, calls=f.calls, failures=f.failures,
                                                   seconds_sum=f.seconds, bucket_counts=f.cumulative()))
    return r


class MonitorService:
    """One per shim daemon, beside the Task service, on the same socket (same peer check)."""

    def __init__(self, manager: ContainerManager, *, guest_timeout: float = GUEST_TIMEOUT_S) -> None:
        self.manager = manager
        self.guest_timeout = guest_timeout
        self.started = time.monotonic()

    def register(self, server: ttrpc.Server) -> None:
        server.register(monitor_pb2.DESCRIPTOR.services_by_name["Monitor"], self)

    @maps_errors
    async def Figures(self, req: monitor_pb2.FiguresRequest, ctx: ttrpc.CallContext) -> monitor_pb2.FiguresResponse:
        vm = await vm_figures(self.manager, guest_timeout=self.guest_timeout)
        return figures_response(self.manager, vm, uptime_s=time.monotonic() - self.started)
