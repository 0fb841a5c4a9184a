"""ttrpc.fdwriter: the zero-copy fd write transport (under ttrpc.channel.open_fd_streams)."""
from __future__ import annotations

import asyncio
import os
import socket

import pytest

from ttrpc.channel import open_fd_streams
from ttrpc.fdwriter import FdWriteTransport


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.lost: list[BaseException | None] = []

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)


async def _read_all(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        out += await loop.sock_recv(sock, 1 << 20)
    return bytes(out)


async def test_pieces_arrive_in_order_and_the_callers_buffers_are_not_copied() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # force short writes
    b.setblocking(False)
    loop = asyncio.get_running_loop()
    proto = Recorder()
    t = FdWriteTransport(loop, os.dup(a.fileno()), proto)
    pieces = [os.urandom(n) for n in (10, 300_000, 1, 70_000)]
    for p in pieces:
        t.write(memoryview(p))
    assert t.get_write_buffer_size() > 0 and proto.paused == 1
    # what is queued are views of the caller's objects, not copies
    assert all(v.obj in [p for p in pieces] for v in t._pending)
    got = await _read_all(b, sum(map(len, pieces)))
    assert got == b"".join(pieces)
    await asyncio.sleep(0)
    assert t.get_write_buffer_size() == 0 and proto.resumed == 1
    t.close()
    await asyncio.sleep(0.01)
    assert proto.lost == [None]
    a.close()
    b.close()


async def test_close_flushes_first_and_a_gone_peer_is_reported() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setblocking(False)
    proto = Recorder()
    t = FdWriteTransport(asyncio.get_running_loop(), os.dup(a.fileno()), proto)
    data = os.urandom(200_000)
    t.write(data)
    t.close()
    assert t.is_closing() and not proto.lost
    with pytest.raises(RuntimeError):
        t.write(b"more")
    assert await _read_all(b, len(data)) == data
    await asyncio.sleep(0.01)
    assert proto.lost == [None]

    c, d = socket.socketpair()
    proto2 = Recorder()
    t2 = FdWriteTransport(asyncio.get_running_loop(), os.dup(c.fileno()), proto2)
    d.close()
    c.close()
    t2.write(b"x" * 10)
    assert len(proto2.lost) == 1 and isinstance(proto2.lost[0], OSError)
    a.close()
    b.close()


async def test_open_fd_streams_writes_a_framed_stream_through_it() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    reader, writer = await open_fd_streams(a.fileno())
    assert isinstance(writer.transport, FdWriteTransport)
    writer.write(b"hello ")
    writer.write(memoryview(b"world" * 100_000))
    got, _ = await asyncio.gather(_read_all(b, 6 + 500_000), writer.drain())
    assert got == b"hello " + b"world" * 100_000
    writer.close()
    await writer.wait_closed()
    a.close()
    b.close()
