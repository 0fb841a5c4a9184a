"""Process stdio in the guest: asyncio pumps around the sans-IO stdio session.

The protocol (offsets, windows, acknowledged EOF, resuming after a reconnect) lives in
`spinbox.api.stdio_session`; this module only moves bytes and wakes waiters:

* output: `pump_output` reads the process's pipe into an OutputBuffer (a full buffer stops
  reading: back-pressure on the process, never on the connection); `serve_output` runs one host
  session on it. A session a reconnect cut short is replaced by a new one at the host's offset.
* input: an InputSink's writer task puts what the host sent into the process's stdin;
  `serve_input` runs one host session on it (grants, EOF ack).

A protocol violation by the host becomes the AgentError the Stdio service answers with
(DATA_LOSS where continuing would lose bytes, INVALID_ARGUMENT otherwise).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from spinbox.api import stdio_session as session
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb
from spinbox.api.stdio_session import INPUT_WINDOW, OUTPUT_CAPACITY, StdioProtocolError

from .errors import DATA_LOSS, AgentError, InvalidArgument
from .fdio import wait_readable, wait_writable

log = logging.getLogger(__name__)

__all__ = ["INPUT_WINDOW", "OUTPUT_CAPACITY", "InputSink", "OutputBuffer", "pump_output", "serve_input",
           "serve_output"]

CHUNK = session.OUTPUT_CHUNK   # largest read from / write into a process at once


@contextlib.contextmanager
def _host_errors() -> Iterator[None]:
    """A host's protocol violation, as the status the host gets back."""
    try:
        yield
    except StdioProtocolError as e:
        raise (AgentError(str(e), DATA_LOSS) if e.data_loss else InvalidArgument(str(e))) from None


class _Notifier:
    """Wake-all notification: waiters take `.waiter()` before checking state, then await it."""

    def __init__(self) -> None:
        self._ev = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        return self._ev

    def kick(self) -> None:
        self._ev.set()
        self._ev = asyncio.Event()


async def _cancel(task: asyncio.Future[None]) -> None:
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


# --- output -------------------------------------------------------------------------------

class OutputBuffer(session.OutputBuffer):
    """A session OutputBuffer that wakes the pumps on every change and tells the exit path
    when the host acknowledged the EOF (`delivered`, `wait_delivered`)."""

    def __init__(self, capacity: int = OUTPUT_CAPACITY) -> None:
        super().__init__(capacity)
        self.delivered = asyncio.Event()    # the host acknowledged our EOF message
        self.changed = _Notifier()
        self.last_progress = time.monotonic()

    def append(self, data: bytes) -> None:
        super().append(data)
        self.changed.kick()

    def finish(self) -> None:
        super().finish()
        self.changed.kick()

    def ack(self, offset: int) -> None:
        advanced = offset > self.acked
        with _host_errors():
            super().ack(offset)
        if advanced:
            self.last_progress = time.monotonic()
            self.changed.kick()

    def mark_eof_acked(self) -> None:
        super().mark_eof_acked()
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
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.wait(), remaining)
        return True


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
                       acks: AsyncIterator[session.AckMessage],
                       send: Callable[[session.OutputChunk], Awaitable[None]]) -> bool:
    """One host session on an output buffer. Returns True when the EOF was acknowledged,
    False when the session ended otherwise (host closed, or a newer session took over)."""
    with _host_errors():
        sender = session.OutputSender(buf, offset, window, chunk=CHUNK)
    buf.last_progress = time.monotonic()
    buf.changed.kick()  # a previous session notices it was replaced

    async def read_acks() -> None:
        try:
            async for ack in acks:
                with _host_errors():
                    sender.receive(ack)
                buf.changed.kick()          # a bigger window: more to send
                if sender.done:
                    return
        finally:
            buf.changed.kick()

    reader = asyncio.ensure_future(read_acks())
    try:
        while True:
            waiter = buf.changed.waiter()
            if buf.delivered.is_set():
                return True
            if sender.superseded:
                return False
            if reader.done():
                reader.result()   # re-raise a protocol error
                return buf.delivered.is_set()
            msg = sender.next_message()
            if msg is not None:
                await send(msg)
                continue
            await waiter.wait()
    finally:
        await _cancel(reader)


# --- input --------------------------------------------------------------------------------

class InputSink(session.InputBuffer):
    """A process's stdin: a session InputBuffer plus the task that writes it into the fd."""

    def __init__(self, fd: int, *, tty: bool = False, window: int = INPUT_WINDOW,
                 own_fd: bool = True) -> None:
        super().__init__(window)
        self.fd = fd
        self.tty = tty
        self.own_fd = own_fd       # a pty master is shared with the output pump: not ours to close
        self.changed = _Notifier()
        os.set_blocking(fd, False)
        self._writer = asyncio.ensure_future(self._write_loop())

    def accept(self, msg: session.DataMessage) -> list[session.Event]:
        with _host_errors():
            events = super().accept(msg)
        self.changed.kick()
        return events

    def close(self) -> None:
        """CloseStdin: EOF after everything received so far."""
        self.request_eof()
        self.changed.kick()

    async def _write_loop(self) -> None:
        try:
            while True:
                waiter = self.changed.waiter()
                if self.pending and not self.broken:
                    try:
                        n = os.write(self.fd, self.take(CHUNK))
                    except BlockingIOError:
                        await wait_writable(self.fd)
                        continue
                    except OSError:        # EPIPE: the process closed its stdin
                        self.mark_broken()
                        self.changed.kick()
                        continue
                    self.wrote(n)
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
            with contextlib.suppress(OSError):
                os.write(self.fd, b"\x04")   # ^D: what a user at the terminal types for EOF
        if self.own_fd:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.mark_closed()
        self.changed.kick()

    def shutdown(self) -> None:
        if not self._writer.done():
            self._writer.cancel()


async def serve_input(sink: InputSink, data: AsyncIterator[session.DataMessage],
                      send: Callable[[spb.InputServer], Awaitable[None]]) -> None:
    """One host session on a stdin sink: grant credit, accept data, ack the EOF."""
    receiver = session.InputReceiver(sink)
    done = asyncio.Event()

    async def acker() -> None:
        while True:
            waiter = sink.changed.waiter()
            msg = receiver.next_message()
            if msg is not None:
                await send(msg)
                if receiver.done:
                    return
                continue
            if done.is_set():
                return
            await waiter.wait()

    task = asyncio.ensure_future(acker())
    try:
        async for msg in data:
            receiver.receive(msg)
            if task.done() or sink.eof_requested:
                break   # after EOF nothing more may come: just ack it
        # Host finished sending: keep acking until the EOF (if requested) went through.
        if sink.eof_requested:
            await task
    finally:
        done.set()
        sink.changed.kick()
        await _cancel(task)
