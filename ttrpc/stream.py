"""Streaming RPCs (ttrpc 1.2 flag rules) and the bounded per-stream receive buffer.

The connection's read loop hands each stream's payloads to a `StreamBuffer` without ever
waiting: the buffer is bounded in messages and bytes, and a put that would overflow it returns
False so the owner fails only that stream (RESOURCE_EXHAUSTED).

Client side (`ClientStream`), by method kind:
  server-streaming: Request RC + payload; Data frames back; end = Data RC (ND when empty) or a
                    Response (always on error).
  client-streaming / bidi: Request RO (+ optional first message); Data frames; CloseSend =
                    Data RC|ND; end = Response (client-streaming, carries the result) or Data RC.
Server side (`ServerStream`): what a streaming handler gets as its first argument.
"""
from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf import message as _message

from .frame import Flags, MessageType, Payload
from .request_pb2 import Response
from .status import (Code, DeadlineExceeded, FailedPrecondition, Internal, ResourceExhausted,
                     TTRPCError, error_from_status_proto)

if TYPE_CHECKING:
    from .services import Method

M = TypeVar("M", bound=_message.Message)

DEFAULT_BUFFER_MESSAGES = 64  # Go's streamRecvBufferSize
DEFAULT_BUFFER_BYTES = 8 << 20  # at least one max-size frame plus room

SendFrame = Callable[[int, int, Payload], Awaitable[None]]  # (type, flags, data) on this stream


class Encoded:
    """A message already in protobuf wire form, as pieces the channel writes one after another
    without joining them (a streaming server sends views of its own buffers this way; see
    spinbox's stdio output in the guest, where every copy of the bytes costs)."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: Sequence[bytes | memoryview]) -> None:
        self.pieces = pieces


class StreamBuffer:
    """FIFO of raw payloads with a message and a byte bound. Never blocks the producer."""

    def __init__(self, max_messages: int = DEFAULT_BUFFER_MESSAGES,
                 max_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._queue: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(messages, bytes) held now."""
        return len(self._queue), self._bytes

    @property
    def ended(self) -> bool:
        return self._ended

    def put(self, data: bytes) -> bool:
        """Queue one payload; False if that would exceed a bound (an empty buffer always takes
        one message, so a single max-size frame fits whatever max_bytes is)."""
        if self._ended:
            return True  # late data after the end is dropped, not an overflow
        if self._queue and (len(self._queue) >= self.max_messages
                            or self._bytes + len(data) > self.max_bytes):
            return False
        self._queue.append(data)
        self._bytes += len(data)
        self._wake()
        return True

    def end(self, error: BaseException | None = None) -> None:
        """No more payloads. Queued ones are still delivered, then `error` (if any) is raised."""
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End now and drop what is queued: the next get() raises `error`."""
        self._queue.clear()
        self._bytes = 0
        self._ended = True
        self._error = error
        self._wake()

    async def get(self) -> bytes | None:
        while not self._queue:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._queue.popleft()
        self._bytes -= len(data)
        return data

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _parse(cls: type[M], data: bytes) -> M:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise Internal(f"ttrpc: error unmarshalling payload: {exc}") from None
    return msg


class ServerStream:
    """A streaming handler's view of its call: `recv()` / `async for` the client's messages
    (None once the client closed its send side), `send(msg)` for server-streaming and bidi."""

    def __init__(self, method: Method, stream_id: int, buffer: StreamBuffer,
                 send_frame: SendFrame) -> None:
        self.method = method
        self.stream_id = stream_id
        self._buffer = buffer
        self._send_frame = send_frame

    async def recv(self) -> _message.Message | None:
        data = await self._buffer.get()
        if data is None:
            return None
        return self.method.parse_request(data)

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> _message.Message:
        msg = await self.recv()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def send(self, msg: _message.Message | Encoded) -> None:
        if not self.method.server_streaming:
            raise FailedPrecondition(f"ttrpc: {self.method.full_name} is not server-streaming; "
                                     f"return the response instead")
        data = msg.pieces if isinstance(msg, Encoded) else msg.SerializeToString()
        await self._send_frame(MessageType.DATA, 0, data)


class ClientStream(Generic[M]):
    """The client's end of a streaming call. Made by `Client.open_stream`."""

    def __init__(self, stream_id: int, response_type: type[M], *, client_streaming: bool,
                 server_streaming: bool, buffer: StreamBuffer, send_frame: SendFrame,
                 forget: Callable[[int], None], deadline: float | None) -> None:
        self.stream_id = stream_id
        self.response_type = response_type
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming
        self._buffer = buffer
        self._send_frame = send_frame
        self._forget = forget
        self._deadline = deadline
        self._local_closed = not client_streaming  # server-streaming: closed by the Request
        self._error: TTRPCError | None = None

    # -- frames from the read loop (never block) ------------------------------------------

    def _on_data(self, flags: int, data: bytes) -> TTRPCError | None:
        """Returns an error if the stream had to fail (the caller then forgets it)."""
        if not flags & Flags.NO_DATA:
            if not self._buffer.put(data):
                return self._fail(ResourceExhausted(
                    f"ttrpc: stream {self.stream_id} receive buffer full "
                    f"({self._buffer.max_messages} messages / {self._buffer.max_bytes} bytes)"))
        if flags & Flags.REMOTE_CLOSED:
            self._buffer.end()
            return None
        return None

    def _on_response(self, data: bytes) -> TTRPCError | None:
        resp = Response()
        try:
            resp.ParseFromString(data)
        except Exception as exc:
            return self._fail(Internal(f"ttrpc: error unmarshalling response: {exc}"))
        if resp.HasField("status") and resp.status.code != Code.OK:
            self._buffer.end(error_from_status_proto(resp.status))
            return None
        # A client-streaming result is delivered even when it serialises to zero bytes.
        if self.client_streaming and not self.server_streaming or resp.payload:
            if not self._buffer.put(resp.payload):
                return self._fail(ResourceExhausted(
                    f"ttrpc: stream {self.stream_id} receive buffer full"))
        self._buffer.end()
        return None

    def _fail(self, error: TTRPCError) -> TTRPCError:
        self._error = error
        self._buffer.fail(error)
        return error

    # -- application API --------------------------------------------------------------------

    async def send(self, msg: _message.Message) -> None:
        if self._error is not None:
            raise self._error
        if self._local_closed:
            raise FailedPrecondition(f"ttrpc: stream {self.stream_id}: send after close_send "
                                     f"(or on a server-streaming call)")
        await self._send_frame(MessageType.DATA, 0, msg.SerializeToString())

    async def close_send(self) -> None:
        """Tell the server we send no more messages (Data RC|ND)."""
        if self._local_closed:
            return
        self._local_closed = True
        if self._error is None:
            await self._send_frame(MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"")

    async def recv(self) -> M | None:
        """Next message, None at the end of the stream; raises the call's TTRPCError."""
        try:
            if self._deadline is None:
                data = await self._buffer.get()
            else:
                async with asyncio.timeout_at(self._deadline):
                    data = await self._buffer.get()
        except TimeoutError:
            err = DeadlineExceeded("context deadline exceeded")
            self._fail(err)
            self._forget(self.stream_id)
            raise err from None
        except TTRPCError:
            self._forget(self.stream_id)
            raise
        if data is None:
            self._forget(self.stream_id)
            return None
        return _parse(self.response_type, data)

    async def close_and_recv(self) -> M:
        """Client-streaming: close the send side and return the server's response."""
        await self.close_send()
        msg = await self.recv()
        if msg is None:
            raise Internal("ttrpc: stream ended without a response")
        return msg

    def __aiter__(self) -> ClientStream[M]:
        return self

    async def __anext__(self) -> M:
        msg = await self.recv()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def aclose(self) -> None:
        """Stop listening: further frames for this stream are dropped. Closes the send side."""
        try:
            if not self._local_closed and self._error is None:
                await self.close_send()
        except TTRPCError:
            pass
        finally:
            if not self._buffer.ended:
                self._buffer.fail(FailedPrecondition("ttrpc: stream closed locally"))
            self._forget(self.stream_id)

    async def __aenter__(self) -> ClientStream[M]:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
