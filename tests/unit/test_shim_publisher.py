"""Event publisher against a real TTRPC Events server (our ttrpc library on a unix socket):
order, retries, reconnect after a dropped connection, drop after max attempts, flush on close."""
from __future__ import annotations

import asyncio

import pytest
from google.protobuf import empty_pb2

import ttrpc
from spinbox.api import types
from spinbox.api._pb.containerd.events import task_pb2 as ev
from spinbox.api._pb.containerd.services.ttrpc.events.v1 import events_pb2
from spinbox.shim.publisher import Publisher


class Events:
    def __init__(self, fail_first: int = 0, always_fail: bool = False):
        self.received: list[tuple[str, str, str]] = []
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.calls = 0

    async def Forward(self, request, ctx):
        self.calls += 1
        if self.always_fail or self.calls <= self.fail_first:
            raise ttrpc.Unavailable("not now")
        env = request.envelope
        msg = types.unpack_event(env)
        self.received.append((env.namespace, env.topic, msg.container_id))
        return empty_pb2.Empty()


async def _serve(path: str, servicer: Events) -> ttrpc.Server:
    server = ttrpc.Server()
    server.register(events_pb2.DESCRIPTOR.services_by_name["Events"], servicer)
    await server.serve_unix(path)
    return server


@pytest.fixture
def sock(tmp_path):
    return str(tmp_path / "c.sock.ttrpc")


async def test_events_arrive_in_order_with_bare_type_urls(sock):
    events = Events()
    server = await _serve(sock, events)
    pub = Publisher("unix://" + sock)
    try:
        for i in range(50):
            await pub.publish("ns1", "/tasks/start", ev.TaskStart(container_id=f"c{i}", pid=i))
        assert await pub.flush(10)
        assert events.received == [("ns1", "/tasks/start", f"c{i}") for i in range(50)]
        assert pub.forwarded == 50 and pub.dropped == 0
    finally:
        await pub.close()
        await server.close()


async def test_retry_after_errors_keeps_order(sock):
    events = Events(fail_first=2)
    server = await _serve(sock, events)
    pub = Publisher(sock, retry_step_s=0.01)
    try:
        await pub.publish("ns1", "/tasks/create", ev.TaskCreate(container_id="a"))
        await pub.publish("ns1", "/tasks/start", ev.TaskStart(container_id="a"))
        assert await pub.flush(10)
        assert [t for _, t, _ in events.received] == ["/tasks/create", "/tasks/start"]
        assert events.calls == 4
    finally:
        await pub.close()
        await server.close()


async def test_reconnects_after_containerd_restart(sock):
    events1 = Events()
    server = await _serve(sock, events1)
    pub = Publisher(sock, retry_step_s=0.01)
    try:
        await pub.publish("ns1", "/tasks/start", ev.TaskStart(container_id="before"))
        assert await pub.flush(10)
        await server.close()                      # containerd goes away (connection closed)
        events2 = Events()
        server = await _serve(sock, events2)      # ... and comes back on the same socket
        await pub.publish("ns1", "/tasks/exit", ev.TaskExit(container_id="after"))
        assert await pub.flush(10)
        assert events2.received == [("ns1", "/tasks/exit", "after")]
    finally:
        await pub.close()
        await server.close()


async def test_dropped_after_max_attempts_then_next_event_goes(sock, caplog):
    events = Events(always_fail=True)
    server = await _serve(sock, events)
    pub = Publisher(sock, retry_step_s=0.01, max_attempts=3)
    try:
        await pub.publish("ns1", "/tasks/oom", ev.TaskOOM(container_id="x"))
        assert await pub.flush(10)
        assert events.calls == 3 and pub.dropped == 1
        assert "dropped after 3 attempts" in caplog.text
        events.always_fail = False
        await pub.publish("ns1", "/tasks/oom", ev.TaskOOM(container_id="y"))
        assert await pub.flush(10)
        assert events.received == [("ns1", "/tasks/oom", "y")]
    finally:
        await pub.close()
        await server.close()


async def test_close_is_bounded_when_nobody_listens(sock, caplog):
    pub = Publisher(sock, retry_step_s=10)     # no server at all
    await pub.publish("ns1", "/tasks/start", ev.TaskStart(container_id="lost"))
    await pub.close(timeout=0.3)
    assert pub.dropped >= 1 and "not delivered" in caplog.text
    with pytest.raises(RuntimeError, match="closed"):
        await pub.publish("ns1", "/tasks/start", ev.TaskStart(container_id="late"))


async def test_publish_nowait_reports_a_full_queue(sock):
    pub = Publisher(sock, queue_size=1, retry_step_s=10)
    assert pub.publish_nowait("ns1", "/tasks/start", ev.TaskStart(container_id="1"))
    await asyncio.sleep(0)                     # the worker takes it (and waits to retry)
    assert pub.publish_nowait("ns1", "/tasks/start", ev.TaskStart(container_id="2"))
    assert not pub.publish_nowait("ns1", "/tasks/start", ev.TaskStart(container_id="3"))
    assert pub.dropped == 1
    await pub.close(timeout=0.1)


def test_address_forms(monkeypatch):
    monkeypatch.setenv("TTRPC_ADDRESS", "unix:///run/containerd/containerd.sock.ttrpc")
    assert Publisher().address == "/run/containerd/containerd.sock.ttrpc"
    assert Publisher("/x.sock").address == "/x.sock"
    assert Publisher("").enabled is False
    assert Publisher("", publish_binary="/usr/bin/containerd", grpc_address="/c.sock").enabled
