"""Credit/ack stream logic of vminitd's stdio (real pipes, no transport)."""
from __future__ import annotations

import asyncio
import os

import pytest

from spinbox.vminitd.errors import AgentError, InvalidArgument
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb
from spinbox.vminitd.stdio import (InputSink, OutputBuffer, pump_output, serve_input,
                                   serve_output)


class Host:
    """A scripted host side of one output session."""

    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()
        self.chunks = []

    async def acks(self):
        while True:
            a = await self.q.get()
            if a is None:
                return
            yield a

    async def send(self, ch):
        self.chunks.append(ch)


async def _until(cond, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_output_respects_window_and_needs_eof_ack():
    buf = OutputBuffer(capacity=100)
    buf.append(b"x" * 50)
    buf.finish()
    h = Host()
    task = asyncio.ensure_future(serve_output(buf, 0, 20, h.acks(), h.send))
    await _until(lambda: sum(len(c.data) for c in h.chunks) == 20)
    await asyncio.sleep(0.05)
    assert sum(len(c.data) for c in h.chunks) == 20          # no more than the window
    h.q.put_nowait(spb.OutputAck(offset=20, window=100))
    await _until(lambda: h.chunks and h.chunks[-1].eof)
    assert b"".join(c.data for c in h.chunks) == b"x" * 50
    assert h.chunks[-1].offset == 50
    assert not buf.delivered.is_set()                        # EOF sent is not EOF delivered
    h.q.put_nowait(spb.OutputAck(offset=50, window=100, eof=True))
    assert await asyncio.wait_for(task, 5) is True
    assert buf.delivered.is_set() and buf.acked == 50


async def test_output_reconnect_resends_unacked_bytes():
    buf = OutputBuffer(capacity=100)
    buf.append(b"abcdef")
    h1 = Host()
    t1 = asyncio.ensure_future(serve_output(buf, 0, 100, h1.acks(), h1.send))
    await _until(lambda: h1.chunks)
    h1.q.put_nowait(spb.OutputAck(offset=2, window=100))                        # host wrote "ab", then the link dropped
    await _until(lambda: buf.acked == 2)
    h2 = Host()                                               # a new session replaces the first
    t2 = asyncio.ensure_future(serve_output(buf, 2, 100, h2.acks(), h2.send))
    assert await asyncio.wait_for(t1, 5) is False
    await _until(lambda: h2.chunks)
    assert h2.chunks[0].offset == 2 and h2.chunks[0].data == b"cdef"
    buf.append(b"gh")
    buf.finish()
    await _until(lambda: h2.chunks[-1].eof)
    h2.q.put_nowait(spb.OutputAck(offset=8, window=100, eof=True))
    assert await asyncio.wait_for(t2, 5) is True
    # Resuming before what was acknowledged cannot be served.
    with pytest.raises(AgentError):
        await serve_output(buf, 1, 100, Host().acks(), Host().send)


async def test_output_rejects_acks_beyond_sent():
    buf = OutputBuffer()
    buf.append(b"abc")
    h = Host()
    t = asyncio.ensure_future(serve_output(buf, 0, 100, h.acks(), h.send))
    await _until(lambda: h.chunks)
    h.q.put_nowait(spb.OutputAck(offset=10, window=100))
    with pytest.raises(AgentError):
        await asyncio.wait_for(t, 5)


async def test_output_host_closing_is_not_eof():
    buf = OutputBuffer()
    buf.append(b"abc")
    buf.finish()
    h = Host()
    t = asyncio.ensure_future(serve_output(buf, 0, 100, h.acks(), h.send))
    await _until(lambda: h.chunks and h.chunks[-1].eof)
    h.q.put_nowait(None)                                      # stream closed without the EOF ack
    assert await asyncio.wait_for(t, 5) is False
    assert not buf.delivered.is_set()
    assert not await buf.wait_delivered(0.05)                 # bounded wait gives up


async def test_pump_applies_backpressure_and_sees_eof():
    r, w = os.pipe()
    buf = OutputBuffer(capacity=10)
    t = asyncio.ensure_future(pump_output(r, buf))
    os.write(w, b"0123456789abcdef")
    await _until(lambda: buf.produced == 10)
    await asyncio.sleep(0.05)
    assert buf.produced == 10                                  # full: stopped reading
    buf.ack(10)
    await _until(lambda: buf.produced == 16)
    os.close(w)
    await asyncio.wait_for(t, 5)
    assert buf.eof and buf.read(10, 100) == b"abcdef"


async def test_input_window_offsets_and_eof():
    r, w = os.pipe()
    sink = InputSink(w, window=16)
    q: asyncio.Queue = asyncio.Queue()
    acks = []

    async def data():
        while True:
            m = await q.get()
            if m is None:
                return
            yield m

    async def send(a):
        acks.append(a)

    t = asyncio.ensure_future(serve_input(sink, data(), send))
    await _until(lambda: acks)
    assert (acks[0].offset, acks[0].window) == (0, 16)
    q.put_nowait(spb.InputData(offset=0, data=b"hello"))
    q.put_nowait(spb.InputData(offset=3, data=b"lo wor"))                     # overlap: "lo" already received
    q.put_nowait(spb.InputData(offset=9, data=b"ld", eof=True))
    await asyncio.wait_for(t, 5)
    assert acks[-1].eof and acks[-1].offset == 11
    got = b""
    while chunk := os.read(r, 100):
        got += chunk
    assert got == b"hello world"                              # and the pipe reached EOF
    os.close(r)
    with pytest.raises(InvalidArgument):
        sink.accept(spb.InputData(offset=11, data=b"more"))


async def test_input_rejects_gaps_and_window_overrun():
    r, w = os.pipe()
    sink = InputSink(w, window=4)
    with pytest.raises(AgentError):
        sink.accept(spb.InputData(offset=2, data=b"x"))
    with pytest.raises(InvalidArgument):
        sink.accept(spb.InputData(offset=0, data=b"too long"))
    sink.close()
    await _until(lambda: sink.closed)
    assert os.read(r, 10) == b""
    os.close(r)
