"""A process's stdio to and from the guest: `OutputStream` (stdout/stderr) and `InputStream`
(stdin), short asyncio pumps around the sans-IO session of `spinbox.api.stdio_session`, which
holds every rule (offsets, windows, acknowledged EOF) and checks the guest against them.
Opened through `AgentClient.open_output` / `open_input`.

One session per stream: nothing in the shim reconnects the agent (a dead shim means a dead
VM), so a stream whose connection drops fails with AgentUnavailable. Resuming at an offset is
part of the protocol all the same (vminitd reopens its port and serves an open at an offset)
and is covered by the session's property tests.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import ttrpc

from spinbox.api import stdio_session as session
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb

from .errors import AgentProtocolError, AgentUnavailable
from .transport import SVC_STDIO
from .validate import protocol_error, sanitize

if TYPE_CHECKING:
    from .client import AgentClient

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_WINDOW = session.DEFAULT_OUTPUT_WINDOW   # guest bytes in flight per output stream
MAX_WINDOW = session.MAX_WINDOW                         # largest window either way
MAX_READ = 256 << 10             # largest chunk handed to a consumer at once


def _as_agent_error(e: BaseException, what: str) -> BaseException:
    """What a stream's reader or writer gets for the failure `e` of its session."""
    if isinstance(e, session.StdioProtocolError):
        return protocol_error(str(e))
    if isinstance(e, ttrpc.ConnectionClosed):
        return AgentUnavailable(f"{what}: connection to the guest agent lost ({e.message})")
    if isinstance(e, ttrpc.DeadlineExceeded):
        # our own deadline, or the guest's answer DEADLINE_EXCEEDED: then the message is the
        # guest's, and is sanitised like any other (as in AgentClient._unary)
        return ttrpc.DeadlineExceeded(f"{what}: {sanitize(e.message)}")
    if isinstance(e, ttrpc.TTRPCError):
        return ttrpc.error_from_status(int(e.code), f"guest: {what}: {sanitize(e.message)}")
    return e


class _Stream:
    """What both directions share: the session task (started on first use), a change signal
    for waiters, and the session's first error."""

    _kind = "stream"

    def __init__(self, agent: AgentClient) -> None:
        self.agent = agent
        self._changed = asyncio.Event()
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        raise NotImplementedError

    async def _session(self, client: ttrpc.Client) -> None:
        raise NotImplementedError

    def _kick(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"agent-{self._kind}-{self.name}")

    async def _run(self) -> None:
        try:
            client = self.agent.stream_client()
            await self._session(client)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._error = _as_agent_error(e, f"{self._kind} {self.name}")
        finally:
            self._kick()

    async def _stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._kick()


class OutputStream(_Stream):
    """Bytes of one process's stdout/stderr, in order, exactly once; ends after the guest's
    EOF was received and acknowledged. Credit goes back as the consumer takes chunks."""

    _kind = "output"

    def __init__(self, agent: AgentClient, id: str, exec_id: str, fd: int, offset: int, window: int) -> None:
        super().__init__(agent)
        self._rx = session.OutputReceiver(id, exec_id, fd, offset=offset, window=window)
        self._pending = bytearray()       # received, not yet handed to the consumer
        self._call: ttrpc.ClientStream[spb.OutputServer] | None = None
        self._closed = False

    @property
    def name(self) -> str:
        return self._rx.name

    @property
    def offset(self) -> int:
        """Bytes delivered to our consumer."""
        return self._rx.offset

    @property
    def window(self) -> int:
        return self._rx.window

    async def _session(self, client: ttrpc.Client) -> None:
        call = await client.open_stream(SVC_STDIO, "Output", spb.OutputServer, request=self._rx.open(),
                                        client_streaming=True, server_streaming=True)
        self._call = call
        try:
            while (msg := await call.recv()) is not None:
                for event in self._rx.receive(msg):
                    if isinstance(event, session.Data):
                        self._pending += event.data
                self._kick()
            if client.closed and not self._rx.eof_acked:   # the stream ended with the connection
                raise ttrpc.ConnectionClosed("connection closed")
            self._rx.end_of_session()
        finally:
            self._call = None
            with contextlib.suppress(Exception):
                await call.aclose()

    async def _send_due(self) -> None:
        """Send the acks the session has due (the last one acknowledges the EOF)."""
        call = self._call
        while call is not None and (msg := self._rx.next_message()) is not None:
            try:
                await call.send(msg)
            except ttrpc.TTRPCError:
                return   # the session is going away; read() reports why
        if call is not None and self._rx.eof_acked:
            with contextlib.suppress(Exception):
                await call.close_send()

    async def read(self) -> bytes | None:
        """The next bytes, or None once the guest's EOF was received and acknowledged. A guest
        that broke the stream's contract (data beyond the window, offsets that lie) loses what
        is still pending: its error comes at once, not after output nobody may be reading."""
        self._start()
        while True:
            waiter = self._changed
            if isinstance(self._error, AgentProtocolError):
                self._pending.clear()
                raise self._error
            if self._pending:
                data = bytes(self._pending[:MAX_READ])
                del self._pending[:len(data)]
                self._rx.consumed(len(data))
                await self._send_due()
                return data
            if self._rx.eof_received and not self._rx.eof_acked:
                await self._send_due()    # everything was consumed: acknowledge the EOF
            if self._rx.eof_acked or self._closed:
                return None
            if self._error is not None:
                raise self._error
            await waiter.wait()

    async def refused(self) -> AgentProtocolError:
        """Returns once the guest has broken this stream's contract: the consumer stops then,
        even in the middle of writing what it took (into a FIFO nobody may ever read)."""
        self._start()
        while True:
            waiter = self._changed
            if isinstance(self._error, AgentProtocolError):
                return self._error
            await waiter.wait()    # (a session that ended otherwise never kicks again)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if data is None:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        self._closed = True
        await self._stop()


class InputStream(_Stream):
    """A process's stdin: bytes in order, exactly once, inside the guest's window; the EOF is
    final once the guest acknowledged it."""

    _kind = "input"

    def __init__(self, agent: AgentClient, id: str, exec_id: str) -> None:
        super().__init__(agent)
        self._tx = session.InputSender(id, exec_id)

    @property
    def name(self) -> str:
        return self._tx.name

    @property
    def offset(self) -> int:
        """Bytes the guest confirmed receiving."""
        return self._tx.acked

    async def _session(self, client: ttrpc.Client) -> None:
        call = await client.open_stream(SVC_STDIO, "Input", spb.InputServer, request=self._tx.open(),
                                        client_streaming=True, server_streaming=True)
        sender: asyncio.Task[None] | None = None
        try:
            while (msg := await call.recv()) is not None:
                self._tx.receive(msg)
                self._kick()
                if self._tx.eof_acked:
                    return
                if sender is None:        # the guest told us its position: data may go out
                    sender = asyncio.ensure_future(self._send_loop(call))
                elif sender.done():
                    sender.result()
            if client.closed:
                raise ttrpc.ConnectionClosed("connection closed")
            raise session.StdioProtocolError(f"input {self.name}: stream ended without acknowledging EOF")
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
            with contextlib.suppress(Exception):
                await call.aclose()

    async def _send_loop(self, call: ttrpc.ClientStream[spb.InputServer]) -> None:
        while True:
            waiter = self._changed
            msg = self._tx.next_message()
            if msg is None:
                await waiter.wait()
                continue
            await call.send(msg)

    async def write(self, data: bytes) -> None:
        """Queue data; waits while more than the guest's window is unacknowledged."""
        if self._tx.eof_requested:
            raise ValueError(f"{self.name}: write after close")
        self._start()
        view = memoryview(bytes(data))
        while view:
            if self._error is not None:
                raise self._error
            waiter = self._changed
            room = max(self._tx.window, session.INPUT_CHUNK) - self._tx.buffered
            if room <= 0:
                await waiter.wait()
                continue
            self._tx.send_data(bytes(view[:room]))
            view = view[room:]
            self._kick()

    async def close(self, timeout: float | None = None) -> None:
        """Send EOF after everything written; returns when the guest acknowledged it."""
        self._start()
        self._tx.send_eof()
        self._kick()

        async def acked() -> None:
            while not self._tx.eof_acked:
                if self._error is not None:
                    raise self._error
                waiter = self._changed
                await waiter.wait()
        await asyncio.wait_for(acked(), timeout)

    async def aclose(self) -> None:
        """Stop without EOF (the process's stdin stays open in the guest)."""
        await self._stop()
