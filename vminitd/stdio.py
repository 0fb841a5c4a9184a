"""Flow-controlled stdio between container processes and host streams (transport independent).

Output (stdout/stderr/tty): an OutputPump reads the process's pipe into an OutputBuffer that
holds every byte the host has not acknowledged, up to `capacity`; a full buffer stops reading
(back-pressure on the process, never on the connection). A host stream session sends chunks
inside the host's window, finishes with an explicit EOF message and the buffer counts as
delivered only when the host acknowledges that EOF. Offsets are absolute, so a session that a
reconnect cut short is simply replaced by a new one starting at the host's offset.

Input (stdin): an InputSink accepts host data at absolute offsets into a bounded pending buffer
(the host only sends inside the window the guest granted) and writes it into the process.
"""
from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from .errors import AgentError, DATA_LOSS, InvalidArgument
from .fdio import wait_readable, wait_writable

OUTPUT_CAPACITY = 1 << 20      # unacknowledged output kept per stream (bytes)
INPUT_WINDOW = 256 << 10       # stdin bytes the host may have in flight
CHUNK = 256 << 10              # largest data message (fewer, larger messages: TCG-bound guest)


class _Notifier:
    """Wake-all notification: waiters take `.waiter()` before checking state, then await it."""

    def __init__(self) -> None:
        self._ev = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        return self._ev

    def kick(self) -> None:
        self._ev.set()
        self._ev = asyncio.Event()


# --- output -------------------------------------------------------------------------------

class OutputBuffer:
    def __init__(self, capacity: int = OUTPUT_CAPACITY) -> None:
        self.capacity = capacity
        self.acked = 0                      # host has consumed everything before this offset
        self._buf = bytearray()             # bytes [acked, produced)
        self.eof = False                    # the process side reached EOF
        self.delivered = asyncio.Event()    # the host acknowledged our EOF message
        self.changed = _Notifier()
        self.generation = 0                 # bumps when a new host session takes over
        self.last_progress = time.monotonic()

    @property
    def produced(self) -> int:
        return self.acked + len(self._buf)

    @property
    def room(self) -> int:
        return self.capacity - len(self._buf)

    def append(self, data: bytes) -> None:
        self._buf += data
        self.changed.kick()

    def finish(self) -> None:
        self.eof = True
        self.changed.kick()

    def ack(self, offset: int) -> None:
        if offset < self.acked or offset > self.produced:
            raise AgentError(f"output ack at offset {offset} outside [{self.acked}, {self.produced}]",
                             DATA_LOSS if offset < self.acked else None)
        if offset > self.acked:
            del self._buf[: offset - self.acked]
            self.acked = offset
            self.last_progress = time.monotonic()
            self.changed.kick()

    def read(self, offset: int, size: int) -> bytes:
        start = offset - self.acked
        return bytes(self._buf[start:start + size])

    def mark_delivered(self) -> None:
        self.last_progress = time.monotonic()
        self.delivered.set()
        self.changed.kick()

    async def wait_delivered(self, idle_timeout: float) -> bool:
        """Wait until the host acknowledged EOF, or until no progress for idle_timeout seconds."""
        while not self.delivered.is_set():
            remaining = self.last_progress + idle_timeout - time.monotonic()
            if remaining <= 0:
                return False
            waiter = self.changed.waiter()
            try:
                await asyncio.wait_for(waiter.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return True


@dataclass
class OutputChunk:
    offset: int
    data: bytes = b""
    eof: bool = False


@dataclass
class OutputAck:
    offset: int
    window: int
    eof: bool = False


async def pump_output(fd: int, buf: OutputBuffer) -> None:
    """Read fd into buf until EOF (EIO on a pty master whose slave side is gone), then close it."""
    os.set_blocking(fd, False)
    try:
        while True:
            if buf.room <= 0:
                waiter = buf.changed.waiter()
                if buf.room <= 0:
                    await waiter.wait()
                continue
            try:
                data = os.read(fd, min(buf.room, CHUNK))
            except BlockingIOError:
                await wait_readable(fd)
                continue
            except OSError as e:
                if e.errno == errno.EIO:   # pty: every slave fd closed
                    break
                raise
            if not data:
                break
            buf.append(data)
    finally:
        os.close(fd)
        buf.finish()


async def serve_output(buf: OutputBuffer, offset: int, window: int,
                       acks: AsyncIterator[OutputAck],
                       send: Callable[[OutputChunk], Awaitable[None]]) -> bool:
    """One host session on an output buffer. Returns True when the EOF was acknowledged,
    False when the session ended otherwise (host closed, or a newer session took over)."""
    if offset < buf.acked:
        raise AgentError(f"output resume at offset {offset} but bytes before {buf.acked} "
                         "were already acknowledged and discarded", DATA_LOSS)
    if offset > buf.produced:
        raise InvalidArgument(f"output resume at offset {offset} beyond produced {buf.produced}")
    buf.generation += 1
    gen = buf.generation
    buf.ack(offset)
    buf.last_progress = time.monotonic()
    buf.changed.kick()  # a previous session notices it was replaced
    st = {"sent": offset, "limit": offset + window, "eof_sent": False, "closed": False}

    async def read_acks() -> None:
        try:
            async for a in acks:
                if buf.generation != gen:
                    return
                if a.eof:
                    if st["eof_sent"] and a.offset == buf.produced:
                        buf.ack(a.offset)
                        buf.mark_delivered()
                        return
                    raise InvalidArgument(f"EOF ack at {a.offset} before the EOF was sent")
                if a.offset > st["sent"]:
                    raise InvalidArgument(f"ack at {a.offset} beyond the {st['sent']} bytes sent")
                buf.ack(a.offset)
                st["limit"] = a.offset + a.window
                buf.changed.kick()
        finally:
            st["closed"] = True
            buf.changed.kick()

    reader = asyncio.ensure_future(read_acks())
    try:
        while True:
            waiter = buf.changed.waiter()
            if buf.delivered.is_set():
                return True
            if buf.generation != gen:
                return False
            if reader.done():
                reader.result()   # re-raise a protocol error
                return buf.delivered.is_set()
            n = min(buf.produced, st["limit"]) - st["sent"]
            if n > 0:
                data = buf.read(st["sent"], min(n, CHUNK))
                await send(OutputChunk(st["sent"], data))
                st["sent"] += len(data)
                continue
            if buf.eof and st["sent"] == buf.produced and not st["eof_sent"]:
                st["eof_sent"] = True
                await send(OutputChunk(st["sent"], b"", True))
                continue
            await waiter.wait()
    finally:
        if not reader.done():
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass


# --- input --------------------------------------------------------------------------------

@dataclass
class InputData:
    offset: int
    data: bytes = b""
    eof: bool = False


@dataclass
class InputAck:
    offset: int
    window: int
    eof: bool = False


class InputSink:
    def __init__(self, fd: int, *, tty: bool = False, window: int = INPUT_WINDOW,
                 own_fd: bool = True) -> None:
        self.fd = fd
        self.tty = tty
        self.window = window
        self.own_fd = own_fd       # a pty master is shared with the output pump: not ours to close
        self.received = 0
        self._pending = bytearray()
        self.eof_requested = False
        self.closed = False
        self.broken = False        # the process closed its stdin: further data is dropped
        self.changed = _Notifier()
        os.set_blocking(fd, False)
        self._writer = asyncio.ensure_future(self._write_loop())

    @property
    def available(self) -> int:
        return self.window - len(self._pending)

    def accept(self, msg: InputData) -> None:
        if self.eof_requested:
            if msg.data and msg.offset + len(msg.data) > self.received:
                raise InvalidArgument("stdin data after EOF")
        if msg.offset > self.received:
            raise AgentError(f"stdin data at offset {msg.offset} but only {self.received} "
                             "bytes were received (a gap)", DATA_LOSS)
        data = msg.data[self.received - msg.offset:]
        if len(data) > self.available:
            raise InvalidArgument(f"stdin data beyond the granted window ({len(data)} > {self.available})")
        if data:
            if not self.broken:
                self._pending += data
            self.received += len(data)
        if msg.eof:
            self.eof_requested = True
        self.changed.kick()

    def close(self) -> None:
        """CloseStdin: EOF after everything received so far."""
        self.eof_requested = True
        self.changed.kick()

    async def _write_loop(self) -> None:
        try:
            while True:
                waiter = self.changed.waiter()
                if self._pending and not self.broken:
                    try:
                        n = os.write(self.fd, self._pending[:CHUNK])
                    except BlockingIOError:
                        await wait_writable(self.fd)
                        continue
                    except (BrokenPipeError, OSError):
                        self.broken = True
                        self._pending.clear()
                        self.changed.kick()
                        continue
                    del self._pending[:n]
                    self.changed.kick()
                    continue
                if self.eof_requested:
                    break
                await waiter.wait()
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        if self.tty and not self.broken:
            try:
                os.write(self.fd, b"\x04")   # ^D: what a user at the terminal types for EOF
            except OSError:
                pass
        if self.own_fd:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.closed = True
        self.changed.kick()

    def shutdown(self) -> None:
        if not self._writer.done():
            self._writer.cancel()


async def serve_input(sink: InputSink, data: AsyncIterator[InputData],
                      send: Callable[[InputAck], Awaitable[None]]) -> None:
    """One host session on a stdin sink: grant credit, accept data, ack the EOF."""
    done = asyncio.Event()

    async def acker() -> None:
        last_limit = -1
        while True:
            waiter = sink.changed.waiter()
            limit = sink.received + sink.available     # the host may send up to here
            # Ack at session start, on EOF, and when the window opened by a quarter (or fully):
            # data arriving does not move `limit`, so it needs no ack.
            if last_limit < 0 or sink.closed or limit - last_limit >= sink.window // 4 \
                    or (limit > last_limit and sink.available == sink.window):
                await send(InputAck(sink.received, sink.available, sink.closed))
                last_limit = limit
                if sink.closed:
                    return
            if done.is_set():
                return
            await waiter.wait()

    task = asyncio.ensure_future(acker())
    try:
        async for msg in data:
            sink.accept(msg)
            if task.done() or sink.eof_requested:
                break   # after EOF nothing more may come: just ack it
        # Host finished sending: keep acking until the EOF (if requested) went through.
        if sink.eof_requested:
            await task
    finally:
        done.set()
        sink.changed.kick()
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
