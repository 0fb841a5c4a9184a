"""Sends and closes towards a guest that stops reading are bounded (issue 11, floods): past the
send timeout the connection is dropped, so every call and stream on it fails ConnectionClosed
and the client's connection-lost path runs, instead of hanging until the daemon's last bound."""
from __future__ import annotations

import asyncio
import socket

import pytest

import ttrpc
from ttrpc.testing import SERVICE, Msg

SEND_TIMEOUT = 0.3
TEST_BOUND = 5.0  # the old code never returns: this turns the hang into a failure


async def _client_to_deaf_peer(**kwargs) -> tuple[ttrpc.Client, socket.socket]:
    """A client whose peer accepts the connection and then never reads a byte."""
    ours, peer = socket.socketpair()
    for s in (ours, peer):  # small buffers so a few sends fill them
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client = await ttrpc.Client.from_socket(ours, send_timeout=SEND_TIMEOUT, **kwargs)
    return client, peer


async def _fill(stream) -> None:
    big = Msg(text="x" * (256 * 1024))
    while True:
        await stream.send(big)


async def test_stream_send_to_a_peer_that_stops_reading_is_bounded():
    client, peer = await _client_to_deaf_peer()
    try:
        async with asyncio.timeout(TEST_BOUND):
            stream = await client.stub(SERVICE).Bidi(Msg(text="first"))
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(ttrpc.ConnectionClosed, match="stopped reading"):
                await _fill(stream)
            assert loop.time() - start < SEND_TIMEOUT + 2
            # The connection was dropped: the read loop ended, the client is closed.
            await client.wait_closed()
            assert client.closed
            # The stream and the send side's close fail at once rather than wait again.
            with pytest.raises(ttrpc.ConnectionClosed):
                await stream.recv()
            await stream.aclose()
    finally:
        peer.close()
        await client.close()


async def test_other_senders_waiting_behind_a_stuck_send_are_bounded_too():
    """Every frame send waits for the write lock held by the stuck one: unary calls (Delete,
    Shutdown), new streams and close_send queued behind it fail within the bound as well."""
    client, peer = await _client_to_deaf_peer()
    try:
        async with asyncio.timeout(TEST_BOUND):
            stream = await client.stub(SERVICE).Bidi(Msg(text="first"))
            filler = asyncio.create_task(_fill(stream))
            await asyncio.sleep(0.05)  # the filler now holds the write lock in drain()
            assert not filler.done()
            results = await asyncio.gather(
                filler,
                client.stub(SERVICE).Unary(Msg(text="delete")),
                client.stub(SERVICE).Bidi(Msg(text="other")),
                stream.close_send(),
                return_exceptions=True)
            assert all(isinstance(r, ttrpc.ConnectionClosed) for r in results), results
            assert client.closed
    finally:
        peer.close()
        await client.close()


async def test_send_timeout_none_keeps_the_unbounded_behaviour():
    """The bound is what ends the wait: without it the same send is still waiting."""
    client, peer = await _client_to_deaf_peer()
    client._channel.send_timeout = None
    try:
        stream = await client.stub(SERVICE).Bidi(Msg(text="first"))
        filler = asyncio.create_task(_fill(stream))
        await asyncio.sleep(SEND_TIMEOUT * 3)
        assert not filler.done()
        assert not client.closed
        filler.cancel()
        await asyncio.gather(filler, return_exceptions=True)
    finally:
        peer.close()
        await client.close()


# --- the shim side: a dropped agent connection is a lost sandbox ---------------------------

async def test_the_agent_channel_reports_a_dropped_connection():
    """transport.Channel.wait_lost returns once the connection's client is closed by the send
    bound (and not before)."""
    from spinbox.shim.agent.transport import Channel as AgentChannel

    client, peer = await _client_to_deaf_peer()
    chan = AgentChannel("/nonexistent")
    chan._install(client)
    try:
        waiter = asyncio.ensure_future(chan.wait_lost())
        await asyncio.sleep(0.05)
        assert not waiter.done()           # a live connection is not lost
        stream = await client.stub(SERVICE).Bidi(Msg(text="first"))
        with pytest.raises(ttrpc.ConnectionClosed):
            await _fill(stream)
        async with asyncio.timeout(TEST_BOUND):
            await waiter
    finally:
        peer.close()
        await chan.close()


class _NeverDies:
    alive = True

    async def wait_died(self) -> None:
        await asyncio.Event().wait()


class _DroppingAgent:
    def __init__(self) -> None:
        self.dropped = asyncio.Event()

    async def wait_connection_lost(self) -> None:
        await self.dropped.wait()


async def test_a_vm_sandbox_is_lost_when_its_agent_connection_drops():
    """QEMU still runs, but nothing reconnects the agent: the sandbox must become lost (so the
    live processes' exits are reported and Delete does not wait on the guest)."""
    from types import SimpleNamespace

    from spinbox.shim.sandbox import VMSandbox
    from spinbox.shim.states import SandboxState

    async def no_boot():
        raise AssertionError("not booted in this test")

    sb = VMSandbox("sb1", no_boot)
    sb.machine.apply("start")
    sb.machine.apply("ready")
    agent = _DroppingAgent()
    watch = asyncio.ensure_future(sb._watch_vm(SimpleNamespace(vm=_NeverDies(), agent=agent)))
    await asyncio.sleep(0.05)
    assert not sb.lost.is_set()
    agent.dropped.set()
    async with asyncio.timeout(TEST_BOUND):
        await watch
    assert sb.lost.is_set()
    assert sb.state is SandboxState.LOST
