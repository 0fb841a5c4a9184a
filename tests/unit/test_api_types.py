"""Our containerd protos against containerd's wire facts, and the Any/Envelope helpers."""
from __future__ import annotations

import time

import pytest
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

from spinbox.api import types
from spinbox.api._pb.containerd.events import task_pb2 as events
from spinbox.api._pb.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from spinbox.api._pb.containerd.services.ttrpc.events.v1 import events_pb2 as events_svc
from spinbox.api._pb.containerd.task.v2 import shim_pb2 as v2
from spinbox.api._pb.containerd.task.v3 import shim_pb2 as v3
from spinbox.api._pb.containerd.types import event_pb2
from spinbox.api._pb.containerd.types.task import task_pb2 as task_types
from spinbox.api._pb.runtimeoptions.v1 import api_pb2 as runtimeoptions
from ttrpc import request_pb2

# The first frame containerd 1.6.20 sent to a probe shim (docs/host-facts.md §4), with the
# scratch folder `$WORK` replaced by a 9-character path: that is the length the captured length
# prefixes (bundle 0x35 = 53 bytes, frame 495 bytes) imply.
WORK = "/tmp/feas"
CAPTURED_CREATE_FRAME_LEN = 495
CAPTURED_CREATE_BODY = (
    b'\n\x17containerd.task.v2.Task\x12\x06Create\x1a\xcb\x03\n\x02p4\x125$WORK/state/io.containerd'
    b'.runtime.v2.task/test/p4\x1a\x8d\x02\n\x07overlay\x12\x07overlay"\tindex=off"Oworkdir=$WORK/'
    b'root/io.containerd.snapshotter.v1.overlayfs/snapshots/17/work"Nupperdir=$WORK/root/io.cont'
    b'ainerd.snapshotter.v1.overlayfs/snapshots/17/fs"Mlowerdir=$WORK/root/io.containerd.snapsho'
    b'tter.v1.overlayfs/snapshots/1/fs*(/run/containerd/fifo/4214614320/p4-stdin2)/run/containe'
    b'rd/fifo/4214614320/p4-stdout:)/run/containerd/fifo/4214614320/p4-stderr'
).replace(b"$WORK", WORK.encode())

# What containerd writes on the shim's stdin for `--runtime-config-path` (docs/host-facts.md §4).
CAPTURED_OPTIONS_STDIN = b'\n\x19runtimeoptions.v1.Options\x12\x1e\x12\x1c$WORK/probe-runtime.toml'.replace(
    b"$WORK", WORK.encode())


def _field_shape(desc) -> list[tuple]:
    """Numbers, names, types and labels of a message's fields, nested types by full name minus package."""
    pkg = desc.file.package

    def local(name: str) -> str:
        return name[len(pkg) + 1:] if name.startswith(pkg + ".") else name

    shape = []
    for f in sorted(desc.fields, key=lambda f: f.number):
        sub = f.message_type or f.enum_type
        shape.append((f.number, f.name, f.type, f.is_repeated, local(sub.full_name) if sub else None))
    return shape


def test_captured_create_frame_decodes_with_our_schema():
    assert len(CAPTURED_CREATE_BODY) == CAPTURED_CREATE_FRAME_LEN
    req = request_pb2.Request.FromString(CAPTURED_CREATE_BODY)
    assert (req.service, req.method) == (types.TASK_SERVICE_V2, "Create")
    assert req.timeout_nano == 0 and not req.metadata

    create = v2.CreateTaskRequest.FromString(req.payload)
    assert create.id == "p4"
    assert create.bundle == f"{WORK}/state/io.containerd.runtime.v2.task/test/p4"
    assert len(create.rootfs) == 1
    m = create.rootfs[0]
    assert (m.type, m.source, m.target) == ("overlay", "overlay", "")
    snap = f"{WORK}/root/io.containerd.snapshotter.v1.overlayfs/snapshots"
    assert list(m.options) == ["index=off", f"workdir={snap}/17/work", f"upperdir={snap}/17/fs",
                               f"lowerdir={snap}/1/fs"]
    fifo = "/run/containerd/fifo/4214614320/p4"
    assert (create.stdin, create.stdout, create.stderr) == (f"{fifo}-stdin", f"{fifo}-stdout",
                                                            f"{fifo}-stderr")
    assert not create.terminal and not create.HasField("options")
    # Nothing in containerd's bytes was left as an unknown field, and we write the same bytes back.
    assert create.SerializeToString() == req.payload
    assert req.SerializeToString() == CAPTURED_CREATE_BODY


def test_captured_runtime_options_stdin_decodes():
    any_msg = any_pb2.Any.FromString(CAPTURED_OPTIONS_STDIN)
    opts = types.unpack_any(any_msg, runtimeoptions.Options)
    assert opts.config_path == f"{WORK}/probe-runtime.toml"
    assert types.pack_any(opts).SerializeToString() == CAPTURED_OPTIONS_STDIN


def test_every_v2_method_has_an_identical_v3_twin():
    s2 = v2.DESCRIPTOR.services_by_name["Task"]
    s3 = v3.DESCRIPTOR.services_by_name["Task"]
    assert s2.full_name == types.TASK_SERVICE_V2 and s3.full_name == types.TASK_SERVICE_V3
    assert len(s2.methods) == 17
    assert [m.name for m in s2.methods] == [m.name for m in s3.methods]
    for m2 in s2.methods:
        m3 = s3.methods_by_name[m2.name]
        for d2, d3 in ((m2.input_type, m3.input_type), (m2.output_type, m3.output_type)):
            assert d2.name == d3.name, m2.name
            assert _field_shape(d2) == _field_shape(d3), f"{m2.name}: {d2.name} differs"
    # And every message of the v2 file exists in v3 with the same fields (ExecProcessResponse too).
    assert set(v2.DESCRIPTOR.message_types_by_name) == set(v3.DESCRIPTOR.message_types_by_name)
    for name, d2 in v2.DESCRIPTOR.message_types_by_name.items():
        assert _field_shape(d2) == _field_shape(v3.DESCRIPTOR.message_types_by_name[name]), name


@pytest.mark.parametrize("method,inp,out", [
    ("State", "StateRequest", "StateResponse"), ("Create", "CreateTaskRequest", "CreateTaskResponse"),
    ("Start", "StartRequest", "StartResponse"), ("Delete", "DeleteRequest", "DeleteResponse"),
    ("Pids", "PidsRequest", "PidsResponse"), ("Pause", "PauseRequest", "google.protobuf.Empty"),
    ("Resume", "ResumeRequest", "google.protobuf.Empty"),
    ("Checkpoint", "CheckpointTaskRequest", "google.protobuf.Empty"),
    ("Kill", "KillRequest", "google.protobuf.Empty"), ("Exec", "ExecProcessRequest", "google.protobuf.Empty"),
    ("ResizePty", "ResizePtyRequest", "google.protobuf.Empty"),
    ("CloseIO", "CloseIORequest", "google.protobuf.Empty"),
    ("Update", "UpdateTaskRequest", "google.protobuf.Empty"), ("Wait", "WaitRequest", "WaitResponse"),
    ("Stats", "StatsRequest", "StatsResponse"), ("Connect", "ConnectRequest", "ConnectResponse"),
    ("Shutdown", "ShutdownRequest", "google.protobuf.Empty"),
])
def test_task_rpc_signatures(method, inp, out):
    m = v2.DESCRIPTOR.services_by_name["Task"].methods_by_name[method]
    full = lambda n: n if n.startswith("google.") else f"containerd.task.v2.{n}"  # noqa: E731
    assert (m.input_type.full_name, m.output_type.full_name) == (full(inp), full(out))


def test_field_numbers_from_the_protocol_brief():
    nums = lambda d: {f.name: f.number for f in d.fields}  # noqa: E731
    assert nums(v2.StateResponse.DESCRIPTOR) == {
        "id": 1, "bundle": 2, "pid": 3, "status": 4, "stdin": 5, "stdout": 6, "stderr": 7,
        "terminal": 8, "exit_status": 9, "exited_at": 10, "exec_id": 11}
    assert nums(v2.ConnectResponse.DESCRIPTOR) == {"shim_pid": 1, "task_pid": 2, "version": 3}
    assert nums(events.TaskExit.DESCRIPTOR) == {
        "container_id": 1, "id": 2, "pid": 3, "exit_status": 4, "exited_at": 5, "exit_reason": 6}
    assert nums(events.TaskDelete.DESCRIPTOR) == {
        "container_id": 1, "pid": 2, "exit_status": 3, "exited_at": 4, "id": 5}
    assert nums(event_pb2.Envelope.DESCRIPTOR) == {"timestamp": 1, "namespace": 2, "topic": 3, "event": 4}
    assert nums(bootstrap_pb2.BootstrapResult.DESCRIPTOR) == {
        "version": 1, "address": 2, "protocol": 3, "capabilities": 4, "metadata": 5}
    assert nums(bootstrap_pb2.BootstrapParams.DESCRIPTOR)["containerd_ttrpc_address"] == 5
    assert {v.name: v.number for v in task_types.Status.DESCRIPTOR.values} == {
        "UNKNOWN": 0, "CREATED": 1, "RUNNING": 2, "STOPPED": 3, "PAUSED": 4, "PAUSING": 5}
    assert v2.CreateTaskRequest.DESCRIPTOR.fields_by_name["rootfs"].message_type.full_name == \
        "containerd.types.Mount"
    assert v2.PidsResponse.DESCRIPTOR.fields_by_name["processes"].message_type.full_name == \
        "containerd.v1.types.ProcessInfo"
    fwd = events_svc.DESCRIPTOR.services_by_name["Events"]
    assert fwd.full_name == types.EVENTS_SERVICE
    assert fwd.methods_by_name["Forward"].output_type.full_name == "google.protobuf.Empty"


def test_pack_any_uses_bare_type_url():
    exit_ev = events.TaskExit(container_id="c1", id="c1", pid=42, exit_status=7)
    a = types.pack_any(exit_ev)
    assert a.type_url == "containerd.events.TaskExit"
    assert events.TaskExit.FromString(a.value) == exit_ev


def test_unpack_any_accepts_prefixed_urls_and_rejects_others():
    ev = events.TaskOOM(container_id="c9")
    for url in ("containerd.events.TaskOOM", "type.googleapis.com/containerd.events.TaskOOM"):
        a = any_pb2.Any(type_url=url, value=ev.SerializeToString())
        assert types.unpack_any(a, [events.TaskExit, events.TaskOOM]) == ev
    with pytest.raises(ValueError, match="containerd.events.TaskOOM"):
        types.unpack_any(types.pack_any(ev), [events.TaskExit])
    with pytest.raises(ValueError, match="does not decode"):
        types.unpack_any(any_pb2.Any(type_url="containerd.events.TaskOOM", value=b"\xff\xff"),
                         events.TaskOOM)


def test_envelope_sets_timestamp_topic_namespace():
    before = time.time_ns()
    ev = events.TaskStart(container_id="c1", pid=10)
    env = types.envelope("default", "/tasks/start", ev)
    assert env.namespace == "default" and env.topic == "/tasks/start"
    assert env.event.type_url == "containerd.events.TaskStart"
    assert before <= env.timestamp.ToNanoseconds() <= time.time_ns()
    assert types.unpack_event(env) == ev
    fixed = timestamp_pb2.Timestamp(seconds=5)
    assert types.envelope("ns", "/tasks/start", ev, timestamp=fixed).timestamp == fixed
    with pytest.raises(ValueError, match="TaskExit"):
        types.envelope("default", "/tasks/exit", ev)


def test_topic_table_is_complete_and_invertible():
    names = {"TaskCreate", "TaskStart", "TaskDelete", "TaskIO", "TaskExit", "TaskOOM", "TaskExecAdded",
             "TaskExecStarted", "TaskPaused", "TaskResumed", "TaskCheckpointed"}
    assert set(events.DESCRIPTOR.message_types_by_name) == names
    # Every event message except TaskIO (a part of TaskCreate) has exactly one topic.
    assert {c.DESCRIPTOR.name for c in types.TOPICS.values()} == names - {"TaskIO"}
    for topic, cls in types.TOPICS.items():
        assert topic.startswith("/tasks/")
        assert types.topic_for(cls) == topic
        assert types.topic_for(cls()) == topic
    with pytest.raises(ValueError):
        types.topic_for(events.TaskIO)


def test_no_field_uses_group_or_proto2_required():
    # Our schema files are proto3 only; a stray `required` would break decoding of containerd's bytes.
    for mod in (v2, v3, events, event_pb2, task_types, bootstrap_pb2, runtimeoptions):
        for d in mod.DESCRIPTOR.message_types_by_name.values():
            for f in d.fields:
                assert f.type != FieldDescriptor.TYPE_GROUP
                assert not f.is_required
