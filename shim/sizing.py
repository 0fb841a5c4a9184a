"""How big a sandbox's VM must be: pure logic, no I/O (docs/sizing.md).

    need = need_of_spec(spec)               # one container: linux.resources + our annotations
    size = target(base, [needs...], pod)    # the sandbox: the guest's base + every container
    check(size, limits)                     # over a ceiling: SizingError naming it, nothing done

The base is the VM's boot size (cpu_hotplug.vcpus, memory_hotplug.memory_mb): what the guest
itself (kernel, vminitd) runs in. Containers' vCPUs are added on top of nothing (a guest idles
on the base vCPUs and containers share them), their memory limits on top of the base memory.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument

MiB = 1024 * 1024
ANN_VCPUS = "io.containerd.spinbox.v1.vcpus"
ANN_MEMORY_MB = "io.containerd.spinbox.v1.memory_mb"
CRI_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
CRI_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
CRI_CPU_SHARES = "io.kubernetes.cri.sandbox-cpu-shares"
CRI_MEMORY = "io.kubernetes.cri.sandbox-memory"
DEFAULT_CFS_PERIOD = 100_000
MEMORY_ALIGN_MB = 2          # virtio-mem hands out 2 MiB blocks


class SizingError(InvalidArgument):
    """A size that cannot be had: a bad value, or over a ceiling (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Need:
    """What one workload asks for; None = it does not say."""
    vcpus: int | None = None
    memory_mb: int | None = None


@dataclass(frozen=True)
class Size:
    vcpus: int
    memory_mb: int

    def describe(self) -> str:
        return f"{self.vcpus} vCPU(s) / {self.memory_mb} MiB"


@dataclass(frozen=True)
class Limits:
    """The ceilings of one VM: config (cpu_hotplug.max_vcpus, memory_hotplug.max_memory_mb),
    which on microvm or backend `none` equal the boot size."""
    max_vcpus: int
    max_memory_mb: int
    machine: str = "q35"
    memory_backend: str = "virtio-mem"


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SizingError(f"{what}: must be an integer (got {value!r})")
    try:
        n = int(value)
    except ValueError:
        raise SizingError(f"{what}: must be an integer (got {value!r})") from None
    if not lo <= n <= hi:
        raise SizingError(f"{what}: must be {lo}..{hi} (got {n})")
    return n


def vcpus_of_quota(quota: int, period: int | None) -> int | None:
    """CFS quota/period → whole vCPUs, rounded up; no limit (quota <= 0) → None."""
    if quota <= 0:
        return None
    p = period if period and period > 0 else DEFAULT_CFS_PERIOD
    return math.ceil(quota / p)


def cpuset_count(cpus: str) -> int:
    """vCPUs a cpuset needs: the highest CPU it names + 1 (`0-1,3` → 4), since runc refuses
    a cpuset naming a CPU the guest does not have."""
    highest = -1
    for part in cpus.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            highest = max(highest, int(lo), int(hi or lo))
        except ValueError:
            raise SizingError(f"linux.resources.cpu.cpus: not a CPU list ({cpus!r})") from None
    return highest + 1 if highest >= 0 else 0


def mb_of_bytes(n: int) -> int:
    return math.ceil(n / MiB)


def need_of_resources(res: Mapping[str, Any] | None) -> Need:
    """An OCI LinuxResources (a spec's linux.resources, or an Update's): vCPUs from the CFS
    quota (or the cpuset), memory from the limit."""
    if not isinstance(res, Mapping):
        return Need()
    vcpus: int | None = None
    cpu = res.get("cpu")
    if isinstance(cpu, Mapping):
        quota, period = cpu.get("quota"), cpu.get("period")
        if isinstance(quota, int) and not isinstance(quota, bool):
            vcpus = vcpus_of_quota(quota, period if isinstance(period, int) else None)
        cpus = cpu.get("cpus")
        if isinstance(cpus, str) and cpus:
            vcpus = max(vcpus or 0, cpuset_count(cpus)) or None
    memory_mb: int | None = None
    mem = res.get("memory")
    if isinstance(mem, Mapping):
        limit = mem.get("limit")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            memory_mb = mb_of_bytes(limit)
    return Need(vcpus, memory_mb)


def explicit_size(annotations: Mapping[str, Any]) -> Need:
    """Our annotations: an explicit vCPU count / memory in MiB for the sandbox's workload."""
    vcpus = annotations.get(ANN_VCPUS)
    mem = annotations.get(ANN_MEMORY_MB)
    return Need(_int(vcpus, ANN_VCPUS, 1, 255) if vcpus is not None else None,
                _int(mem, ANN_MEMORY_MB, 1, 1 << 20) if mem is not None else None)


def cri_pod_need(annotations: Mapping[str, Any]) -> Need:
    """containerd's pod-level annotations on a CRI sandbox (when it sets them)."""
    vcpus: int | None = None
    if CRI_CPU_QUOTA in annotations:
        quota = _int(annotations[CRI_CPU_QUOTA], CRI_CPU_QUOTA, -1, 1 << 50)
        period = (_int(annotations[CRI_CPU_PERIOD], CRI_CPU_PERIOD, 0, 1 << 40)
                  if CRI_CPU_PERIOD in annotations else None)
        vcpus = vcpus_of_quota(quota, period)
    if vcpus is None and CRI_CPU_SHARES in annotations:
        shares = _int(annotations[CRI_CPU_SHARES], CRI_CPU_SHARES, 0, 1 << 40)
        vcpus = math.ceil(shares / 1024) if shares > 2 else None     # 2 = best effort: no request
    memory_mb: int | None = None
    if CRI_MEMORY in annotations:
        limit = _int(annotations[CRI_MEMORY], CRI_MEMORY, 0, 1 << 60)
        memory_mb = mb_of_bytes(limit) if limit > 0 else None
    return Need(vcpus, memory_mb)


def _annotations(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    a = spec.get("annotations")
    return a if isinstance(a, Mapping) else {}


def need_of_spec(spec: Mapping[str, Any]) -> Need:
    """One container: our explicit annotations win over its linux.resources."""
    linux = spec.get("linux")
    res = need_of_resources(linux.get("resources") if isinstance(linux, Mapping) else None)
    explicit = explicit_size(_annotations(spec))
    return Need(explicit.vcpus if explicit.vcpus is not None else res.vcpus,
                explicit.memory_mb if explicit.memory_mb is not None else res.memory_mb)


def pod_need_of_spec(spec: Mapping[str, Any]) -> Need:
    return cri_pod_need(_annotations(spec))


def target(base: Size, needs: Iterable[Need], pod: Need = Need()) -> Size:
    """The sandbox's size: vCPUs = max(base, sum of the containers' vCPUs, the pod's);
    memory = base + max(sum of the containers' limits, the pod's), 2 MiB aligned."""
    needs = list(needs)
    cpu_sum = sum(n.vcpus or 0 for n in needs)
    mem_sum = sum(n.memory_mb or 0 for n in needs)
    vcpus = max(base.vcpus, cpu_sum, pod.vcpus or 0)
    extra = max(mem_sum, pod.memory_mb or 0)
    extra = -(-extra // MEMORY_ALIGN_MB) * MEMORY_ALIGN_MB
    return Size(vcpus, base.memory_mb + extra)


def check(size: Size, limits: Limits, base: Size) -> None:
    """Refuse a size over a ceiling, naming the ceiling and the request."""
    no_hotplug = limits.machine == "microvm"
    if size.vcpus > limits.max_vcpus:
        why = ("runtime.machine microvm has no vCPU hot-plug" if no_hotplug and limits.max_vcpus == base.vcpus
               else f"over the ceiling cpu_hotplug.max_vcpus = {limits.max_vcpus}")
        raise SizingError(f"the sandbox needs {size.vcpus} vCPUs: {why}")
    if size.memory_mb > limits.max_memory_mb:
        if no_hotplug and limits.max_memory_mb == base.memory_mb:
            why = "runtime.machine microvm has no memory hot-plug"
        elif limits.memory_backend == "none":
            why = "memory_hotplug.backend is none"
        else:
            why = f"over the ceiling memory_hotplug.max_memory_mb = {limits.max_memory_mb}"
        raise SizingError(f"the sandbox needs {size.memory_mb} MiB of memory: {why}")


def dimm_sizes(extra_mb: int, slots_free: int) -> list[int]:
    """pc-dimm fallback: one DIMM for the growth, rounded up to 128 MiB; no slot → refused."""
    if extra_mb <= 0:
        return []
    if slots_free < 1:
        raise SizingError(f"growing memory by {extra_mb} MiB needs a pc-dimm slot: none free "
                          "(memory_hotplug.slots)")
    return [-(-extra_mb // 128) * 128]
