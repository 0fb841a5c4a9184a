"""vminitd outside a VM: the agent on a unix socket, real runc (--root in a temp state dir), a
busybox-static rootfs, driven through our ttrpc client.

Needs root, runc and busybox-static (Debian). Every container, runc state dir, temp dir and
process is removed in the fixtures.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import spinbox.vminitd
from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import events_pb2 as epb
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb
from spinbox.api._pb.spinbox.agent.v1 import system_pb2 as sypb
from integration.bundles import make_busybox_rootfs, oci_process, oci_spec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc)"),
    pytest.mark.skipif(shutil.which("runc") is None or not os.path.exists("/bin/busybox"),
                       reason="needs runc and busybox-static"),
]

SVC = "spinbox.agent.v1."


class Agent:
    """Host-side helpers over our ttrpc client (what the shim will do)."""

    def __init__(self, client) -> None:
        self.client = client

    async def call(self, service: str, method: str, req, resp_type, timeout: float | None = 60):
        return await self.client.call(SVC + service, method, req, resp_type, timeout=timeout)

    async def c(self, method: str, req, resp_type=cpb.Empty, timeout: float | None = 60):
        return await self.call("Containers", method, req, resp_type, timeout)

    async def read_output(self, id: str, exec_id: str = "", fd: int = spb.STDOUT, *, offset: int = 0,
                          window: int = 1 << 20, limit: int | None = None) -> tuple[bytes, bool]:
        """Read a stream to its acknowledged EOF (True) or until `limit` bytes (False, stream
        left open unacknowledged as a crashing host would)."""
        s = await self.client.open_stream(SVC + "Stdio", "Output", spb.OutputServer,
                                          client_streaming=True, server_streaming=True)
        await s.send(spb.OutputClient(open=spb.OutputOpen(id=id, exec_id=exec_id, fd=fd, offset=offset,
                                                          window=window)))
        data = bytearray()
        pos = offset
        while True:
            m = await s.recv()
            if m is None:
                raise AssertionError("output stream ended without EOF")
            if m.eof:
                assert m.offset == pos
                await s.send(spb.OutputClient(ack=spb.OutputAck(offset=pos, window=window, eof=True)))
                await s.close_send()
                while await s.recv() is not None:
                    pass
                return bytes(data), True
            assert m.offset == pos, (m.offset, pos)
            data += m.data
            pos += len(m.data)
            if limit is not None and len(data) >= limit:
                return bytes(data), False
            await s.send(spb.OutputClient(ack=spb.OutputAck(offset=pos, window=window)))

    async def write_input(self, id: str, exec_id: str, data: bytes, eof: bool = True) -> int:
        s = await self.client.open_stream(SVC + "Stdio", "Input", spb.InputServer,
                                          client_streaming=True, server_streaming=True)
        await s.send(spb.InputClient(open=spb.InputOpen(id=id, exec_id=exec_id)))
        ack = await s.recv()
        pos, limit = ack.offset, ack.offset + ack.window
        while pos < len(data):
            while pos >= limit:
                ack = await s.recv()
                limit = ack.offset + ack.window
            n = min(len(data), limit, pos + 65536) - pos
            await s.send(spb.InputClient(data=spb.InputData(offset=pos, data=data[pos:pos + n])))
            pos += n
        if eof:
            await s.send(spb.InputClient(data=spb.InputData(offset=pos, eof=True)))
            while (ack := await s.recv()) is not None and not ack.eof:
                pass
            assert ack is not None and ack.eof and ack.offset == len(data)
        await s.close_send()
        return pos

    async def events(self, after_seq: int = 0):
        return await self.client.open_stream(SVC + "Events", "Subscribe", epb.Event,
                                             request=epb.SubscribeRequest(after_seq=after_seq),
                                             server_streaming=True)


def spec(args: list[str], terminal: bool = False, memory_limit: int | None = None) -> bytes:
    return json.dumps(oci_spec(args, terminal, memory_limit=memory_limit,
                               netns_path="/var/run/netns/does-not-matter")).encode()


def process(args: list[str], terminal: bool = False) -> bytes:
    return json.dumps(oci_process(args, terminal)).encode()


def _container_pids(rootfs: Path) -> list[int]:
    """Processes whose root is our rootfs: anything a container left running."""
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/root") == str(rootfs):
                    found.append(int(p))
            except OSError:
                pass
    return found


@pytest.fixture
async def env():
    import ttrpc
    tmp = Path(tempfile.mkdtemp(prefix="vmi-", dir="/tmp"))
    rootfs = tmp / "rootfs"
    make_busybox_rootfs(rootfs)
    state = tmp / "state"
    sock = tmp / "agent.sock"
    log = open(tmp / "vminitd.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "spinbox.vminitd.main", "--listen", f"unix:{sock}",
                             "--state-dir", str(state), "--drain-timeout", "30", "-v"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    clients = []

    async def connect():
        c = await ttrpc.connect_unix(f"unix://{sock}")
        clients.append(c)
        return Agent(c)

    try:
        for _ in range(300):
            if sock.exists() or proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.poll() is None, (tmp / "vminitd.log").read_text()
        agent = await connect()
        yield {"agent": agent, "connect": connect, "rootfs": rootfs, "state": state, "proc": proc, "tmp": tmp}
    finally:
        for c in clients:
            try:
                await c.close()
            except Exception:
                pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)   # vminitd kills and deletes its containers
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        leftovers = _container_pids(rootfs)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        runc_root = state / "runc"
        listed = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"], capture_output=True,
                                text=True).stdout.split() if runc_root.exists() else []
        for cid in listed:
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", cid])
        import glob
        cgroup_left = glob.glob(f"/sys/fs/cgroup/spinbox-vminitd-{proc.pid}") + \
            glob.glob(f"/sys/fs/cgroup/*/spinbox-vminitd-{proc.pid}")
        print((tmp / "vminitd.log").read_text()[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
        assert not leftovers, f"container processes left behind: {leftovers}"
        assert not listed, f"runc containers left behind: {listed}"
        assert not cgroup_left, f"cgroups left behind: {cgroup_left}"


async def create(agent: Agent, env, id: str, args: list[str], *, terminal=False, stdin=False, stdout=True,
                 stderr=True) -> int:
    r = await agent.c("Create", cpb.CreateRequest(id=id, spec=spec(args, terminal),
                                                  rootfs=cpb.Rootfs(path=str(env["rootfs"])), terminal=terminal,
                                                  stdin=stdin, stdout=stdout, stderr=stderr), cpb.CreateResponse)
    assert r.pid > 1
    return r.pid


async def next_exit(events, id: str | None = None):
    while True:
        ev = await events.recv()
        assert ev is not None
        if ev.WhichOneof("event") == "exit" and (id is None or ev.exit.id == id):
            return ev


async def test_system_calls(env):
    a = env["agent"]
    await a.call("System", "Ping", cpb.Empty(), cpb.Empty)
    v = await a.call("System", "Version", cpb.Empty(), sypb.VersionResponse)
    assert v.api == "spinbox.agent.v1"
    info = await a.call("System", "Info", cpb.Empty(), sypb.InfoResponse)
    assert info.cpus_online >= 1 and info.memory_total_bytes > 0 and info.kernel and not info.pid1


async def test_invalid_input_is_refused(env):
    import ttrpc
    a = env["agent"]
    with pytest.raises(ttrpc.InvalidArgument):
        await a.c("Create", cpb.CreateRequest(id="../etc", spec=spec(["true"]),
                                              rootfs=cpb.Rootfs(path=str(env["rootfs"]))))
    with pytest.raises(ttrpc.InvalidArgument):
        await a.c("Create", cpb.CreateRequest(id="x", spec=b"{nope", rootfs=cpb.Rootfs(path=str(env["rootfs"]))))
    with pytest.raises(ttrpc.NotFound):
        await a.c("State", cpb.StateRequest(id="nope"), cpb.StateResponse)
    with pytest.raises(ttrpc.InvalidArgument):
        await a.c("Create", cpb.CreateRequest(id="y", spec=spec(["true"]), rootfs=cpb.Rootfs(path="/no/such/dir")))


async def test_stdout_stderr_exit_code_and_exit_after_output(env):
    a = env["agent"]
    events = await a.events()
    await create(a, env, "c1", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    st = await a.c("State", cpb.StateRequest(id="c1"), cpb.StateResponse)
    assert st.status == cpb.CREATED
    await a.c("Start", cpb.StartRequest(id="c1"), cpb.StartResponse)
    # Nobody has read the output yet: the exit must not be reported.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(next_exit(events), 1.0)
    out, err = await asyncio.gather(a.read_output("c1"), a.read_output("c1", fd=spb.STDERR))
    assert out == (b"out\n", True) and err == (b"err\n", True)
    ev = await asyncio.wait_for(next_exit(events, "c1"), 30)
    assert ev.exit.exit_status == 7 and ev.exit.exec_id == ""
    w = await a.c("Wait", cpb.WaitRequest(id="c1"), cpb.WaitResponse)
    assert w.exit_status == 7 and w.exited_at_ns > 0
    st = await a.c("State", cpb.StateRequest(id="c1"), cpb.StateResponse)
    assert st.status == cpb.STOPPED and st.exit_status == 7
    d = await a.c("Delete", cpb.DeleteRequest(id="c1"), cpb.DeleteResponse)
    assert d.exit_status == 7
    await events.aclose()


async def test_sigkill_is_137(env):
    import ttrpc
    a = env["agent"]
    await create(a, env, "k1", ["sleep", "1000"], stdout=False, stderr=False)
    await a.c("Start", cpb.StartRequest(id="k1"), cpb.StartResponse)
    with pytest.raises(ttrpc.TTRPCError):
        await a.c("Delete", cpb.DeleteRequest(id="k1"), cpb.DeleteResponse)   # running
    await a.c("Kill", cpb.KillRequest(id="k1", signal=9))
    w = await a.c("Wait", cpb.WaitRequest(id="k1"), cpb.WaitResponse)
    assert w.exit_status == 137
    with pytest.raises(ttrpc.NotFound):
        await a.c("Kill", cpb.KillRequest(id="k1", signal=9))
    await a.c("Delete", cpb.DeleteRequest(id="k1"), cpb.DeleteResponse)


async def test_exec_beside_init_sigterm_and_event_order(env):
    a = env["agent"]
    events = await a.events()
    await create(a, env, "e1", ["sleep", "1000"], stdout=False, stderr=False)
    await a.c("Start", cpb.StartRequest(id="e1"), cpb.StartResponse)
    # An exec with output, beside the init.
    await a.c("Exec", cpb.ExecRequest(id="e1", exec_id="hello", process=process(["sh", "-c", "echo hi from exec"]),
                                      stdout=True))
    await a.c("Start", cpb.StartRequest(id="e1", exec_id="hello"), cpb.StartResponse)
    assert await a.read_output("e1", "hello") == (b"hi from exec\n", True)
    w = await a.c("Wait", cpb.WaitRequest(id="e1", exec_id="hello"), cpb.WaitResponse)
    assert w.exit_status == 0
    await a.c("Delete", cpb.DeleteRequest(id="e1", exec_id="hello"), cpb.DeleteResponse)
    # A non-PID-1 exec dies of SIGTERM: 143.
    await a.c("Exec", cpb.ExecRequest(id="e1", exec_id="t", process=process(["sleep", "1000"])))
    pid = (await a.c("Start", cpb.StartRequest(id="e1", exec_id="t"), cpb.StartResponse)).pid
    pids = await a.c("Pids", cpb.PidsRequest(id="e1"), cpb.PidsResponse)
    assert (pid, "t") in [(p.pid, p.exec_id) for p in pids.processes]
    await a.c("Kill", cpb.KillRequest(id="e1", exec_id="t", signal=15))
    w = await a.c("Wait", cpb.WaitRequest(id="e1", exec_id="t"), cpb.WaitResponse)
    assert w.exit_status == 143
    # An exec still running when the init dies: its exit comes first.
    await a.c("Exec", cpb.ExecRequest(id="e1", exec_id="last", process=process(["sleep", "1000"])))
    await a.c("Start", cpb.StartRequest(id="e1", exec_id="last"), cpb.StartResponse)
    await a.c("Kill", cpb.KillRequest(id="e1", signal=9))
    order = []
    while len(order) < 4:
        ev = await asyncio.wait_for(next_exit(events, "e1"), 30)
        order.append((ev.exit.exec_id, ev.exit.exit_status))
    assert order == [("hello", 0), ("t", 143), ("last", 137), ("", 137)]
    await a.c("Delete", cpb.DeleteRequest(id="e1"), cpb.DeleteResponse)
    await events.aclose()


async def test_stdin_to_eof(env):
    a = env["agent"]
    data = os.urandom(3 << 20)
    await create(a, env, "in1", ["cat"], stdin=True, stderr=False)
    await a.c("Start", cpb.StartRequest(id="in1"), cpb.StartResponse)
    reader = asyncio.ensure_future(a.read_output("in1"))
    assert await a.write_input("in1", "", data) == len(data)
    out, done = await asyncio.wait_for(reader, 120)
    assert done and hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
    w = await a.c("Wait", cpb.WaitRequest(id="in1"), cpb.WaitResponse)
    assert w.exit_status == 0
    await a.c("Delete", cpb.DeleteRequest(id="in1"), cpb.DeleteResponse)


async def test_tty_and_resize(env):
    a = env["agent"]
    await create(a, env, "t1", ["sh", "-c", "tty; stty size"], terminal=True, stderr=False)
    await a.c("ResizePty", cpb.ResizePtyRequest(id="t1", width=123, height=45))
    await a.c("Start", cpb.StartRequest(id="t1"), cpb.StartResponse)
    out, done = await a.read_output("t1")
    lines = out.decode().split()
    assert done and lines[0].startswith("/dev/pts/") and lines[1:3] == ["45", "123"], out
    w = await a.c("Wait", cpb.WaitRequest(id="t1"), cpb.WaitResponse)
    assert w.exit_status == 0
    await a.c("Delete", cpb.DeleteRequest(id="t1"), cpb.DeleteResponse)


async def test_50mb_stdout_intact(env):
    a = env["agent"]
    size = 50 * 1024 * 1024
    line = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
    expected = hashlib.sha256((line * (size // len(line) + 1))[:size]).hexdigest()
    await create(a, env, "big", ["sh", "-c", f"yes {line.decode().strip()} | head -c {size}"], stderr=False)
    await a.c("Start", cpb.StartRequest(id="big"), cpb.StartResponse)
    out, done = await a.read_output("big")
    assert done and len(out) == size and hashlib.sha256(out).hexdigest() == expected
    w = await a.c("Wait", cpb.WaitRequest(id="big"), cpb.WaitResponse)
    assert w.exit_status == 0
    await a.c("Delete", cpb.DeleteRequest(id="big"), cpb.DeleteResponse)


async def test_pause_resume_and_stats(env):
    a = env["agent"]
    counter = env["rootfs"] / "tmp" / "counter"
    await create(a, env, "p1", ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; done"],
                 stdout=False, stderr=False)
    await a.c("Start", cpb.StartRequest(id="p1"), cpb.StartResponse)

    def value() -> int:
        for _ in range(100):
            try:
                return int(counter.read_text())
            except (FileNotFoundError, ValueError):   # not written yet
                time.sleep(0.05)
        raise AssertionError("no counter")

    async def advances() -> bool:
        v = value()
        for _ in range(500):
            await asyncio.sleep(0.02)
            if value() != v:
                return True
        return False

    assert await advances()
    stats = await a.c("Stats", cpb.StatsRequest(id="p1"), cpb.StatsResponse)
    assert stats.cpu_usage_ns > 0 and stats.memory_usage_bytes > 0 and stats.pids_current >= 1
    assert json.loads(stats.raw)["type"] == "stats"
    await a.c("Pause", cpb.ContainerRequest(id="p1"))
    st = await a.c("State", cpb.StateRequest(id="p1"), cpb.StateResponse)
    assert st.status == cpb.PAUSED
    v = value()
    await asyncio.sleep(0.5)
    assert value() == v, "counter advanced while paused"
    await a.c("Resume", cpb.ContainerRequest(id="p1"))
    assert await advances()
    await a.c("Update", cpb.UpdateRequest(id="p1", resources=json.dumps({"pids": {"limit": 50}}).encode()))
    stats = await a.c("Stats", cpb.StatsRequest(id="p1"), cpb.StatsResponse)
    assert stats.pids_limit == 50
    await a.c("Kill", cpb.KillRequest(id="p1", signal=9))
    assert (await a.c("Wait", cpb.WaitRequest(id="p1"), cpb.WaitResponse)).exit_status == 137
    await a.c("Delete", cpb.DeleteRequest(id="p1"), cpb.DeleteResponse)


async def test_host_reconnect_loses_nothing(env):
    a = env["agent"]
    n = 300000
    expected = b"".join(b"%d\n" % i for i in range(1, n + 1))
    await create(a, env, "r1", ["sh", "-c", f"seq 1 {n // 2}; sleep 1; seq {n // 2 + 1} {n}"], stderr=False)
    await a.c("Start", cpb.StartRequest(id="r1"), cpb.StartResponse)
    part, done = await a.read_output("r1", limit=100000)
    assert not done
    # The host goes away without acknowledging its last chunk, the container keeps writing.
    await a.client.close()
    await asyncio.sleep(1.5)
    b = await env["connect"]()
    # Resume at what we hold; the guest kept the last chunk since we never acknowledged it.
    rest, done = await b.read_output("r1", offset=len(part))
    assert done
    assert part + rest == expected
    events = await b.events(after_seq=0)
    ev = await asyncio.wait_for(next_exit(events, "r1"), 30)
    assert ev.exit.exit_status == 0
    await b.c("Delete", cpb.DeleteRequest(id="r1"), cpb.DeleteResponse)


async def test_oom_event_before_exit(env):
    a = env["agent"]
    events = await a.events()
    await a.c("Create", cpb.CreateRequest(id="oom", spec=spec(["tail", "/dev/zero"], memory_limit=32 << 20),
                                          rootfs=cpb.Rootfs(path=str(env["rootfs"]))), cpb.CreateResponse)
    await a.c("Start", cpb.StartRequest(id="oom"), cpb.StartResponse)
    kinds = []
    while True:
        ev = await asyncio.wait_for(events.recv(), 60)
        kinds.append(ev.WhichOneof("event"))
        if kinds[-1] == "exit":
            break
    assert kinds == ["oom", "exit"] and ev.exit.exit_status == 137
    await a.c("Delete", cpb.DeleteRequest(id="oom"), cpb.DeleteResponse)
    await events.aclose()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def _pid1_argv(vminitd: list[str]) -> list[str]:
    """`vminitd` run as PID 1 of new pid+mount+uts namespaces.

    PID 1 mode mounts fresh tmpfs on /run and /tmp, as the VM needs: there the code lives in
    the image's /usr/lib/spinbox. A checkout or venv under one of them (a clone in /tmp) would
    vanish under that mount, and with it the modules the agent imports after start-up. Such a
    folder is bind-mounted onto itself first, in the private mount namespace: PID 1 mode leaves
    a target that is already a mount point alone (the image's stage-2 script may mount some).
    """
    import google.protobuf
    import ttrpc

    from spinbox.vminitd import init
    code = [Path(m.__file__).resolve().parent for m in (spinbox.vminitd, ttrpc, google.protobuf)]
    code.append(Path(sys.prefix).resolve())
    hidden = [target for _, target, _, _ in init.BASE_MOUNTS
              if any(p.is_relative_to(target) for p in code)]
    unshare = ["unshare", "--mount", "--pid", "--uts", "--fork", "--propagation", "private"]
    if not hidden:
        return unshare + vminitd
    keep = 'for d in $KEEP; do mount --bind "$d" "$d" || exit 1; done; exec "$@"'
    return unshare + ["env", f"KEEP={' '.join(hidden)}", "sh", "-c", keep, "sh"] + vminitd


async def test_pid1_mode_in_a_pid_namespace():
    """vminitd as PID 1 (of a new pid+mount+uts namespace): PID 1 setup runs, Info says pid1,
    and System.Shutdown powers off (reboot(2) in a pid namespace ends its init)."""
    import ttrpc
    # Not under /tmp or /run: PID 1 mode mounts fresh tmpfs there (in its private namespace).
    tmp = Path(tempfile.mkdtemp(prefix="vmi-pid1-", dir="/var/tmp"))
    sock = tmp / "a.sock"
    log = open(tmp / "log", "wb")
    proc = subprocess.Popen(_pid1_argv([sys.executable, "-m", "spinbox.vminitd.main", "--listen", f"unix:{sock}",
                                        "--state-dir", str(tmp / "state")]),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(300):
            if sock.exists() or proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        c = await ttrpc.connect_unix(f"unix://{sock}")
        try:
            info = await c.call(SVC + "System", "Info", cpb.Empty(), sypb.InfoResponse, timeout=30)
            assert info.pid1
            await c.call(SVC + "System", "Shutdown", sypb.ShutdownRequest(), cpb.Empty, timeout=30)
        finally:
            await c.close()
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60)   # it powered off
        text = (tmp / "log").read_text()
        assert "vminitd: ready in" in text and "shutting down" in text, text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_delete_a_created_container_that_never_started(env):
    a = env["agent"]
    await create(a, env, "never", ["sleep", "1000"])      # stdout/stderr wanted but never read
    d = await a.c("Delete", cpb.DeleteRequest(id="never"), cpb.DeleteResponse)
    assert d.exit_status == 137
    import ttrpc
    with pytest.raises(ttrpc.NotFound):
        await a.c("State", cpb.StateRequest(id="never"), cpb.StateResponse)
