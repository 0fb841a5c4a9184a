"""The VM's confirmed size in the shim's state (`vmsize` records, shim.resize): written as a
resizer confirms sizes, read back by a new shim process from the state file, reported by
`delete`'s cleanup after a crash, and refused by name when malformed."""
from __future__ import annotations

import pytest

from spinbox.shim import releasers
from spinbox.shim.resize import RECORD_KIND, SizeRecord
from spinbox.shim.sizing import SizingError
from spinbox.shim.state import GroupPaths, State, cleanup_all, release

REC = SizeRecord(3, 1280, cpus=(("cpu1", {"socket-id": 1, "core-id": 0, "thread-id": 0}),
                                ("cpu2", {"socket-id": 2, "core-id": 0, "thread-id": 0})),
                 base_total=250 << 20)


@pytest.fixture
def paths(tmp_path):
    return GroupPaths(tmp_path / "st", "ns1", "grp1")


def test_the_kind_is_registered_by_the_resizer():
    assert RECORD_KIND in releasers.kinds()
    assert releasers.lookup(RECORD_KIND).__module__ == "spinbox.shim.resize"


def test_a_recorded_size_survives_the_process_and_reads_back_equal(paths):
    st = State.open(paths)
    st.record("vm", "/run/x/vm", owner="grp1", path="/nonexistent/vm")
    st.record(RECORD_KIND, "grp1", owner="grp1", **REC.to_data())
    again = State.load(paths)                       # what a restarted shim or `delete` reads
    assert again is not None
    rec = again.find(RECORD_KIND, "grp1")
    assert rec is not None
    assert SizeRecord.from_data(rec.data) == REC
    # a later size replaces the record (one per VM), it does not add one
    again.record(RECORD_KIND, "grp1", owner="grp1", **SizeRecord(1, 256).to_data())
    kinds = [r["kind"] for r in State.load(paths).doc["resources"]]
    assert kinds == ["vm", RECORD_KIND]
    assert SizeRecord.from_data(State.load(paths).find(RECORD_KIND, "grp1").data) == SizeRecord(1, 256)


async def test_delete_after_a_crash_reports_what_the_vm_had_and_forgets_it(paths):
    st = State.open(paths)
    st.record(RECORD_KIND, "grp1", owner="grp1", **REC.to_data())
    report = await cleanup_all(State.load(paths))
    assert report.ok
    assert report.done == ["vm grp1 was 3 vCPU(s) / 1280 MiB (hot-plugged: cpu1, cpu2)"]
    assert State.load(paths).find(RECORD_KIND, "grp1") is None


@pytest.mark.parametrize("data, message", [
    ({"vcpus": 0, "memory_mb": 256}, "vcpus must be an integer >= 1"),
    ({"vcpus": "2", "memory_mb": 256}, "vcpus must be an integer >= 1"),
    ({"vcpus": 2, "memory_mb": True}, "memory_mb must be an integer >= 1"),
    ({"vcpus": 2, "memory_mb": 256, "cpus": [{"id": "../x", "props": {}}]}, "cpus[].id must be a device id"),
    ({"vcpus": 2, "memory_mb": 256, "cpus": [{"id": "cpu1", "props": {"core-id": -1}}]}, "cpus[].props.core-id"),
    ({"vcpus": 2, "memory_mb": 256, "cpus": [{"props": {}}]}, "malformed device list"),
    ({"vcpus": 2, "memory_mb": 256, "dimms": [{"id": "d1", "backend_id": "d1-mem", "size_mb": 0}]},
     "dimms[].size_mb must be an integer >= 1"),
])
def test_a_malformed_record_is_refused_by_name(data, message):
    with pytest.raises(SizingError) as ei:
        SizeRecord.from_data(data)
    assert message in str(ei.value)


async def test_the_releaser_says_a_malformed_record_without_failing_the_cleanup():
    out = await release({"kind": RECORD_KIND, "key": "g", "vcpus": "many", "memory_mb": 1})
    assert out.startswith("vm g: vmsize record: vcpus must be")


def test_describe_without_devices():
    assert SizeRecord(1, 256).describe() == "1 vCPU(s) / 256 MiB (nothing hot-plugged)"
