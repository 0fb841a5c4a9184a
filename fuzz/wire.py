"""Raw ttrpc frames on one end of a real connection, for harnesses that play a hostile peer
(a client that sends what no client would, a guest that answers what no guest should).

`RawPeer` writes and reads frames with the library's own codec (ttrpc/frame.py) and never
interprets them beyond that; `connected_pair()` is a socketpair as two asyncio stream pairs.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from ttrpc.frame import MAX_DATA, Frame, FrameDecoder, Oversized, encode_frame

READ_SIZE = 64 << 10


@dataclass
class Streams:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


async def connected_pair() -> tuple[Streams, Streams]:
    a, b = socket.socketpair()
    try:
        ra, wa = await asyncio.open_connection(sock=a, limit=1 << 20)
        rb, wb = await asyncio.open_connection(sock=b, limit=1 << 20)
    except BaseException:
        a.close()
        b.close()
        raise
    return Streams(ra, wa), Streams(rb, wb)


class RawPeer:
    """One end of a connection, frame by frame. `max_data` bounds what it accepts from the
    other side (a frame over it is an Oversized event, as in the library)."""

    def __init__(self, streams: Streams, *, max_data: int = MAX_DATA) -> None:
        self.reader = streams.reader
        self.writer = streams.writer
        self._decoder = FrameDecoder(max_data)
        self._ready: list[Frame | Oversized] = []
        self.eof = False

    def send_raw(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def send(self, stream_id: int, type: int, flags: int, data: bytes) -> None:
        self.send_raw(encode_frame(stream_id, type, flags, data, max_data=len(data)))

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            self.eof = True

    def end_writes(self) -> None:
        """Half-close: the other side reads EOF, we still read its answers."""
        if not self.writer.is_closing() and self.writer.can_write_eof():
            try:
                self.writer.write_eof()
            except OSError:
                pass

    async def next_event(self) -> Frame | Oversized | None:
        """The next frame from the other side; None at EOF (or a reset)."""
        while not self._ready:
            if self.eof:
                return None
            try:
                data = await self.reader.read(READ_SIZE)
            except ConnectionError:
                data = b""
            if not data:
                self.eof = True
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)

    async def next_frame(self, timeout: float) -> Frame | None:
        """The next whole frame within `timeout` seconds; None at EOF or timeout."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    ev = await self.next_event()
                    if ev is None or isinstance(ev, Frame):
                        return ev
        except TimeoutError:
            return None

    def close(self) -> None:
        self.writer.close()
