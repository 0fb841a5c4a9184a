"""spinbox.shim.agent against scripted (sometimes hostile) guest agents on a unix socket.

The fake guest is a real ttrpc.Server serving the guest API method names; each test scripts
what it answers. What is checked: replies are validated (pids, exit statuses, ids, offsets,
windows, sizes, sequence numbers), output/input streams honour the window and the EOF ack, and
a lost connection makes calls fail as AgentUnavailable.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

import pytest

import ttrpc
from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import events_pb2 as epb
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb
from spinbox.shim.agent import (PID_MAX, AgentClient, AgentProtocolError, AgentUnavailable)

C = "spinbox.agent.v1.Containers"
S = "spinbox.agent.v1.Stdio"
E = "spinbox.agent.v1.Events"
Y = "spinbox.agent.v1.System"


class FakeGuest:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sbag-")
        self.path = os.path.join(self.dir, "a.sock")
        self.server: ttrpc.Server | None = None
        self.handlers: list[tuple] = []
        self.pings = 0

        async def ping(req, ctx):
            self.pings += 1
            return cpb.Empty()
        self.unary(Y, "Ping", ping, cpb.Empty)

    def unary(self, svc, method, fn, req_type) -> None:
        self.handlers.append((svc, method, fn, req_type, False, False))

    def bidi(self, svc, method, fn, req_type) -> None:
        self.handlers.append((svc, method, fn, req_type, True, True))

    def server_stream(self, svc, method, fn, req_type) -> None:
        self.handlers.append((svc, method, fn, req_type, False, True))

    async def start(self) -> None:
        self.server = ttrpc.Server()
        for svc, method, fn, req_type, cs, ss in self.handlers:
            self.server.register_method(svc, method, fn, req_type, client_streaming=cs, server_streaming=ss)
        await self.server.serve_unix(self.path)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
async def guest():
    g = FakeGuest()
    try:
        yield g
    finally:
        await g.stop()
        g.cleanup()


async def connect(g: FakeGuest) -> AgentClient:
    await g.start()
    return await AgentClient.wait_ready(g.path, timeout=10)


# ----------------------------------------------------------------------------- unary validation

@pytest.mark.parametrize("pid,ok", [(1, True), (PID_MAX - 1, True), (0, False), (PID_MAX, False)])
async def test_create_pid_is_validated(guest, pid, ok):
    async def create(req, ctx):
        return cpb.CreateResponse(pid=pid)
    guest.unary(C, "Create", create, cpb.CreateRequest)
    agent = await connect(guest)
    try:
        if ok:
            assert await agent.create("c1", {"process": {"args": ["true"]}}, rootfs_path="/r") == pid
        else:
            with pytest.raises(AgentProtocolError, match="pid"):
                await agent.create("c1", {"process": {"args": ["true"]}}, rootfs_path="/r")
    finally:
        await agent.close()


async def test_exit_status_out_of_range_is_rejected(guest):
    async def wait(req, ctx):
        return cpb.WaitResponse(exit_status=256, exited_at_ns=1, pid=5)
    guest.unary(C, "Wait", wait, cpb.WaitRequest)
    agent = await connect(guest)
    try:
        with pytest.raises(AgentProtocolError, match="exit status 256"):
            await agent.wait("c1")
    finally:
        await agent.close()


async def test_state_about_another_container_is_rejected(guest):
    async def state(req, ctx):
        return cpb.StateResponse(id="other", exec_id=req.exec_id, pid=3, status=cpb.RUNNING)
    guest.unary(C, "State", state, cpb.StateRequest)
    agent = await connect(guest)
    try:
        with pytest.raises(AgentProtocolError, match="other"):
            await agent.state("c1")
    finally:
        await agent.close()


async def test_pids_exec_ids_are_validated(guest):
    async def pids(req, ctx):
        return cpb.PidsResponse(processes=[cpb.ProcessInfo(pid=4, exec_id="../../etc")])
    guest.unary(C, "Pids", pids, cpb.PidsRequest)
    agent = await connect(guest)
    try:
        with pytest.raises(AgentProtocolError, match="invalid id"):
            await agent.pids("c1")
    finally:
        await agent.close()


async def test_guest_error_keeps_its_code_and_is_truncated(guest):
    async def start(req, ctx):
        raise ttrpc.NotFound("x" * 100_000 + "\x1b[2J")
    guest.unary(C, "Start", start, cpb.StartRequest)
    agent = await connect(guest)
    try:
        with pytest.raises(ttrpc.NotFound) as ei:
            await agent.start("c1")
        assert len(ei.value.message) < 2200 and "\x1b" not in ei.value.message
        assert ei.value.message.startswith("guest: ")
    finally:
        await agent.close()


async def test_bad_ids_are_refused_before_sending(guest):
    agent = await connect(guest)
    try:
        with pytest.raises(ValueError):
            await agent.kill("../x")
        with pytest.raises(ValueError):
            await agent.kill("c1", signal=0)
    finally:
        await agent.close()


async def test_add_entropy_is_bounded_before_sending(guest):
    from spinbox.api._pb.spinbox.agent.v1 import system_pb2 as sypb
    got: list[bytes] = []

    async def add_entropy(req, ctx):
        got.append(req.data)
        return cpb.Empty()
    guest.unary(Y, "AddEntropy", add_entropy, sypb.AddEntropyRequest)
    agent = await connect(guest)
    try:
        await agent.add_entropy(b"\x01" * 512)
        await agent.add_entropy(bytearray(b"ab"))
        for bad in (b"", b"x" * 513, "text"):
            with pytest.raises(ValueError):
                await agent.add_entropy(bad)  # type: ignore[arg-type]
        assert got == [b"\x01" * 512, b"ab"]      # the refused ones never reached the guest
    finally:
        await agent.close()


async def test_call_after_connection_loss_is_unavailable(guest):
    agent = await connect(guest)
    try:
        await guest.stop()

        async def disconnected() -> None:
            while agent.connected:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(disconnected(), 5)
        with pytest.raises(AgentUnavailable):
            await agent.ping()
    finally:
        await agent.close()


# ----------------------------------------------------------------------------- readiness

async def test_wait_ready_waits_for_the_socket(guest):
    async def later():
        await asyncio.sleep(0.3)
        await guest.start()
    starter = asyncio.ensure_future(later())
    agent = await AgentClient.wait_ready(guest.path, timeout=10)
    await starter
    await agent.ping()
    await agent.close()


async def test_wait_ready_retries_unanswered_pings(guest):
    """The first pings go unanswered (as when the guest has not opened its port yet)."""
    answered = asyncio.Event()
    calls = []

    async def ping(req, ctx):
        calls.append(time.monotonic())
        if len(calls) < 3:
            await asyncio.sleep(30)        # never answers in time
        answered.set()
        return cpb.Empty()
    guest.handlers[0] = (Y, "Ping", ping, cpb.Empty, False, False)
    await guest.start()
    agent = await AgentClient.wait_ready(guest.path, timeout=20)
    assert len(calls) >= 3 and answered.is_set()
    await agent.close()


async def test_wait_ready_times_out_with_the_reason(guest):
    with pytest.raises(TimeoutError, match="did not answer"):
        await AgentClient.wait_ready(guest.path, timeout=0.5)


# ----------------------------------------------------------------------------- output

def output_server(guest: FakeGuest, script):
    """script(open_msg, send, acks) drives one Output session."""
    sessions = []

    async def output(stream, ctx):
        first = await stream.recv()
        sessions.append(first.open)
        acks: asyncio.Queue = asyncio.Queue()

        async def read_acks():
            async for m in stream:
                await acks.put(m.ack)
            await acks.put(None)
        reader = asyncio.ensure_future(read_acks())
        try:
            await script(first.open, stream.send, acks, len(sessions))
        finally:
            reader.cancel()
    guest.bidi(S, "Output", output, spb.OutputClient)
    return sessions


async def test_output_delivers_in_order_and_acks_eof(guest):
    data = os.urandom(300_000)
    got_eof_ack = asyncio.Event()

    async def script(o, send, acks, n):
        off, limit = o.offset, o.offset + o.window
        while off < len(data):
            while off >= limit:
                a = await acks.get()
                limit = a.offset + a.window
            piece = data[off:min(off + 65536, limit, len(data))]
            await send(spb.OutputServer(offset=off, data=piece))
            off += len(piece)
        await send(spb.OutputServer(offset=off, eof=True))
        while True:
            a = await acks.get()
            if a is None:
                return
            if a.eof:
                assert a.offset == len(data)
                got_eof_ack.set()
                return
    output_server(guest, script)
    agent = await connect(guest)
    try:
        out = agent.open_output("c1", "", 1, window=100_000)
        got = b"".join([c async for c in out])
        assert got == data and out.offset == len(data)
        await asyncio.wait_for(got_eof_ack.wait(), 5)
    finally:
        await agent.close()


@pytest.mark.parametrize("bad,match", [
    (spb.OutputServer(offset=5, data=b"x"), "expected 0"),                   # gap
    (spb.OutputServer(offset=0, data=b"x" * 5000), "beyond the window"),     # window 4096
    (spb.OutputServer(offset=0, data=b"x" * (2 << 20)), "limit"),            # oversized chunk
    (spb.OutputServer(offset=0, data=b"x", eof=True), "EOF message carries"),
])
async def test_output_protocol_violations(guest, bad, match):
    async def script(o, send, acks, n):
        await send(bad)
        await asyncio.sleep(5)
    output_server(guest, script)
    agent = await connect(guest)
    try:
        out = agent.open_output("c1", "", 1, window=4096)
        with pytest.raises(AgentProtocolError, match=match):
            async for _ in out:
                pass
    finally:
        await agent.close()


async def test_output_stream_ending_without_eof_is_an_error(guest):
    async def script(o, send, acks, n):
        await send(spb.OutputServer(offset=0, data=b"abc"))
    output_server(guest, script)
    agent = await connect(guest)
    try:
        with pytest.raises(AgentProtocolError, match="without EOF"):
            async for _ in agent.open_output("c1", "", 2):
                pass
    finally:
        await agent.close()


# ----------------------------------------------------------------------------- input

def input_server(guest: FakeGuest, window: int, received: bytearray, *, lie_offset: int | None = None):
    async def inp(stream, ctx):
        await stream.recv()
        await stream.send(spb.InputServer(offset=len(received), window=window))
        if lie_offset is not None:
            await stream.send(spb.InputServer(offset=lie_offset, window=window))
        limit = len(received) + window
        async for m in stream:
            d = m.data
            assert d.offset == len(received)
            assert d.offset + len(d.data) <= limit, "client sent beyond the window"
            received.extend(d.data)
            if d.eof:
                await stream.send(spb.InputServer(offset=len(received), window=window, eof=True))
                return
            if len(d.data):
                # the consumer "writes" the bytes at once: grant the window again
                limit = len(received) + window
                await stream.send(spb.InputServer(offset=len(received), window=window))
    guest.bidi(S, "Input", inp, spb.InputClient)


async def test_input_honours_the_window_and_eof_is_acked(guest):
    received = bytearray()
    input_server(guest, 1000, received)
    agent = await connect(guest)
    try:
        inp = agent.open_input("c1")
        data = os.urandom(50_000)
        for i in range(0, len(data), 7000):
            await inp.write(data[i:i + 7000])
        await asyncio.wait_for(inp.close(), 10)
        assert bytes(received) == data and inp.offset == len(data)
    finally:
        await agent.close()


async def test_input_ack_beyond_what_was_sent_is_rejected(guest):
    received = bytearray()
    input_server(guest, 1000, received, lie_offset=10_000)
    agent = await connect(guest)
    try:
        inp = agent.open_input("c1")
        await inp.write(b"abc")
        with pytest.raises(AgentProtocolError, match="acknowledged"):
            await asyncio.wait_for(inp.close(), 10)
    finally:
        await agent.close()


# ----------------------------------------------------------------------------- events

async def test_events_are_validated_and_repeated_seqs_skipped(guest):
    """A replayed seq is ignored, not a reason to drop the stream: a resubscribe would be
    served the same replay again, and every later event would be stuck behind it."""
    subscriptions = []

    async def subscribe(stream, ctx):
        req = await stream.recv()
        subscriptions.append(req.after_seq)
        for s in (1, 2):
            await stream.send(epb.Event(seq=s, exit=epb.ExitEvent(id="c1", pid=10 + s, exit_status=s)))
        await stream.send(epb.Event(seq=3, oom=epb.OomEvent(id="c2")))
        await stream.send(epb.Event(seq=3, oom=epb.OomEvent(id="c2")))   # repeated: ignored
        await stream.send(epb.Event(seq=1, oom=epb.OomEvent(id="c9")))   # older: ignored
        await stream.send(epb.Event(seq=4, oom=epb.OomEvent(id="c3")))
        await asyncio.sleep(30)
    guest.server_stream(E, "Subscribe", subscribe, epb.SubscribeRequest)
    agent = await connect(guest)
    got = []
    try:
        async for ev in agent.events():
            got.append(ev)
            if ev.seq == 4:
                break
        assert subscriptions == [0]
        assert [(e.seq, e.kind, e.id) for e in got] == [
            (1, "exit", "c1"), (2, "exit", "c1"), (3, "oom", "c2"), (4, "oom", "c3")]
        assert got[1].exit_status == 2 and got[1].pid == 12
    finally:
        await agent.close()


async def test_an_event_with_a_bad_pid_is_refused_as_a_gap_and_the_stream_goes_on(guest):
    """Failing the stream on it would wedge it (found by the hostile-guest test: an exit with
    pid 2^32-1 was served again after every resubscribe, and no later exit got through)."""
    async def subscribe(stream, ctx):
        await stream.recv()
        await stream.send(epb.Event(seq=1, exit=epb.ExitEvent(id="c1", pid=0, exit_status=0)))
        await stream.send(epb.Event(seq=2, exit=epb.ExitEvent(id="c1", pid=(1 << 32) - 1, exit_status=0)))
        await stream.send(epb.Event(seq=3, exit=epb.ExitEvent(id="c1", pid=7, exit_status=1)))
        await asyncio.sleep(30)
    guest.server_stream(E, "Subscribe", subscribe, epb.SubscribeRequest)
    agent = await connect(guest)
    got = []
    try:
        async for ev in agent.events():
            got.append(ev)
            if ev.seq == 3:
                break
        assert [(e.seq, e.kind, e.gap, e.id) for e in got] == [
            (1, "refused", True, ""), (2, "refused", True, ""), (3, "exit", False, "c1")]
        assert got[2].pid == 7
    finally:
        await agent.close()


async def test_events_end_when_the_client_closes(guest):
    async def subscribe(stream, ctx):
        await stream.recv()
        await asyncio.sleep(30)
    guest.server_stream(E, "Subscribe", subscribe, epb.SubscribeRequest)
    agent = await connect(guest)

    async def follow():
        return [e async for e in agent.events()]
    task = asyncio.ensure_future(follow())
    await asyncio.sleep(0.2)
    await agent.close()
    assert await asyncio.wait_for(task, 5) == []


# ----------------------------------------------------------------------------- error tree, id rule

def test_agent_errors_are_guest_branches_of_the_shim_tree():
    from spinbox.shim import errors
    from ttrpc.status import Code
    assert issubclass(AgentUnavailable, errors.GuestUnavailable)
    assert issubclass(AgentProtocolError, errors.GuestProtocolError)
    assert errors.to_status(AgentUnavailable("gone")).code == Code.UNAVAILABLE
    assert errors.to_status(AgentProtocolError("bad")).code == Code.INTERNAL


@pytest.mark.parametrize("bad", ["c1\n", "a..b", "-c", "", "x" * 77])
def test_request_ids_follow_the_contract(bad):
    from spinbox.shim.agent.validate import check_guest_id, check_request_id
    with pytest.raises(ValueError):
        check_request_id(bad, "container id")
    with pytest.raises(AgentProtocolError, match="invalid id"):
        check_guest_id(bad, "reply")
