"""shim.sizing: what a spec, an Update or a CRI pod asks of the VM, and the ceilings."""
from __future__ import annotations

import pytest

from spinbox.shim import sizing
from spinbox.shim.errors import InvalidArgument
from spinbox.shim.sizing import Limits, Need, Size, SizingError

BASE = Size(1, 256)
Q35 = Limits(max_vcpus=4, max_memory_mb=2048)


def spec(resources=None, annotations=None):
    s = {"process": {"args": ["sh"]}, "linux": {"resources": resources or {}}}
    if annotations is not None:
        s["annotations"] = annotations
    return s


def test_ctr_run_cpus_and_memory_limit():
    # ctr run --cpus 2 --memory-limit 1073741824: quota 200000 / period 100000
    n = sizing.need_of_spec(spec({"cpu": {"quota": 200000, "period": 100000},
                                  "memory": {"limit": 1 << 30}}))
    assert n == Need(2, 1024)
    assert sizing.target(BASE, [n]) == Size(2, 1280)


def test_quota_rounds_up_and_no_limit_means_nothing():
    assert sizing.vcpus_of_quota(150000, 100000) == 2
    assert sizing.vcpus_of_quota(50000, None) == 1           # default period 100 ms
    assert sizing.vcpus_of_quota(-1, 100000) is None
    assert sizing.need_of_spec(spec({"cpu": {"shares": 1024}})) == Need()


def test_cpuset_needs_its_highest_cpu():
    assert sizing.cpuset_count("0-1,3") == 4
    assert sizing.need_of_resources({"cpu": {"cpus": "2"}}) == Need(3, None)
    with pytest.raises(SizingError, match="not a CPU list"):
        sizing.cpuset_count("a-b")


def test_memory_limit_rounds_up_to_mib_and_target_aligns():
    assert sizing.need_of_resources({"memory": {"limit": 3 * 1024 * 1024 + 1}}) == Need(None, 4)
    assert sizing.target(BASE, [Need(None, 3)]).memory_mb == 256 + 4


def test_annotations_win_and_are_validated():
    n = sizing.need_of_spec(spec({"cpu": {"quota": 400000, "period": 100000}},
                                 {sizing.ANN_VCPUS: "3", sizing.ANN_MEMORY_MB: "512"}))
    assert n == Need(3, 512)
    for bad in ("0", "x", "256"):
        with pytest.raises(SizingError, match=sizing.ANN_VCPUS):
            sizing.need_of_spec(spec(annotations={sizing.ANN_VCPUS: bad}))
    with pytest.raises(InvalidArgument):
        sizing.need_of_spec(spec(annotations={sizing.ANN_MEMORY_MB: "-5"}))


def test_cri_pod_annotations():
    a = {sizing.CRI_CPU_QUOTA: "250000", sizing.CRI_CPU_PERIOD: "100000",
         sizing.CRI_MEMORY: str(512 << 20)}
    assert sizing.pod_need_of_spec(spec(annotations=a)) == Need(3, 512)
    assert sizing.cri_pod_need({sizing.CRI_CPU_SHARES: "2048"}) == Need(2, None)
    assert sizing.cri_pod_need({sizing.CRI_CPU_SHARES: "2"}) == Need()      # best effort
    assert sizing.cri_pod_need({sizing.CRI_CPU_QUOTA: "-1", sizing.CRI_MEMORY: "0"}) == Need()


def test_target_sums_containers_and_takes_the_pod_as_a_floor():
    needs = [Need(1, 100), Need(2, 200), Need()]
    assert sizing.target(BASE, needs) == Size(3, 256 + 300)
    assert sizing.target(BASE, needs, pod=Need(4, 1000)) == Size(4, 1256)
    assert sizing.target(Size(2, 512), []) == Size(2, 512)


def test_ceilings_name_the_ceiling_and_the_request():
    sizing.check(Size(4, 2048), Q35, BASE)
    with pytest.raises(SizingError, match=r"needs 5 vCPUs: over the ceiling cpu_hotplug.max_vcpus = 4"):
        sizing.check(Size(5, 256), Q35, BASE)
    with pytest.raises(SizingError, match=r"needs 4096 MiB .*memory_hotplug.max_memory_mb = 2048"):
        sizing.check(Size(1, 4096), Q35, BASE)
    micro = Limits(1, 256, machine="microvm")
    with pytest.raises(SizingError, match="microvm has no vCPU hot-plug"):
        sizing.check(Size(2, 256), micro, BASE)
    with pytest.raises(SizingError, match="microvm has no memory hot-plug"):
        sizing.check(Size(1, 512), micro, BASE)
    with pytest.raises(SizingError, match="backend is none"):
        sizing.check(Size(1, 512), Limits(4, 256, memory_backend="none"), BASE)


def test_dimm_sizes_round_to_128_and_need_a_slot():
    assert sizing.dimm_sizes(0, 0) == []
    assert sizing.dimm_sizes(130, 1) == [256]
    with pytest.raises(SizingError, match="slot"):
        sizing.dimm_sizes(128, 0)


# --- ContainerManager.update: grow, then the cgroup; refused = nothing changed -------------

class _Agent:
    def __init__(self, log):
        self.log = log

    async def update(self, id, raw, timeout=None):
        self.log.append(("cgroup", id))


class _Sandbox:
    def __init__(self, log):
        self.log = log
        self.agent_client = _Agent(log)
        self.lost = __import__("asyncio").Event()

    def sizing(self):
        return BASE, Q35

    async def resize(self, want):
        self.log.append(("resize", want))
        return want


def _manager(log):
    from spinbox.shim.containers import ContainerManager
    from spinbox.shim.process import Container, StdioPaths
    m = ContainerManager(lambda: None, events=None)  # type: ignore[arg-type]
    m.sandbox = _Sandbox(log)  # type: ignore[assignment]
    c = Container("c1", "/b", StdioPaths())
    m.containers["c1"] = c
    return m, c


def _resources(doc):
    import json

    from google.protobuf import any_pb2

    from spinbox.api import types as api_types
    return any_pb2.Any(type_url=api_types.OCI_LINUX_RESOURCES_TYPE_URL, value=json.dumps(doc).encode())


async def test_update_grows_the_vm_before_the_cgroup():
    log: list = []
    m, c = _manager(log)
    await m.update(c, _resources({"memory": {"limit": 512 << 20}, "cpu": {"quota": 200000, "period": 100000}}))
    assert log == [("resize", Size(2, 768)), ("cgroup", "c1")]


async def test_update_over_the_ceiling_changes_nothing():
    log: list = []
    m, c = _manager(log)
    with pytest.raises(SizingError, match="needs 8 vCPUs: over the ceiling cpu_hotplug.max_vcpus = 4"):
        await m.update(c, _resources({"cpu": {"quota": 800000, "period": 100000}}))
    assert log == []


async def test_update_to_less_applies_the_cgroup_before_giving_memory_back():
    log: list = []
    m, c = _manager(log)
    await m.update(c, _resources({"memory": {"limit": 512 << 20}}))
    log.clear()
    await m.update(c, _resources({"memory": {"limit": 128 << 20}}))
    assert log == [("cgroup", "c1"), ("resize", Size(1, 384))]
