"""A framed byte stream: frame writes under one lock, decoded reads (Go ttrpc `channel.go`).

Works on any asyncio (StreamReader, StreamWriter) pair; `open_fd_streams` makes such a pair from
one bidirectional fd (a virtio-serial port, a pty, a socket).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable

from .fdwriter import FdWriteTransport
from .frame import HEADER, MAX_DATA, Frame, FrameDecoder, OversizedMessage, Oversized, Payload
from .status import ConnectionClosed

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
# How long one frame send may wait for the write lock plus the peer to drain our buffer. A peer
# that stops reading (a hung or hostile guest) would otherwise stall every sender on the
# connection forever, Delete and close included. 30 s is far above any drain of a live peer (a
# 4 MiB frame at TCG's ~10 MB/s) and below containerd's own shim-call timeouts.
DEFAULT_SEND_TIMEOUT_S = 30.0


def _length(data: Payload) -> int:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data)
    return sum(len(piece) for piece in data)


class ProtocolError(Exception):
    """The byte stream cannot be framed any more (e.g. it ended inside a frame)."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_data: int = MAX_DATA,
                 send_timeout: float | None = DEFAULT_SEND_TIMEOUT_S) -> None:
        self.reader = reader
        self.send_timeout = send_timeout
        self.writer = writer
        self.max_data = max_data
        self.decoder = FrameDecoder(max_data)
        self.lock = asyncio.Lock()  # one frame at a time on the wire
        self.closed = False

    async def send(self, stream_id: int, type: int, flags: int = 0, data: Payload = b"") -> None:
        """`data` is one buffer, or pieces written one after another (never joined here)."""
        self._check(data)
        async with self._bounded():
            async with self.lock:
                self._write(stream_id, type, flags, data)
                await self._drain()

    async def send_new(self, type: int, flags: int, data: bytes, allocate: Callable[[], int]) -> int:
        """Send a frame on a stream id chosen by `allocate()` while holding the write lock, so that
        ids reach the wire in the order they were allocated (they must strictly increase)."""
        self._check(data)
        async with self._bounded():
            async with self.lock:
                if self.closed:
                    raise ConnectionClosed("ttrpc: connection closed")
                stream_id = allocate()
                self._write(stream_id, type, flags, data)
                await self._drain()
        return stream_id

    @contextlib.asynccontextmanager
    async def _bounded(self) -> AsyncIterator[None]:
        """Bound a wait on the peer; on timeout the connection is dropped (aborted, so the read
        loop ends too and the owner's connection-lost path runs) and ConnectionClosed raised."""
        if self.send_timeout is None:
            yield
            return
        try:
            async with asyncio.timeout(self.send_timeout):
                yield
        except TimeoutError:
            self.abort()
            raise ConnectionClosed(
                f"ttrpc: send timed out after {self.send_timeout:g}s (the peer stopped "
                f"reading); connection dropped") from None

    def abort(self) -> None:
        """Drop the connection now, discarding unsent bytes (close() alone would wait for the
        peer to drain them first); close() then ends the read side too."""
        try:
            self.writer.transport.abort()
        except Exception as exc:  # already broken transport
            log.debug("ttrpc: abort: %s", exc)
        self.close()

    def _check(self, data: Payload) -> None:
        n = _length(data)
        if n > self.max_data:
            raise OversizedMessage(
                f"message length {n} exceed maximum message size of {self.max_data}")
        if self.closed:
            raise ConnectionClosed("ttrpc: connection closed")

    def _write(self, stream_id: int, type: int, flags: int, data: Payload) -> None:
        # All writes happen without an await in between: a frame is never interleaved.
        try:
            self.writer.write(HEADER.pack(_length(data), stream_id, type, flags))
            if isinstance(data, (bytes, bytearray, memoryview)):
                if data:
                    self.writer.write(data)
            else:
                for piece in data:
                    if piece:
                        self.writer.write(piece)
        except (OSError, RuntimeError) as exc:
            self.closed = True
            raise ConnectionClosed(f"ttrpc: write failed: {exc}") from exc

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (OSError, RuntimeError, AssertionError) as exc:
            self.closed = True
            raise ConnectionClosed(f"ttrpc: write failed: {exc}") from exc

    async def events(self) -> AsyncIterator[list[Frame | Oversized]]:
        """Decoded events per read; ends at EOF. Raises ProtocolError if EOF cuts a frame."""
        while True:
            try:
                data = await self.reader.read(READ_SIZE)
            except (OSError, asyncio.IncompleteReadError) as exc:
                # EIO on a pty whose other side closed, ECONNRESET, ...: the stream is over.
                log.debug("ttrpc: read ended: %s", exc)
                data = b""
            if not data:
                if not self.decoder.at_boundary:
                    raise ProtocolError("ttrpc: connection closed inside a frame")
                return
            events = self.decoder.feed(data)
            if events:
                yield events

    def close(self) -> None:
        if self.closed and self.writer.transport.is_closing():
            return
        self.closed = True
        try:
            self.writer.close()
        except Exception as exc:  # already broken transport
            log.debug("ttrpc: close: %s", exc)

    async def wait_closed(self) -> None:
        try:
            await self.writer.wait_closed()
        except Exception as exc:  # the peer reset it; it is closed either way
            log.debug("ttrpc: wait_closed: %s", exc)


class _FdWriteProtocol(asyncio.streams.FlowControlMixin):
    """Write side of a pipe-style transport with what StreamWriter.wait_closed needs."""

    def __init__(self) -> None:
        super().__init__()
        self._closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


async def open_fd_streams(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A reader/writer pair over one bidirectional fd. Works on dups of `fd` (the caller still
    owns `fd`); note the dups share the open file, so `fd` becomes non-blocking too."""
    loop = asyncio.get_running_loop()
    rfd, wfd = os.dup(fd), os.dup(fd)
    try:
        reader = asyncio.StreamReader(limit=READ_SIZE * 4)
        rpipe = os.fdopen(rfd, "rb", buffering=0)
        rfd = -1
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rpipe)
        # Our own write transport: asyncio's pipe transport memmoves its buffer on every
        # short write (see fdwriter.py).
        protocol = _FdWriteProtocol()
        transport = FdWriteTransport(loop, wfd, protocol)
        wfd = -1
    except BaseException:
        for leftover in (rfd, wfd):
            if leftover >= 0:
                os.close(leftover)
        raise
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    # Closing the writer must also stop the read side (it is a separate transport here).
    original_close = writer.close

    def close_both() -> None:
        original_close()
        rtransport = reader._transport  # type: ignore[attr-defined]
        if rtransport is not None and not rtransport.is_closing():
            rtransport.close()

    writer.close = close_both  # type: ignore[method-assign]
    return reader, writer
