"""The Task service driven as containerd drives it, against a LOCAL vminitd sandbox (no VM:
host runc, busybox-static rootfs), through our ttrpc client on a real unix socket, with real
FIFOs and a recording publisher. Needs root, runc, busybox-static."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import ttrpc
from google.protobuf import any_pb2

from spinbox.api import types as api_types
from spinbox.api._pb.containerd.cgroups.v2 import metrics_pb2
from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.api._pb.containerd.task.v3 import shim_pb2 as shim_v3
from spinbox.api._pb.containerd.types.runc.options import oci_pb2
from spinbox.api._pb.containerd.types.task import task_pb2
from integration.bundles import make_busybox_rootfs, oci_spec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc)"),
    pytest.mark.skipif(shutil.which("runc") is None or not os.path.exists("/bin/busybox"),
                       reason="needs runc and busybox-static"),
]

NS = {"containerd-namespace-ttrpc": "testns"}


class RecordingPublisher:
    """What containerd would receive, in order (topic, event)."""

    def __init__(self):
        self.events: list[tuple[str, str, object]] = []

    async def publish(self, namespace, topic, event):
        self.events.append((namespace, topic, event))

    def of(self, container_id):
        return [(t, e) for _, t, e in self.events if e.container_id == container_id]

    def topics(self, container_id):
        return [t for t, _ in self.of(container_id)]


class FifoReader:
    """containerd's side of an output FIFO: open it, read everything until told to stop."""

    def __init__(self, path: Path):
        self.path = path
        self.data = bytearray()
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def drain(self) -> bytes:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.data += chunk
        return bytes(self.data)

    async def until(self, needle: bytes, timeout: float = 60) -> bytes:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while needle not in self.drain():
            assert loop.time() < end, f"{needle!r} not in {bytes(self.data)!r}"
            await asyncio.sleep(0.02)
        return bytes(self.data)

    def close(self):
        os.close(self.fd)


class Env:
    def __init__(self, tmp: Path, task, task3, pub, svc):
        self.tmp, self.task, self.task3, self.pub, self.svc = tmp, task, task3, pub, svc
        self.readers: list[FifoReader] = []
        self.writers: list[int] = []
        self.n = 0

    def fifo(self, name: str) -> Path:
        self.n += 1
        p = self.tmp / "fifos" / f"{self.n}-{name}"
        p.parent.mkdir(exist_ok=True)
        os.mkfifo(p)
        return p

    def bundle(self, id: str, args, terminal=False) -> Path:
        b = self.tmp / "bundles" / id
        b.mkdir(parents=True)
        make_busybox_rootfs(b / "rootfs")
        (b / "config.json").write_text(json.dumps(oci_spec(args, terminal, netns_path="/var/run/netns/host-cni-netns")))
        return b

    def reader(self, path: Path) -> FifoReader:
        r = FifoReader(path)
        self.readers.append(r)
        return r

    async def create(self, id, args, *, terminal=False, stdin=False, stderr=True):
        b = self.bundle(id, args, terminal)
        out = self.fifo(f"{id}-out")
        err = self.fifo(f"{id}-err") if stderr else None
        inp = self.fifo(f"{id}-in") if stdin else None
        r_out = self.reader(out)                 # containerd opens its read ends first
        r_err = self.reader(err) if err else None
        resp = await self.task.Create(shim_pb2.CreateTaskRequest(
            id=id, bundle=str(b), terminal=terminal, stdout=str(out), stderr=str(err or ""),
            stdin=str(inp or "")), metadata=NS, timeout=120)
        assert resp.pid > 1
        w = None
        if inp:
            w = os.open(inp, os.O_WRONLY | os.O_NONBLOCK)
            self.writers.append(w)
        return SimpleNamespace(pid=resp.pid, out=r_out, err=r_err, stdin=w, stdin_path=inp, bundle=b)

    async def exec(self, id, exec_id, args, *, terminal=False):
        out = self.fifo(f"{id}-{exec_id}-out")
        r = self.reader(out)
        spec = any_pb2.Any(type_url=api_types.OCI_PROCESS_TYPE_URL, value=json.dumps(
            {"args": args, "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}).encode())
        await self.task.Exec(shim_pb2.ExecProcessRequest(id=id, exec_id=exec_id, terminal=terminal,
                                                         stdout=str(out), spec=spec), metadata=NS, timeout=60)
        return r

    async def wait(self, id, exec_id=""):
        return await self.task.Wait(shim_pb2.WaitRequest(id=id, exec_id=exec_id), timeout=120)

    async def delete(self, id, exec_id=""):
        return await self.task.Delete(shim_pb2.DeleteRequest(id=id, exec_id=exec_id), metadata=NS, timeout=60)


def _container_pids(root: Path) -> list[int]:
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/root").startswith(str(root)):
                    found.append(int(p))
            except OSError:
                pass
    return found


@pytest.fixture
async def env():
    from spinbox.shim.sandbox import LocalSandbox
    from spinbox.shim.assembly import build_task_service
    tmp = Path(tempfile.mkdtemp(prefix="tsl-", dir="/tmp"))
    pub = RecordingPublisher()
    exits = []
    server = ttrpc.Server()
    sandboxes = []

    def factory():
        sb = LocalSandbox("sbx", tmp / "sandbox", drain_timeout=30)
        sandboxes.append(sb)
        return sb

    svc = build_task_service(factory, pub, namespace="testns", request_exit=lambda: exits.append(True),
                             drain_timeout=30, agent_timeout=60)
    svc.register(server)
    sock = tmp / "shim.sock"
    await server.serve_unix(str(sock))
    client = await ttrpc.connect_unix(f"unix://{sock}")
    task = client.stub(shim_pb2.DESCRIPTOR.services_by_name["Task"])
    task3 = client.stub(shim_v3.DESCRIPTOR.services_by_name["Task"], name=api_types.TASK_SERVICE_V3)
    e = Env(tmp, task, task3, pub, svc)
    e.exits = exits
    try:
        yield e
    finally:
        for r in e.readers:
            r.close()
        for w in e.writers:
            try:
                os.close(w)
            except OSError:
                pass
        await client.close()
        await svc.close()               # stops the local vminitd (kills + deletes its containers)
        await server.close()
        leftovers = _container_pids(tmp / "bundles")
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        mounted = [l for l in open("/proc/self/mountinfo") if str(tmp) in l]
        log_tail = sandboxes[0].log_tail() if sandboxes else ""
        shutil.rmtree(tmp, ignore_errors=True)
        assert not leftovers, f"container processes left: {leftovers}\n{log_tail}"
        assert not mounted, f"mounts left: {mounted}"


async def test_run_stdout_stderr_exit_code_and_event_order(env):
    c = await env.create("c1", ["sh", "-c", "echo hello; echo oops >&2; exit 7"])
    st = await env.task.State(shim_pb2.StateRequest(id="c1"))
    assert st.status == task_pb2.CREATED and st.pid == c.pid and st.stdout.endswith("c1-out")
    assert (await env.task.Connect(shim_pb2.ConnectRequest(id="c1"))).task_pid == c.pid
    waiter = asyncio.ensure_future(env.wait("c1"))      # Wait while only created blocks
    await asyncio.sleep(0.2)
    assert not waiter.done()
    r = await env.task.Start(shim_pb2.StartRequest(id="c1"), timeout=60)
    assert r.pid == c.pid
    w = await waiter
    assert w.exit_status == 7 and w.exited_at.seconds > 0
    # the output is in the FIFOs by the time the exit is reported
    assert c.out.drain() == b"hello\n" and c.err.drain() == b"oops\n"
    st = await env.task.State(shim_pb2.StateRequest(id="c1"))
    assert st.status == task_pb2.STOPPED and st.exit_status == 7 and st.exited_at.seconds > 0
    with pytest.raises(ttrpc.NotFound, match="already finished"):
        await env.task.Kill(shim_pb2.KillRequest(id="c1", signal=9))
    d = await env.delete("c1")
    assert d.exit_status == 7 and d.pid == c.pid
    assert env.pub.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert all(ns == "testns" for ns, _, _ in env.pub.events)
    exit_ev = env.pub.of("c1")[2][1]
    assert (exit_ev.id, exit_ev.pid, exit_ev.exit_status) == ("c1", c.pid, 7)
    with pytest.raises(ttrpc.NotFound):
        await env.task.State(shim_pb2.StateRequest(id="c1"))
    assert "c1" not in env.svc.manager.containers


async def test_kill_exec_pids_pause_stats_and_errors(env):
    c = await env.create("c2", ["sleep", "1000"])
    await env.task.Start(shim_pb2.StartRequest(id="c2"), timeout=60)
    with pytest.raises(ttrpc.AlreadyExists):
        await env.task.Create(shim_pb2.CreateTaskRequest(id="c2", bundle=str(c.bundle)), timeout=60)
    with pytest.raises(ttrpc.NotFound):
        await env.task.State(shim_pb2.StateRequest(id="nope"))
    with pytest.raises(ttrpc.NotFound):
        await env.task.Kill(shim_pb2.KillRequest(id="nope", signal=9))
    with pytest.raises(ttrpc.FailedPrecondition):
        await env.task.Start(shim_pb2.StartRequest(id="c2"))
    with pytest.raises(ttrpc.FailedPrecondition):
        await env.delete("c2")                      # running
    with pytest.raises(ttrpc.Unimplemented):
        await env.task.Checkpoint(shim_pb2.CheckpointTaskRequest(id="c2"))

    # exec: output through its FIFO, SIGTERM -> 143
    out = await env.exec("c2", "e1", ["sh", "-c", "echo in-exec; exec sleep 1000"])
    with pytest.raises(ttrpc.AlreadyExists):
        await env.exec("c2", "e1", ["true"])
    with pytest.raises(ttrpc.NotFound):
        await env.task.State(shim_pb2.StateRequest(id="c2", exec_id="zzz"))
    ep = await env.task.Start(shim_pb2.StartRequest(id="c2", exec_id="e1"), timeout=60)
    await out.until(b"in-exec\n")
    pids = await env.task.Pids(shim_pb2.PidsRequest(id="c2"), timeout=60)
    by_pid = {p.pid: p for p in pids.processes}
    assert c.pid in by_pid and ep.pid in by_pid
    details = api_types.unpack_any(by_pid[ep.pid].info, oci_pb2.ProcessDetails)
    assert details.exec_id == "e1"
    st = await env.task.State(shim_pb2.StateRequest(id="c2", exec_id="e1"))
    assert st.exec_id == "e1" and st.status == task_pb2.RUNNING and st.pid == ep.pid

    await env.task.Pause(shim_pb2.PauseRequest(id="c2"), timeout=60)
    assert (await env.task.State(shim_pb2.StateRequest(id="c2"))).status == task_pb2.PAUSED
    with pytest.raises(ttrpc.FailedPrecondition):
        await env.task.Pause(shim_pb2.PauseRequest(id="c2"))
    await env.task.Resume(shim_pb2.ResumeRequest(id="c2"), timeout=60)
    assert (await env.task.State(shim_pb2.StateRequest(id="c2"))).status == task_pb2.RUNNING

    s = await env.task.Stats(shim_pb2.StatsRequest(id="c2"), timeout=60)
    assert s.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    m = api_types.unpack_any(s.stats, metrics_pb2.Metrics)
    assert m.pids.current >= 2 and m.memory.usage > 0

    await env.task.Kill(shim_pb2.KillRequest(id="c2", exec_id="e1", signal=15), timeout=60)
    assert (await env.wait("c2", "e1")).exit_status == 143
    de = await env.delete("c2", "e1")
    assert de.exit_status == 143 and de.pid == ep.pid

    await env.task.Kill(shim_pb2.KillRequest(id="c2", signal=9, all=True), timeout=60)
    assert (await env.wait("c2")).exit_status == 137
    assert list((await env.task.Pids(shim_pb2.PidsRequest(id="c2"))).processes) == []
    await env.delete("c2")
    assert env.pub.topics("c2") == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                                    "/tasks/exec-started", "/tasks/paused", "/tasks/resumed",
                                    "/tasks/exit", "/tasks/exit", "/tasks/delete"]
    exits = [e for t, e in env.pub.of("c2") if t == "/tasks/exit"]
    assert [(e.id, e.exit_status) for e in exits] == [("e1", 143), ("c2", 137)]


async def test_stdin_through_fifo_and_closeio(env):
    c = await env.create("c3", ["sh", "-c", "read line; echo got:$line; cat; echo done"], stdin=True)
    await env.task.Start(shim_pb2.StartRequest(id="c3"), timeout=60)
    os.write(c.stdin, b"hello world\n")
    await c.out.until(b"got:hello world\n")
    os.write(c.stdin, b"more\n")
    await c.out.until(b"more\n")
    os.close(c.stdin)                                # EOF on the FIFO closes stdin in the guest
    env.writers.remove(c.stdin)
    assert (await env.wait("c3")).exit_status == 0
    assert c.out.drain() == b"got:hello world\nmore\ndone\n"
    await env.delete("c3")


async def test_tty_and_resize(env):
    c = await env.create("c4", ["sh", "-c", "tty; read x; stty size; echo bye:$x"], terminal=True,
                         stdin=True, stderr=False)
    await env.task.Start(shim_pb2.StartRequest(id="c4"), timeout=60)
    await c.out.until(b"/dev/pts/")
    await env.task.ResizePty(shim_pb2.ResizePtyRequest(id="c4", width=100, height=33), timeout=60)
    os.write(c.stdin, b"abc\n")
    assert (await env.wait("c4")).exit_status == 0
    data = c.out.drain()
    assert b"33 100" in data and b"bye:abc" in data
    await env.delete("c4")
    c5 = await env.create("c4b", ["true"])
    with pytest.raises(ttrpc.FailedPrecondition, match="no terminal"):
        await env.task.ResizePty(shim_pb2.ResizePtyRequest(id="c4b", width=1, height=1))
    await env.delete("c4b")
    assert c5.pid > 1


async def test_v3_service_and_shutdown(env):
    r = await env.task3.Connect(shim_v3.ConnectRequest(id="x"))
    assert r.shim_pid == os.getpid() and r.task_pid == 0
    c = await env.create("c5", ["sleep", "1000"])
    st = await env.task3.State(shim_v3.StateRequest(id="c5"))
    assert st.status == task_pb2.CREATED
    await env.task3.Shutdown(shim_v3.ShutdownRequest(id="c5"))
    await asyncio.sleep(0.1)
    assert not env.exits and not env.svc.shutting_down   # a container remains: keep serving
    # deleting a never-started task
    d = await env.delete("c5")
    assert d.pid == c.pid
    assert env.pub.topics("c5") == ["/tasks/create", "/tasks/delete"]
    await env.task3.Shutdown(shim_v3.ShutdownRequest(id="c5"))
    await asyncio.wait_for(env.svc.shutdown_done.wait(), 60)
    assert env.exits == [True]


async def test_rootfs_mounts_are_mounted_and_unmounted(env):
    from spinbox.api._pb.containerd.types import mount_pb2
    tree = env.tmp / "snapshot"
    make_busybox_rootfs(tree)
    b = env.tmp / "bundles" / "c6"
    b.mkdir(parents=True)
    (b / "config.json").write_text(json.dumps(oci_spec(["sh", "-c", "echo from-snapshot"], netns_path="/var/run/netns/host-cni-netns")))
    out = env.fifo("c6-out")
    r = env.reader(out)
    await env.task.Create(shim_pb2.CreateTaskRequest(
        id="c6", bundle=str(b), stdout=str(out),
        rootfs=[mount_pb2.Mount(type="bind", source=str(tree), options=["rbind", "rw"])]), timeout=120)
    from spinbox.shim.rootfs import is_mountpoint
    assert is_mountpoint(b / "rootfs")
    await env.task.Start(shim_pb2.StartRequest(id="c6"), timeout=60)
    assert (await env.wait("c6")).exit_status == 0
    assert r.drain() == b"from-snapshot\n"
    await env.delete("c6")
    assert not is_mountpoint(b / "rootfs")
    ev = env.pub.of("c6")[0][1]
    assert ev.rootfs[0].type == "bind" and ev.rootfs[0].source == str(tree)
