"""Streaming RPCs (ttrpc 1.2 flag rules), bounded per-stream buffers, and credit flow control."""
from __future__ import annotations

import asyncio

import pytest

import ttrpc
from ttrpc.frame import Flags, MessageType
from ttrpc_helpers import SERVICE, SERVICE_NAME, Msg, RawConnection, Servicer, running_server


async def test_server_streaming():
    async with running_server() as (_, path):
        async with await ttrpc.connect_unix(path) as client:
            stream = await client.stub(SERVICE).Server(Msg(count=5))
            assert [m.text async for m in stream] == ["0", "1", "2", "3", "4"]
            assert await stream.recv() is None
            empty = await client.open_stream(SERVICE_NAME, "Server", Msg, Msg(count=0),
                                             server_streaming=True)
            assert await empty.recv() is None


async def test_server_streaming_error_after_messages():
    async with running_server() as (_, path):
        async with await ttrpc.connect_unix(path) as client:
            stream = await client.stub(SERVICE).Server(Msg(count=2, code=ttrpc.Code.ABORTED))
            assert (await stream.recv()).text == "0"
            assert (await stream.recv()).text == "1"
            with pytest.raises(ttrpc.Aborted, match="stream failed on purpose"):
                await stream.recv()


async def test_client_streaming_result_and_empty_messages():
    async with running_server() as (_, path):
        async with await ttrpc.connect_unix(path) as client:
            stream = await client.stub(SERVICE).Client()
            for text in ["a", "", "c"]:  # the empty Msg serialises to zero bytes: still a message
                await stream.send(Msg(text=text))
            result = await stream.close_and_recv()
            assert (result.count, result.text) == (3, "a,,c")
            with pytest.raises(ttrpc.FailedPrecondition):
                await stream.send(Msg())
            # no messages at all: the result is still delivered (an empty-ish Msg)
            stream = await client.stub(SERVICE).Client()
            assert (await stream.close_and_recv()).count == 0


async def test_bidi_with_initial_message():
    async with running_server() as (_, path):
        async with await ttrpc.connect_unix(path) as client:
            stream = await client.stub(SERVICE).Bidi(Msg(text="first"))
            assert (await stream.recv()).text == "FIRST"
            await stream.send(Msg(text="second"))
            assert (await stream.recv()).text == "SECOND"
            await stream.close_send()
            assert await stream.recv() is None


async def test_wire_flags_of_streams():
    """Raw frames: RO request without payload delivers no initial message; zero-length Data
    without ND is an empty message; CloseSend is Data RC|ND; bidi ends with Data RC|ND."""
    async with running_server() as (_, path):
        raw = await RawConnection.open(path)
        try:
            await raw.request(1, "Bidi", payload=b"", flags=Flags.REMOTE_OPEN)
            await raw.send(1, MessageType.DATA, 0, b"")  # an empty Msg
            frame = await raw.recv()
            assert (frame.stream_id, frame.type, frame.flags, frame.data) == (1, MessageType.DATA, 0, b"")
            await raw.send(1, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA)
            frame = await raw.recv()
            assert (frame.type, frame.flags) == (MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA)

            await raw.request(3, "Server", Msg(count=1), flags=Flags.REMOTE_CLOSED)
            assert (await raw.recv()).data == Msg(text="0").SerializeToString()
            assert (await raw.recv()).flags == Flags.REMOTE_CLOSED | Flags.NO_DATA

            await raw.request(5, "Client", payload=b"", flags=Flags.REMOTE_OPEN)
            await raw.send(5, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA)
            sid, resp = await raw.response()
            assert sid == 5 and resp.status.code == 0 and Msg.FromString(resp.payload).count == 0
        finally:
            await raw.close()


async def test_close_data_with_bytes_is_rejected():
    async with running_server() as (_, path):
        raw = await RawConnection.open(path)
        try:
            await raw.request(1, "Client", payload=b"", flags=Flags.REMOTE_OPEN)
            await raw.send(1, MessageType.DATA, Flags.REMOTE_CLOSED, Msg(text="x").SerializeToString())
            sid, resp = await raw.response()
            assert (sid, resp.status.code) == (1, ttrpc.Code.INVALID_ARGUMENT)
            assert resp.status.message == "data close message cannot include data"
            await raw.request(3, msg=Msg(text="ok"))
            assert (await raw.response())[1].status.code == 0
        finally:
            await raw.close()


async def test_server_side_overflow_fails_only_that_stream():
    async with running_server(stream_buffer_messages=8) as (_, path):
        async with await ttrpc.connect_unix(path) as client:
            stalled = await client.stub(SERVICE).Bidi(Msg(text="stall"))
            healthy = await client.stub(SERVICE).Bidi()
            for i in range(50):  # far more than 8 messages the stalled handler never reads
                await stalled.send(Msg(text=str(i)))
            with pytest.raises(ttrpc.ResourceExhausted, match="receive buffer full"):
                await stalled.recv()
            await healthy.send(Msg(text="alive"))
            assert (await healthy.recv()).text == "ALIVE"
            assert (await client.stub(SERVICE).Unary(Msg(text="u"))).text == "u"
            await healthy.close_send()
            assert await healthy.recv() is None


async def test_client_side_overflow_fails_only_that_stream():
    async with running_server() as (_, path):
        client = await ttrpc.Client.connect(path, stream_buffer_messages=16)
        async with client:
            flood = await client.stub(SERVICE).Server(Msg(count=200))  # never read while it floods
            other = await client.stub(SERVICE).Server(Msg(count=10))
            assert len([m async for m in other]) == 10
            # 200 messages into a 16-message buffer nobody reads: the stream fails by itself
            async with asyncio.timeout(10):
                while not flood._buffer.ended:
                    await asyncio.sleep(0.001)
            with pytest.raises(ttrpc.ResourceExhausted, match="receive buffer full"):
                await flood.recv()
            assert (await client.stub(SERVICE).Unary(Msg(text="u"))).text == "u"


async def test_stream_timeout_bounds_recv():
    servicer = Servicer()
    async with running_server(servicer) as (_, path):
        async with await ttrpc.connect_unix(path) as client:
            stream = await client.stub(SERVICE).Bidi(Msg(text="stall"), timeout=0.2)
            with pytest.raises(ttrpc.DeadlineExceeded):
                await stream.recv()


# -- flow control ----------------------------------------------------------------------------

async def test_send_window_waits_for_credits():
    win = ttrpc.SendWindow(initial=10)
    assert await win.acquire(6) == 6
    assert win.available == 4
    waiter = asyncio.create_task(win.acquire(8))
    await asyncio.sleep(0)
    assert not waiter.done()
    win.grant(3)
    await asyncio.sleep(0)
    assert not waiter.done()  # 7 < 8
    win.update(acked_offset=6, window=10)  # absolute: may send up to 16
    assert await waiter == 8 and win.offset == 14
    assert await win.acquire(100, partial=True) == 2
    blocked = asyncio.create_task(win.acquire(1))
    await asyncio.sleep(0)
    win.close(ttrpc.Cancelled("stream over"))
    with pytest.raises(ttrpc.Cancelled):
        await blocked


async def test_receive_window_accounting():
    rw = ttrpc.ReceiveWindow(window=100)
    rw.received(60)
    assert rw.consumed(40) == 0  # below the threshold (50): batched
    assert rw.consumed(20) == 60
    assert rw.granted_limit == 160
    rw.received(100)
    with pytest.raises(ttrpc.FlowControlError):
        rw.received(1)  # 161 > 160: the peer overran its window
    with pytest.raises(ValueError):
        rw.consumed(1000)
    assert rw.ack() == (60, 100) and rw.granted_limit == 160


def test_sans_io_credit_resumes_at_an_offset():
    credit = ttrpc.SendCredit(10, start=100)       # a stream resumed at offset 100
    credit.spend(4)
    assert (credit.offset, credit.available) == (104, 6)
    with pytest.raises(ValueError):
        credit.spend(7)                           # beyond the grant: the caller's bug
    credit.update(acked_offset=104, window=10)
    credit.update(acked_offset=100, window=1)     # stale: never takes credits back
    assert credit.limit == 114
    rw = ttrpc.ReceiveWindow(window=10, start=100)
    rw.received(10)
    with pytest.raises(ttrpc.FlowControlError):
        rw.received(1)
    rw.consumed(10)
    assert rw.ack() == (110, 10) and rw.granted_limit == 120


class FlowServicer:
    """Download over a bidi method: data goes out only against credits from the client."""

    def __init__(self) -> None:
        self.windows: dict[str, ttrpc.SendWindow] = {}
        self.sent: dict[str, int] = {}

    async def Download(self, stream, ctx):
        first = await stream.recv()
        window = self.windows[first.text] = ttrpc.SendWindow(first.credit)
        self.sent[first.text] = 0

        async def grants():
            async for m in stream:
                window.grant(m.credit)
        reader = asyncio.create_task(grants())
        try:
            remaining = first.total
            while remaining:
                n = await window.acquire(min(first.size, remaining), partial=True)
                await stream.send(Msg(data=b"d" * n))
                self.sent[first.text] += n
                remaining -= n
        finally:
            reader.cancel()


async def test_credit_flow_stalls_only_the_stream_whose_reader_stops():
    WINDOW, CHUNK, TOTAL = 256 * 1024, 64 * 1024, 8 * 1024 * 1024
    servicer = FlowServicer()
    async with running_server(servicer) as (_, path):
        async with await ttrpc.connect_unix(path) as client:
            stub = client.stub(ttrpc.testing.SERVICE)
            stalled = await stub.Download(Msg(text="stalled", credit=WINDOW, size=CHUNK, total=TOTAL))
            # the stalled reader never calls recv(): its sender must stop at the window
            async with asyncio.timeout(10):
                while servicer.sent.get("stalled", 0) < WINDOW:
                    await asyncio.sleep(0.001)

            fast = await stub.Download(Msg(text="fast", credit=WINDOW, size=CHUNK, total=TOTAL))
            rw = ttrpc.ReceiveWindow(WINDOW)
            got = 0
            while got < TOTAL:
                msg = await fast.recv()
                rw.received(len(msg.data))
                got += len(msg.data)
                grant = rw.consumed(len(msg.data))
                if grant:
                    await fast.send(Msg(credit=grant))
            assert got == TOTAL
            assert await fast.recv() is None

            # the stalled stream got exactly its window, is blocked on credits, holds bounded memory
            assert servicer.sent["stalled"] == WINDOW
            assert servicer.windows["stalled"].available == 0
            one = len(Msg(data=b"d" * CHUNK).SerializeToString())
            assert stalled._buffer.size == (WINDOW // CHUNK, WINDOW // CHUNK * one)
            # and it resumes once its reader grants credits
            await stalled.send(Msg(credit=CHUNK))
            drained = 0
            while drained < WINDOW + CHUNK:
                drained += len((await stalled.recv()).data)
            assert drained == WINDOW + CHUNK
            await stalled.aclose()
