"""The host-side orchestration (shim.task_service -> shim.containers -> shim.exits) driven as
containerd drives it, with a fake guest agent and a fake sandbox (tests/unit/fakes.py): no
root, no VM, no runc. What is asserted is what containerd sees: the replies, the ttrpc error
codes, and the events in order and in the container's namespace."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from google.protobuf import any_pb2

import ttrpc
from spinbox.api import types as api_types
from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.shim.agent import ProcessInfo
from spinbox.shim.assembly import build_task_service
from spinbox.shim.errors import HostError
from spinbox.shim.process import Status
from spinbox.shim.states import ProcessState
from spinbox.shim.task_service import TaskService

from fakes import Ctx, FakeSandboxFactory, RecordingPublisher, make_bundle, minimal_spec

pytestmark = pytest.mark.timeout(30)

NS = "testns"
CTX = Ctx.ns(NS)
T = 5.0       # no step of these tests may take this long


class Harness:
    def __init__(self, tmp_path: Path, **kw) -> None:
        self.tmp = tmp_path
        self.factory = FakeSandboxFactory()
        self.pub = RecordingPublisher()
        self.exit_requests = 0
        self.svc: TaskService = build_task_service(
            self.factory, self.pub, namespace="default", request_exit=self._request_exit,
            drain_timeout=kw.pop("drain_timeout", 2.0), agent_timeout=5.0, **kw)
        self.mgr = self.svc.manager

    def _request_exit(self) -> None:
        self.exit_requests += 1

    @property
    def sb(self):
        return self.factory.last

    @property
    def agent(self):
        return self.factory.last.fake_agent

    def bundle(self, name: str, spec: dict | None = None) -> Path:
        return make_bundle(self.tmp, name, spec)

    async def create(self, id: str, ctx: Ctx = CTX, **kw) -> shim_pb2.CreateTaskResponse:
        bundle = kw.pop("bundle", None) or self.bundle(f"b-{id}")
        return await self.svc.Create(shim_pb2.CreateTaskRequest(id=id, bundle=str(bundle), **kw), ctx)

    async def start(self, id: str, exec_id: str = "") -> int:
        return (await self.svc.Start(shim_pb2.StartRequest(id=id, exec_id=exec_id), CTX)).pid

    async def run(self, id: str, ctx: Ctx = CTX) -> int:
        await self.create(id, ctx)
        return await self.start(id)

    async def exec(self, id: str, exec_id: str, args=("true",), **kw) -> None:
        spec = _any(api_types.OCI_PROCESS_TYPE_URL, {"args": list(args), "cwd": "/",
                                                     "user": {"uid": 0, "gid": 0}})
        await self.svc.Exec(shim_pb2.ExecProcessRequest(id=id, exec_id=exec_id, spec=spec, **kw), CTX)

    async def wait(self, id: str, exec_id: str = "") -> shim_pb2.WaitResponse:
        return await asyncio.wait_for(self.svc.Wait(shim_pb2.WaitRequest(id=id, exec_id=exec_id), CTX), T)

    async def delete(self, id: str, exec_id: str = "") -> shim_pb2.DeleteResponse:
        return await self.svc.Delete(shim_pb2.DeleteRequest(id=id, exec_id=exec_id), CTX)

    async def kill(self, id: str, exec_id: str = "", signal: int = 15, all: bool = False) -> None:
        await self.svc.Kill(shim_pb2.KillRequest(id=id, exec_id=exec_id, signal=signal, all=all), CTX)

    async def state(self, id: str, exec_id: str = "") -> shim_pb2.StateResponse:
        return await self.svc.State(shim_pb2.StateRequest(id=id, exec_id=exec_id), CTX)

    async def close(self) -> None:
        await self.svc.close()


def _any(type_url: str, value: dict | bytes) -> any_pb2.Any:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return any_pb2.Any(type_url=type_url, value=raw)


async def eventually(cond, timeout: float = T) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    await harness.close()


# --- the normal life of a container ------------------------------------------------------

async def test_create_start_exit_wait_delete_events_in_containerd_order(h):
    r = await h.create("c1")
    assert r.pid == h.agent.procs[("c1", "")].pid
    assert (await h.state("c1")).status == Status.CREATED
    pid = await h.start("c1")
    assert pid == r.pid and (await h.state("c1")).status == Status.RUNNING

    waiter = asyncio.ensure_future(h.wait("c1"))
    await asyncio.sleep(0.01)
    assert not waiter.done()                      # Wait blocks until the exit is published
    h.agent.push_exit("c1", status=3)
    w = await waiter
    assert w.exit_status == 3
    # Wait returned: the exit event is already out, behind the start event.
    assert h.pub.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    st = await h.state("c1")
    assert st.status == Status.STOPPED and st.exit_status == 3

    d = await h.delete("c1")
    assert d.exit_status == 3 and d.pid == pid
    assert h.pub.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert {ns for ns, _, _ in h.pub.events} == {NS}
    _, _, exit_ev = h.pub.events[2]
    assert exit_ev.id == "c1" and exit_ev.pid == pid and exit_ev.exit_status == 3
    assert h.mgr.containers == {}
    assert "unshare c1" in h.sb.journal and h.sb.shared == {}
    with pytest.raises(ttrpc.NotFound):
        await h.state("c1")


async def test_events_go_to_each_containers_namespace(h):
    await h.run("a", Ctx.ns("ns-a"))
    await h.run("b", Ctx.ns("ns-b"))
    await h.run("c", Ctx())                       # no namespace in the metadata: the default
    for cid in ("a", "b", "c"):
        h.agent.push_exit(cid, status=0)
    for cid in ("a", "b", "c"):
        await h.wait(cid)
    assert {ns for ns, _, _ in h.pub.of("a")} == {"ns-a"}
    assert {ns for ns, _, _ in h.pub.of("b")} == {"ns-b"}
    assert {ns for ns, _, _ in h.pub.of("c")} == {"default"}
    assert len(h.factory.made) == 1               # one sandbox for all the containers


async def test_kill_reaches_the_guest_and_its_exit_is_128_plus_signal(h):
    await h.run("c1")
    h.agent.exit_on_kill = True
    await h.kill("c1", signal=9)
    assert (await h.wait("c1")).exit_status == 137
    assert h.agent.called("kill")[0].args[:4] == ("c1", "", 9, False)


async def test_kill_of_a_finished_process_is_not_found(h):
    await h.run("c1")
    h.agent.push_exit("c1", status=0)
    await h.wait("c1")
    with pytest.raises(ttrpc.NotFound, match="process already finished"):
        await h.kill("c1", signal=9)
    assert h.agent.called("kill") == []           # refused before the guest


async def test_kill_in_the_exit_pending_window_is_not_found(h):
    """The guest reported the exit but it is not published yet (output still draining)."""
    await h.create("c1")
    await h.start("c1")
    h.mgr.get("c1").init.start_published.clear()   # hold the exit in exit_pending
    h.agent.push_exit("c1", status=1)
    await eventually(lambda: h.mgr.get("c1").init.state == ProcessState.EXIT_PENDING)
    with pytest.raises(ttrpc.NotFound, match="process already finished"):
        await h.kill("c1")
    await h.kill("c1", all=True)                  # --all still reaches the container's other pids
    assert (await h.state("c1")).status == Status.RUNNING    # containerd: not exited yet
    h.mgr.get("c1").init.start_published.set()
    assert (await h.wait("c1")).exit_status == 1


async def test_kill_with_an_invalid_signal_is_invalid_argument(h):
    await h.run("c1")
    for sig in (0, 65):
        with pytest.raises(ttrpc.InvalidArgument):
            await h.kill("c1", signal=sig)
    assert h.agent.called("kill") == []


async def test_delete_of_a_running_process_is_failed_precondition(h):
    await h.run("c1")
    with pytest.raises(ttrpc.FailedPrecondition):
        await h.delete("c1")
    assert h.agent.called("delete") == []
    assert "c1" in h.mgr.containers and (await h.state("c1")).status == Status.RUNNING
    assert "/tasks/delete" not in h.pub.topics("c1")


async def test_delete_of_a_created_container_wakes_its_waiters(h):
    await h.create("c1")
    waiter = asyncio.ensure_future(h.wait("c1"))
    await asyncio.sleep(0.01)                     # the Wait RPC is in
    d = await h.delete("c1")
    assert (await waiter).exit_status == d.exit_status == 255
    assert h.pub.topics("c1") == ["/tasks/create", "/tasks/delete"]
    assert h.agent.called("delete")[0].args[0] == "c1"


async def test_double_create_is_already_exists(h):
    await h.create("c1")
    with pytest.raises(ttrpc.AlreadyExists):
        await h.create("c1", bundle=h.bundle("other"))
    assert len(h.agent.called("create")) == 1
    assert h.pub.topics("c1") == ["/tasks/create"]


async def test_start_twice_and_unknown_ids(h):
    await h.run("c1")
    with pytest.raises(ttrpc.FailedPrecondition):
        await h.start("c1")
    with pytest.raises(ttrpc.NotFound):
        await h.start("nope")
    with pytest.raises(ttrpc.NotFound):
        await h.start("c1", "no-such-exec")
    with pytest.raises(ttrpc.NotFound):
        await h.svc.Wait(shim_pb2.WaitRequest(id="nope"), CTX)


async def test_checkpoint_restore_is_unimplemented(h):
    with pytest.raises(ttrpc.Unimplemented):
        await h.create("c1", checkpoint="/cp")
    assert h.factory.made == []


# --- ids that break the contract ---------------------------------------------------------

@pytest.mark.parametrize("bad", ["c1\n", "a..b", "..", "", "-lead", "a/b", "x" * 77, "é"])
async def test_invalid_container_id_is_refused_before_anything_happens(h, bad):
    with pytest.raises(ttrpc.InvalidArgument):
        await h.create(bad, bundle=h.bundle("b"))
    assert h.factory.made == []                   # no sandbox was even started
    assert h.pub.events == [] and h.mgr.containers == {}
    await h.create("good", bundle=h.tmp / "b")     # and the shim still works


@pytest.mark.parametrize("bad", ["e1\n", "a..b", "", "/e"])
async def test_invalid_exec_id_is_refused_before_the_guest(h, bad):
    await h.run("c1")
    with pytest.raises(ttrpc.InvalidArgument):
        await h.exec("c1", bad)
    assert h.agent.called("exec") == [] and h.mgr.get("c1").execs == {}
    assert "/tasks/exec-added" not in h.pub.topics("c1")


# --- Create's rollback ---------------------------------------------------------------------

async def test_sandbox_start_failure_stops_it_and_the_next_create_starts_a_fresh_one(h):
    h.factory.plan(fail={"start": HostError("qemu failed to boot")})
    with pytest.raises(ttrpc.FailedPrecondition, match="qemu failed to boot"):
        await h.create("c1")
    first = h.factory.made[0]
    assert first.journal == ["start", "stop"]       # stopped itself; nothing shared, no agent call
    assert h.mgr.sandbox is None and h.mgr.containers == {} and not h.mgr.busy
    assert h.pub.events == []

    await h.create("c1", bundle=h.tmp / "b-c1")
    assert len(h.factory.made) == 2 and h.mgr.sandbox is h.factory.made[1]
    assert h.pub.topics("c1") == ["/tasks/create"]


@pytest.mark.parametrize("step", ["share_rootfs", "share_binds"])
async def test_share_failure_unshares_and_never_reaches_the_agent(h, step):
    await h.create("first")                       # the sandbox is up already
    sb = h.sb
    sb.fail[step] = HostError(f"{step} broke")
    with pytest.raises(ttrpc.FailedPrecondition, match=f"{step} broke"):
        await h.create("c1")
    tail = sb.journal[sb.journal.index("share_rootfs c1"):]
    assert tail[-1] == "unshare c1"
    assert "agent.create c1" not in sb.journal and "agent.delete c1" not in sb.journal
    assert "c1" not in sb.shared and set(h.mgr.containers) == {"first"}
    assert h.mgr.sandbox is sb and sb.state.value == "ready"     # the sandbox survives
    assert h.pub.topics("c1") == []

    del sb.fail[step]
    await h.create("c1", bundle=h.tmp / "b-c1")
    assert h.pub.topics("c1") == ["/tasks/create"]


async def test_agent_create_failure_unshares_without_agent_delete(h):
    await h.create("first")
    h.agent.fail("create", ttrpc.Internal("guest: runc create failed"))
    with pytest.raises(ttrpc.Internal, match="runc create failed"):
        await h.create("c1")
    j = h.sb.journal
    assert j[j.index("agent.create c1"):] == ["agent.create c1", "unshare c1"]
    assert "agent.delete c1" not in j
    assert set(h.mgr.containers) == {"first"} and "c1" not in h.sb.shared
    await h.create("c1", bundle=h.tmp / "b-c1")
    assert "c1" in h.mgr.containers


async def test_first_create_failure_in_the_agent_leaves_the_sandbox_up(h):
    """The very first Create: the sandbox starts, then the guest refuses the container."""
    h.factory.plan(agent_fail={"create": ttrpc.InvalidArgument("guest: bad spec")})
    with pytest.raises(ttrpc.InvalidArgument, match="bad spec"):
        await h.create("c1")
    assert h.sb.journal == ["start", "share_rootfs c1", "share_binds c1", "agent.create c1", "unshare c1"]
    assert h.mgr.containers == {} and not h.mgr.busy
    assert h.mgr.sandbox is h.sb and h.sb.state.value == "ready"
    await h.create("c1", bundle=h.tmp / "b-c1")
    assert len(h.factory.made) == 1 and "c1" in h.mgr.containers


async def test_failure_after_agent_create_deletes_it_in_the_guest(h, tmp_path):
    """A step after the guest's create (attaching stdio) fails: the guest's container is
    deleted, then the shares released, newest first."""
    await h.create("first")
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    h.agent.fail("open_output", ttrpc.Unavailable("guest: stream refused"))
    with pytest.raises(ttrpc.Unavailable):
        await h.create("c1", stdout=str(fifo))
    j = h.sb.journal
    assert j[j.index("agent.create c1"):] == [
        "agent.create c1", "agent.open_output c1", "agent.delete c1", "unshare c1"]
    assert ("c1", "") not in h.agent.procs         # the fake guest forgot it
    assert set(h.mgr.containers) == {"first"}
    await h.create("c1", bundle=h.tmp / "b-c1", stdout=str(fifo))
    assert "c1" in h.mgr.containers


async def test_missing_stdio_fifo_fails_create_before_the_guest(h, tmp_path):
    with pytest.raises(ttrpc.NotFound, match="does not exist"):
        await h.create("c1", stdout=str(tmp_path / "no-such-fifo"))
    assert "agent.create c1" not in h.sb.journal and "unshare c1" in h.sb.journal
    assert h.mgr.containers == {}


async def test_bad_spec_is_invalid_argument_and_rolled_back(h, tmp_path):
    b = make_bundle(tmp_path, "bad", {"process": {"args": []}})
    with pytest.raises(ttrpc.InvalidArgument, match="process.args"):
        await h.create("c1", bundle=b)
    assert "agent.create c1" not in h.sb.journal and h.sb.journal[-1] == "unshare c1"
    b2 = tmp_path / "nospec"
    (b2 / "rootfs").mkdir(parents=True)
    with pytest.raises(ttrpc.InvalidArgument, match="does not exist"):
        await h.create("c2", bundle=b2)
    assert h.mgr.containers == {} and not h.mgr.busy


async def test_missing_rootfs_dir_fails_before_the_sandbox(h, tmp_path):
    b = tmp_path / "norootfs"
    b.mkdir()
    (b / "config.json").write_text(json.dumps(minimal_spec()))
    with pytest.raises(ttrpc.FailedPrecondition, match="rootfs"):
        await h.create("c1", bundle=b)
    assert h.factory.made == [] and h.mgr.containers == {}


async def test_cancelled_create_rolls_back(h):
    """containerd gave up on the Create (its RPC was cancelled) while the guest was at it."""
    await h.create("first")
    entered = asyncio.Event()

    async def slow_create(*args):
        entered.set()
        await asyncio.sleep(60)
    h.agent.hooks["create"] = slow_create
    t = asyncio.ensure_future(h.create("c1"))
    await asyncio.wait_for(entered.wait(), T)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert h.sb.journal[-1] == "unshare c1"
    assert set(h.mgr.containers) == {"first"} and "c1" not in h.mgr._creating
    del h.agent.hooks["create"]
    # The guest did create it (the reply was lost to the cancel): nobody deletes it there.
    assert ("c1", "") in h.agent.procs
    h.agent.procs.pop(("c1", ""))
    await h.create("c1", bundle=h.tmp / "b-c1")


# --- execs ---------------------------------------------------------------------------------

async def test_exec_lifecycle_and_its_events(h):
    await h.run("c1")
    await h.exec("c1", "e1")
    assert (await h.state("c1", "e1")).status == Status.CREATED
    epid = await h.start("c1", "e1")
    assert epid == h.agent.procs[("c1", "e1")].pid
    h.agent.push_exit("c1", "e1", status=4)
    w = await h.wait("c1", "e1")
    assert w.exit_status == 4
    d = await h.delete("c1", "e1")
    assert d.exit_status == 4 and d.pid == epid
    assert h.pub.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                                  "/tasks/exec-started", "/tasks/exit"]
    assert h.pub.exits("c1") == [("e1", 4)]
    assert h.mgr.get("c1").execs == {}
    with pytest.raises(ttrpc.NotFound):
        await h.state("c1", "e1")


async def test_exec_errors(h):
    await h.create("c1")
    await h.exec("c1", "e0")                      # registering on a created init is allowed...
    with pytest.raises(ttrpc.FailedPrecondition, match="not running"):
        await h.start("c1", "e0")                 # ... starting it is not
    assert h.agent.called("start") == []
    await h.start("c1")
    await h.exec("c1", "e1")
    with pytest.raises(ttrpc.AlreadyExists):
        await h.exec("c1", "e1")
    with pytest.raises(ttrpc.InvalidArgument):
        await h.svc.Exec(shim_pb2.ExecProcessRequest(
            id="c1", exec_id="e2", spec=_any(api_types.OCI_PROCESS_TYPE_URL, b"[1, 2]")), CTX)
    with pytest.raises(ttrpc.InvalidArgument, match="type_url"):
        await h.svc.Exec(shim_pb2.ExecProcessRequest(
            id="c1", exec_id="e3", spec=_any("types.example/Other", {"args": ["x"]})), CTX)
    assert set(h.mgr.get("c1").execs) == {"e0", "e1"}
    await h.delete("c1", "e0")                    # never started: deletable
    h.agent.push_exit("c1", status=0)
    await h.wait("c1")
    with pytest.raises(ttrpc.FailedPrecondition, match="not running"):
        await h.exec("c1", "e4")                  # the init has exited


async def test_exec_failing_in_the_guest_is_forgotten(h):
    await h.run("c1")
    h.agent.fail("exec", ttrpc.Internal("guest: no such binary"))
    with pytest.raises(ttrpc.Internal):
        await h.exec("c1", "e1")
    assert h.mgr.get("c1").execs == {}
    await h.exec("c1", "e1")                       # the id is free again


async def test_delete_of_a_running_exec_is_failed_precondition(h):
    await h.run("c1")
    await h.exec("c1", "e1")
    await h.start("c1", "e1")
    with pytest.raises(ttrpc.FailedPrecondition):
        await h.delete("c1", "e1")
    assert "e1" in h.mgr.get("c1").execs


async def test_exec_exits_are_published_before_the_init_exit(h):
    await h.run("c1")
    for e in ("e1", "e2"):
        await h.exec("c1", e)
        await h.start("c1", e)
    # The guest reports the init first (its pid 1 died and took the execs along).
    h.agent.push_exit("c1", status=137)
    await asyncio.sleep(0.05)
    assert h.pub.exits("c1") == []                # the init's exit waits for the execs' exits
    h.agent.push_exit("c1", "e2", status=137)
    h.agent.push_exit("c1", "e1", status=137)
    await h.wait("c1")
    assert h.pub.exits("c1") == [("e2", 137), ("e1", 137), ("c1", 137)]
    assert (await h.wait("c1", "e1")).exit_status == 137


async def test_exit_that_races_start_is_published_after_tasks_start(h):
    """The guest's exit event arrives before the Start reply (a process that exits at once)."""
    await h.create("c1")
    init = h.mgr.get("c1").init

    async def exit_before_the_reply(id, exec_id):
        h.agent.push_exit(id, exec_id, status=0)
        await eventually(lambda: init.state == ProcessState.EXIT_PENDING)
        await asyncio.sleep(0.02)                 # the sequencer had every chance to publish
        assert "/tasks/exit" not in h.pub.topics("c1")
    h.agent.hooks["start"] = exit_before_the_reply
    pid = await h.start("c1")
    w = await h.wait("c1")
    assert w.exit_status == 0
    assert h.pub.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    assert h.pub.of("c1")[2][2].pid == pid
    with pytest.raises(ttrpc.NotFound, match="process already finished"):
        await h.kill("c1")


async def test_exec_exit_that_races_exec_start_follows_exec_started(h):
    await h.run("c1")
    await h.exec("c1", "e1")

    async def exit_before_the_reply(id, exec_id):
        h.agent.push_exit(id, exec_id, status=2)
        await eventually(lambda: h.mgr.get("c1").execs["e1"].state == ProcessState.EXIT_PENDING)
    h.agent.hooks["start"] = exit_before_the_reply
    epid = await h.start("c1", "e1")
    w = await h.wait("c1", "e1")
    assert w.exit_status == 2
    assert h.pub.topics("c1")[-2:] == ["/tasks/exec-started", "/tasks/exit"]
    assert h.pub.of("c1")[-1][2].pid == epid


# --- guest events --------------------------------------------------------------------------

async def test_oom_event_publishes_tasks_oom(h):
    await h.run("c1")
    h.agent.push_oom("c1")
    h.agent.push_oom("unknown-container")         # ignored
    await eventually(lambda: "/tasks/oom" in h.pub.topics("c1"))
    ns, topic, e = h.pub.of("c1")[-1]
    assert (ns, topic, e.container_id) == (NS, "/tasks/oom", "c1")
    await asyncio.sleep(0.02)
    assert h.pub.topics().count("/tasks/oom") == 1


async def test_replayed_and_mismatched_exit_events_are_ignored(h):
    await h.run("c1")
    pid = h.mgr.get("c1").init.pid
    h.agent.push_exit("c1", status=9, pid=pid + 1)    # not our pid: ignored
    await asyncio.sleep(0.02)
    assert h.pub.exits("c1") == []
    h.agent.push_exit("c1", status=1)
    h.agent.push_exit("c1", status=2)                 # a duplicate
    assert (await h.wait("c1")).exit_status == 1
    await asyncio.sleep(0.02)
    assert h.pub.exits("c1") == [("c1", 1)]


async def test_event_stream_hiccup_resubscribes_without_losing_events(h, monkeypatch):
    from spinbox.shim import exits
    monkeypatch.setattr(exits, "RESUBSCRIBE_DELAY_S", 0.01)
    await h.run("c1")
    await h.run("c2")
    h.agent.push_oom("c2")                          # seq 1, seen before the hiccup
    await eventually(lambda: "/tasks/oom" in h.pub.topics("c2"))
    h.agent.break_events(ConnectionResetError("stream reset"))
    h.agent.push_exit("c1", status=5)               # seq 2, pushed while the stream is down
    assert (await h.wait("c1")).exit_status == 5
    subs = h.agent.called("events")
    assert [c.args for c in subs] == [(0,), (1,)]   # resubscribed after the last seq seen
    assert h.pub.exits("c1") == [("c1", 5)]
    assert h.pub.topics("c2").count("/tasks/oom") == 1


async def test_exit_waits_for_the_output_to_reach_the_fifo(h, tmp_path):
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        await h.create("c1", stdout=str(fifo))
        await h.start("c1")
        (out,) = h.agent.outputs
        out.feed(b"hello\n")
        h.agent.push_exit("c1", status=0, end_output=False)
        await asyncio.sleep(0.05)
        assert h.pub.exits("c1") == []            # the output stream has not ended yet
        out.end()
        await h.wait("c1")
        assert os.read(reader, 100) == b"hello\n"
    finally:
        os.close(reader)


async def test_lost_sandbox_reports_every_live_process_as_255(h):
    await h.run("c1")
    await h.exec("c1", "e1")
    await h.start("c1", "e1")
    await h.create("c2")                          # created, never started
    await h.run("c3")
    h.agent.push_exit("c3", status=0)
    await h.wait("c3")

    h.sb.mark_lost()
    for id, exec_id in (("c1", ""), ("c1", "e1"), ("c2", "")):
        assert (await h.wait(id, exec_id)).exit_status == 255
    assert (await h.wait("c3")).exit_status == 0          # already exited: unchanged
    assert h.pub.exits("c1")[-1] == ("c1", 255)            # execs first, then the init
    assert ("e1", 255) in h.pub.exits("c1")
    assert h.pub.exits("c2") == [("c2", 255)]
    assert h.pub.exits("c3") == [("c3", 0)]

    # containerd cleans up: Delete works without the guest.
    calls = len(h.agent.calls)
    for id in ("c1", "c2", "c3"):
        assert (await h.delete(id)).exit_status in (0, 255)
    assert all(c.name != "delete" for c in h.agent.calls[calls:])
    assert h.mgr.containers == {}


async def test_lost_sandbox_with_a_never_started_exec_reports_promptly(h):
    await h.run("c1")
    await h.exec("c1", "e-created")               # registered, never started (pid 0)
    h.sb.mark_lost()
    w = await asyncio.wait_for(h.svc.Wait(shim_pb2.WaitRequest(id="c1"), CTX), 2.0)
    assert w.exit_status == 255
    assert (await h.wait("c1", "e-created")).exit_status == 255


async def test_delete_of_an_exit_pending_process_publishes_the_exit_first(h):
    await h.run("c1")
    init = h.mgr.get("c1").init
    init.start_published.clear()
    h.agent.push_exit("c1", status=6)
    await eventually(lambda: init.state == ProcessState.EXIT_PENDING)
    t = asyncio.ensure_future(h.delete("c1"))
    await asyncio.sleep(0.02)
    init.start_published.set()
    d = await asyncio.wait_for(t, T)
    assert d.exit_status == 6
    assert h.pub.topics("c1")[-2:] == ["/tasks/exit", "/tasks/delete"]


# --- other RPCs ----------------------------------------------------------------------------

async def test_pause_resume(h):
    await h.create("c1")
    with pytest.raises(ttrpc.FailedPrecondition):
        await h.svc.Pause(shim_pb2.PauseRequest(id="c1"), CTX)
    await h.start("c1")
    await h.exec("c1", "e1")
    await h.start("c1", "e1")
    await h.svc.Pause(shim_pb2.PauseRequest(id="c1"), CTX)
    assert (await h.state("c1")).status == Status.PAUSED
    assert (await h.state("c1", "e1")).status == Status.PAUSED
    with pytest.raises(ttrpc.FailedPrecondition, match="already paused"):
        await h.svc.Pause(shim_pb2.PauseRequest(id="c1"), CTX)
    await h.svc.Resume(shim_pb2.ResumeRequest(id="c1"), CTX)
    with pytest.raises(ttrpc.FailedPrecondition, match="not paused"):
        await h.svc.Resume(shim_pb2.ResumeRequest(id="c1"), CTX)
    assert h.pub.topics("c1")[-2:] == ["/tasks/paused", "/tasks/resumed"]
    assert h.agent.names().count("pause") == h.agent.names().count("resume") == 1


async def test_pause_failing_in_the_guest_changes_nothing(h):
    await h.run("c1")
    h.agent.fail("pause", ttrpc.Internal("guest: freezer stuck"))
    with pytest.raises(ttrpc.Internal):
        await h.svc.Pause(shim_pb2.PauseRequest(id="c1"), CTX)
    assert (await h.state("c1")).status == Status.RUNNING
    assert "/tasks/paused" not in h.pub.topics("c1")


async def test_update_checks_the_resources_and_a_stopped_container(h):
    await h.run("c1")
    res = _any(api_types.OCI_LINUX_RESOURCES_TYPE_URL, {"memory": {"limit": 1 << 20}})
    await h.svc.Update(shim_pb2.UpdateTaskRequest(id="c1", resources=res), CTX)
    assert json.loads(h.agent.called("update")[0].args[1]) == {"memory": {"limit": 1 << 20}}
    with pytest.raises(ttrpc.InvalidArgument):
        await h.svc.Update(shim_pb2.UpdateTaskRequest(
            id="c1", resources=_any(api_types.OCI_LINUX_RESOURCES_TYPE_URL, b"not json")), CTX)
    h.agent.push_exit("c1", status=0)
    await h.wait("c1")
    with pytest.raises(ttrpc.FailedPrecondition):
        await h.svc.Update(shim_pb2.UpdateTaskRequest(id="c1", resources=res), CTX)
    assert len(h.agent.called("update")) == 1


async def test_pids_filters_invalid_guest_pids_and_labels_execs(h):
    await h.run("c1")
    await h.exec("c1", "e1")
    epid = await h.start("c1", "e1")
    h.agent.pids_extra = [ProcessInfo(0, ""), ProcessInfo(1 << 30, ""), ProcessInfo(77, "ghost")]
    r = await h.svc.Pids(shim_pb2.PidsRequest(id="c1"), CTX)
    pids = {p.pid: p for p in r.processes}
    assert set(pids) == {h.mgr.get("c1").init.pid, epid, 77}
    assert pids[epid].info.type_url.endswith("ProcessDetails")
    assert not pids[77].info.type_url                 # not one of our execs
    h.agent.push_exit("c1", "e1")
    h.agent.push_exit("c1")
    await h.wait("c1")
    n = len(h.agent.called("pids"))
    assert list((await h.svc.Pids(shim_pb2.PidsRequest(id="c1"), CTX)).processes) == []
    assert len(h.agent.called("pids")) == n           # a stopped container: not asked


async def test_stats_are_containerd_metrics(h):
    from spinbox.api._pb.containerd.cgroups.v2 import metrics_pb2
    await h.run("c1")
    r = await h.svc.Stats(shim_pb2.StatsRequest(id="c1"), CTX)
    m = api_types.unpack_any(r.stats, metrics_pb2.Metrics)
    assert m.cpu.usage_usec == 2000 and m.memory.usage == 4096 and m.pids.limit == 64
    assert m.memory_events.oom_kill == 1


async def test_close_io_and_resize_pty(h):
    await h.run("c1")
    await h.svc.CloseIO(shim_pb2.CloseIORequest(id="c1", stdin=True), CTX)
    assert h.agent.called("close_stdin")[0].args[:2] == ("c1", "")
    with pytest.raises(ttrpc.FailedPrecondition, match="no terminal"):
        await h.svc.ResizePty(shim_pb2.ResizePtyRequest(id="c1", width=80, height=24), CTX)
    await h.create("t1", terminal=True)
    await h.svc.ResizePty(shim_pb2.ResizePtyRequest(id="t1", width=80, height=24), CTX)
    assert h.agent.called("resize_pty")[0].args[:4] == ("t1", "", 80, 24)


async def test_guest_errors_pass_through_with_their_code(h):
    await h.run("c1")
    h.agent.fail("kill", ttrpc.NotFound("guest: no such process"))
    with pytest.raises(ttrpc.NotFound, match="guest"):
        await h.kill("c1")
    h.agent.fail("stats", RuntimeError("a bug"))
    with pytest.raises(ttrpc.Internal, match="RuntimeError"):
        await h.svc.Stats(shim_pb2.StatsRequest(id="c1"), CTX)


async def test_publisher_failure_does_not_fail_the_rpc(h):
    h.pub.fail_topics.add("/tasks/create")
    await h.create("c1")
    assert "c1" in h.mgr.containers and h.pub.topics("c1") == []
    await h.start("c1")
    assert h.pub.topics("c1") == ["/tasks/start"]


# --- Shutdown ------------------------------------------------------------------------------

async def test_shutdown_with_containers_left_keeps_serving(h):
    await h.run("c1")
    await h.svc.Shutdown(shim_pb2.ShutdownRequest(id="c1"), CTX)
    await asyncio.sleep(0.02)
    assert h.exit_requests == 0 and not h.svc.shutting_down and not h.svc.shutdown_done.is_set()
    assert "stop" not in h.sb.journal
    await h.run("c2")                              # still serving
    h.agent.push_exit("c2", status=0)
    assert (await h.wait("c2")).exit_status == 0


async def test_shutdown_without_containers_exits_once_and_stops_the_sandbox(h):
    await h.run("c1")
    h.agent.push_exit("c1", status=0)
    await h.wait("c1")
    await h.delete("c1")
    await h.svc.Shutdown(shim_pb2.ShutdownRequest(id="c1"), CTX)
    await h.svc.Shutdown(shim_pb2.ShutdownRequest(id="c1"), CTX)   # containerd may repeat it
    await asyncio.wait_for(h.svc.shutdown_done.wait(), T)
    await asyncio.sleep(0.02)
    assert h.exit_requests == 1 and h.svc.shutting_down
    assert h.sb.journal.count("stop") == 1 and h.sb.state.value == "stopped"
    assert h.mgr.sandbox is None
    with pytest.raises(ttrpc.FailedPrecondition, match="shutting down"):
        await h.create("c2")


async def test_shutdown_before_any_create_exits_without_a_sandbox(h):
    await h.svc.Shutdown(shim_pb2.ShutdownRequest(), CTX)
    await asyncio.wait_for(h.svc.shutdown_done.wait(), T)
    await asyncio.sleep(0)
    assert h.exit_requests == 1 and h.factory.made == []


async def test_stopping_the_sandbox_on_purpose_reports_no_lost_exits(h):
    """close() (daemon exit) stops the sandbox: that is not a lost sandbox, no 255 exits."""
    await h.run("c1")
    await h.close()
    await asyncio.sleep(0.02)
    assert h.pub.exits("c1") == []
    assert h.sb.state.value == "stopped"


async def test_shutdown_still_requests_the_exit_when_the_sandbox_stop_fails(h):
    await h.create("c1")
    await h.delete("c1")
    h.sb.fail["stop"] = HostError("qemu would not die")
    await h.svc.Shutdown(shim_pb2.ShutdownRequest(), CTX)
    # _shutdown's own error is not containerd's business: the exit is requested anyway.
    await asyncio.wait_for(h.svc.shutdown_done.wait(), T)
    assert h.exit_requests == 1


async def test_shutdown_during_a_create_keeps_serving(h):
    gate = asyncio.Event()
    orig = h.factory.__call__

    def factory():
        sb = orig()
        sb.gates["start"] = gate                  # the VM is booting
        return sb
    h.mgr._sandbox_factory = factory
    t = asyncio.ensure_future(h.create("c1"))
    await eventually(lambda: h.factory.made and h.factory.last.journal == ["start"])
    await h.svc.Shutdown(shim_pb2.ShutdownRequest(), CTX)
    assert not h.svc.shutting_down and h.exit_requests == 0
    gate.set()
    await asyncio.wait_for(t, T)
    assert "c1" in h.mgr.containers


# --- concurrency -----------------------------------------------------------------------

async def test_concurrent_creates_share_one_sandbox_and_ids_stay_unique(h):
    gate = asyncio.Event()
    orig = h.factory.__call__

    def factory():
        sb = orig()
        sb.gates["start"] = gate
        return sb
    h.mgr._sandbox_factory = factory
    a = asyncio.ensure_future(h.create("a"))
    b = asyncio.ensure_future(h.create("b"))
    a2 = asyncio.ensure_future(h.create("a", bundle=h.bundle("a2")))
    with pytest.raises(ttrpc.AlreadyExists):
        await asyncio.wait_for(a2, T)             # "a" is being created
    gate.set()
    await asyncio.wait_for(asyncio.gather(a, b), T)
    assert len(h.factory.made) == 1 and set(h.mgr.containers) == {"a", "b"}
    assert h.sb.journal.count("start") == 1


async def test_unshare_failure_at_delete_is_not_containerds_problem(h):
    await h.create("c1")
    h.sb.fail["unshare"] = HostError("virtiofsd stuck")
    await h.delete("c1")
    assert h.mgr.containers == {} and h.pub.topics("c1")[-1] == "/tasks/delete"


async def test_connect_reports_the_task_pid(h):
    r = await h.svc.Connect(shim_pb2.ConnectRequest(id="c1"), CTX)
    assert r.shim_pid == os.getpid() and r.task_pid == 0
    await h.create("c1")
    r = await h.svc.Connect(shim_pb2.ConnectRequest(id="c1"), CTX)
    assert r.task_pid == h.mgr.get("c1").init.pid and r.version
