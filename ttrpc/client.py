"""asyncio TTRPC client (Go ttrpc `client.go`): many calls and streams in flight on one byte
stream; stream ids odd and strictly increasing, allocated under the write lock."""
from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

from .channel import DEFAULT_SEND_TIMEOUT_S, Channel, ProtocolError, open_fd_streams
from .frame import MAX_DATA, Flags, Frame, MessageType, Oversized, Payload
from .metadata import Metadata, MetadataLike
from .request_pb2 import Request, Response
from .services import message_class
from .status import (Code, ConnectionClosed, DeadlineExceeded, Internal, ResourceExhausted,
                     TTRPCError, error_from_status_proto)
from .stream import DEFAULT_BUFFER_BYTES, DEFAULT_BUFFER_MESSAGES, ClientStream, SendFrame, StreamBuffer

log = logging.getLogger(__name__)

M = TypeVar("M", bound=_message.Message)

MAX_STREAM_ID = (1 << 32) - 1


def _unix_path(address: str) -> str:
    return address[len("unix://"):] if address.startswith("unix://") else address


class Client:
    """A TTRPC client over a connected (reader, writer) pair. Must be created inside a running
    event loop (it starts its read loop)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 stream_buffer_messages: int = DEFAULT_BUFFER_MESSAGES,
                 stream_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 max_data: int = MAX_DATA, first_stream_id: int = 1,
                 send_timeout: float | None = DEFAULT_SEND_TIMEOUT_S) -> None:
        # first_stream_id: a client that reconnects over a byte stream that may still deliver
        # the old connection's frames (virtio-serial) continues its ids, so no stale response
        # can match a new call. Client-initiated ids are odd.
        if first_stream_id < 1 or first_stream_id % 2 == 0 or first_stream_id > MAX_STREAM_ID:
            raise ValueError(f"first_stream_id must be odd and in 1..{MAX_STREAM_ID} (got {first_stream_id})")
        # send_timeout bounds every frame send (unary requests, stream sends and close_send):
        # past it the connection is dropped and every call and stream fails ConnectionClosed.
        self._channel = Channel(reader, writer, max_data=max_data, send_timeout=send_timeout)
        self.stream_buffer_messages = stream_buffer_messages
        self.stream_buffer_bytes = stream_buffer_bytes
        self._next_id = first_stream_id
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._streams: dict[int, ClientStream[Any]] = {}
        self._closed_error: TTRPCError | None = None
        self._done = asyncio.Event()
        self._reader_task = asyncio.create_task(self._read_loop(), name="ttrpc-client-read")

    # -- constructors -------------------------------------------------------------------

    @classmethod
    async def connect(cls, address: str, **kwargs: Any) -> Client:
        """Connect to a unix socket path (an optional unix:// prefix is accepted)."""
        reader, writer = await asyncio.open_unix_connection(_unix_path(address),
                                                            limit=1 << 20)
        return cls(reader, writer, **kwargs)

    connect_unix = connect

    @classmethod
    async def from_socket(cls, sock: socket.socket, **kwargs: Any) -> Client:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer, **kwargs)

    @classmethod
    async def from_fd(cls, fd: int, **kwargs: Any) -> Client:
        """Over a bidirectional fd (virtio-serial port, pty, socket); the caller keeps `fd`."""
        reader, writer = await open_fd_streams(fd)
        return cls(reader, writer, **kwargs)

    # -- state --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed_error is not None

    async def wait_closed(self) -> None:
        await self._done.wait()

    async def close(self) -> None:
        """Close the connection; pending calls and streams fail with ConnectionClosed."""
        self._shutdown(ConnectionClosed("ttrpc: client closed"))
        self._channel.close()
        if self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        await self._channel.wait_closed()
        self._done.set()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _shutdown(self, error: TTRPCError) -> None:
        if self._closed_error is None:
            self._closed_error = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        for stream in self._streams.values():
            stream._fail(error)
        self._streams.clear()

    # -- read loop ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        error: TTRPCError = ConnectionClosed("ttrpc: connection closed by peer")
        try:
            async for events in self._channel.events():
                for event in events:
                    self._on_event(event)
        except ProtocolError as exc:
            error = ConnectionClosed(str(exc))
        except asyncio.CancelledError:
            error = ConnectionClosed("ttrpc: client closed")
            raise
        except Exception as exc:
            log.exception("ttrpc: client read loop failed")
            error = ConnectionClosed(f"ttrpc: read loop failed: {exc}")
        finally:
            self._shutdown(error)
            self._channel.close()
            self._done.set()

    def _on_event(self, event: Frame | Oversized) -> None:
        sid = event.stream_id
        if isinstance(event, Oversized):
            err = ResourceExhausted(event.message(self._channel.max_data))
            fut = self._pending.pop(sid, None)
            if fut is not None and not fut.done():
                fut.set_exception(err)
            stream = self._streams.pop(sid, None)
            if stream is not None:
                stream._fail(err)
            return
        if event.type == MessageType.RESPONSE:
            fut = self._pending.pop(sid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(event.data)
                return
            stream = self._streams.get(sid)
            if stream is not None:
                if stream._on_response(event.data) is not None:
                    self._streams.pop(sid, None)
                return
        elif event.type == MessageType.DATA:
            stream = self._streams.get(sid)
            if stream is not None:
                if stream._on_data(event.flags, event.data) is not None:
                    log.warning("ttrpc: stream %d failed: receive buffer full", sid)
                    self._streams.pop(sid, None)
                return
        log.debug("ttrpc: dropping frame type %d for unknown stream %d", event.type, sid)

    @property
    def next_stream_id(self) -> int:
        """The id the next call or stream will get (for a successor client's first_stream_id)."""
        return self._next_id

    # -- sending ---------------------------------------------------------------------------

    def _allocator(self, register: Callable[[int], None]) -> Callable[[], int]:
        def allocate() -> int:
            if self._closed_error is not None:
                raise self._closed_error
            sid = self._next_id
            if sid > MAX_STREAM_ID:
                raise ResourceExhausted("ttrpc: stream ids exhausted on this connection")
            self._next_id += 2
            register(sid)
            return sid
        return allocate

    def _request(self, service: str, method: str, payload: bytes, timeout: float | None,
                 metadata: MetadataLike) -> bytes:
        req = Request(service=service, method=method, payload=payload)
        if timeout is not None:
            req.timeout_nano = max(1, int(timeout * 1e9))
        if metadata:
            md = metadata if isinstance(metadata, Metadata) else Metadata(metadata)
            req.metadata.extend(md.to_proto())
        return req.SerializeToString()

    async def call(self, service: str, method: str, request: _message.Message,
                   response_type: type[M], *, timeout: float | None = None,
                   metadata: MetadataLike = None) -> M:
        """One unary call. Raises the typed TTRPCError the server answered with,
        DeadlineExceeded when `timeout` (seconds) passes, ConnectionClosed on connection loss."""
        if self._closed_error is not None:
            raise self._closed_error
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        data = self._request(service, method, request.SerializeToString(), timeout, metadata)
        fut: asyncio.Future[bytes] = loop.create_future()
        sid = 0

        def register(new_sid: int) -> None:
            nonlocal sid
            sid = new_sid
            self._pending[new_sid] = fut

        try:
            async with asyncio.timeout_at(deadline):
                await self._channel.send_new(MessageType.REQUEST, 0, data, self._allocator(register))
                raw = await fut
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                raise DeadlineExceeded("context deadline exceeded") from None
            raise
        finally:
            if sid:
                self._pending.pop(sid, None)
        resp = Response()
        try:
            resp.ParseFromString(raw)
        except Exception as exc:
            raise Internal(f"ttrpc: error unmarshalling response: {exc}") from None
        if resp.HasField("status") and resp.status.code != Code.OK:
            raise error_from_status_proto(resp.status)
        out = response_type()
        try:
            out.ParseFromString(resp.payload)
        except Exception as exc:
            raise Internal(f"ttrpc: error unmarshalling payload: {exc}") from None
        return out

    async def open_stream(self, service: str, method: str, response_type: type[M],
                          request: _message.Message | None = None, *,
                          client_streaming: bool = False, server_streaming: bool = False,
                          timeout: float | None = None,
                          metadata: MetadataLike = None) -> ClientStream[M]:
        """Open a streaming call. Server-streaming only: `request` is the call's request.
        Client-streaming / bidi: `request`, if given, is the first message."""
        if not (client_streaming or server_streaming):
            raise ValueError("ttrpc: open_stream needs client_streaming and/or server_streaming; "
                             "use call() for unary methods")
        if self._closed_error is not None:
            raise self._closed_error
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        payload = request.SerializeToString() if request is not None else b""
        data = self._request(service, method, payload, timeout, metadata)
        flags = Flags.REMOTE_OPEN if client_streaming else Flags.REMOTE_CLOSED
        buffer = StreamBuffer(self.stream_buffer_messages, self.stream_buffer_bytes)
        holder: list[ClientStream[M]] = []

        def register(sid: int) -> None:
            stream = ClientStream(sid, response_type, client_streaming=client_streaming,
                                  server_streaming=server_streaming, buffer=buffer,
                                  send_frame=self._stream_sender(sid), forget=self._forget,
                                  deadline=deadline)
            self._streams[sid] = stream
            holder.append(stream)

        try:
            await self._channel.send_new(MessageType.REQUEST, flags, data, self._allocator(register))
        except BaseException:
            if holder:
                self._streams.pop(holder[0].stream_id, None)
            raise
        return holder[0]

    def _stream_sender(self, sid: int) -> SendFrame:
        async def send(type: int, flags: int, data: Payload) -> None:
            if self._closed_error is not None:
                raise self._closed_error
            await self._channel.send(sid, type, flags, data)
        return send

    def _forget(self, sid: int) -> None:
        self._streams.pop(sid, None)

    # -- stubs ------------------------------------------------------------------------------

    def stub(self, service: _descriptor.ServiceDescriptor, name: str | None = None) -> Stub:
        return Stub(self, service, name)


class Stub:
    """`await stub.Method(req, timeout=..., metadata=...)` for every method of a service.
    Streaming methods return a ClientStream (server-streaming: `req` is required; client-
    streaming / bidi: `req` is an optional first message)."""

    def __init__(self, client: Client, service: _descriptor.ServiceDescriptor,
                 name: str | None = None) -> None:
        self._client = client
        self._service_name = name or service.full_name
        for m in service.methods:
            setattr(self, m.name, self._make(m))

    if TYPE_CHECKING:
        # The methods are attributes set per service above: to a type checker any name is one.
        def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]: ...

    def _make(self, m: _descriptor.MethodDescriptor) -> Callable[..., Awaitable[Any]]:
        client, service = self._client, self._service_name
        response_type = message_class(m.output_type)
        if not (m.client_streaming or m.server_streaming):
            async def unary(request: _message.Message, *, timeout: float | None = None,
                            metadata: MetadataLike = None) -> _message.Message:
                return await client.call(service, m.name, request, response_type,
                                         timeout=timeout, metadata=metadata)
            unary.__name__ = m.name
            return unary

        async def streaming(request: _message.Message | None = None, *,
                            timeout: float | None = None,
                            metadata: MetadataLike = None) -> ClientStream[_message.Message]:
            if request is None and not m.client_streaming:
                request = message_class(m.input_type)()
            return await client.open_stream(service, m.name, response_type, request,
                                            client_streaming=m.client_streaming,
                                            server_streaming=m.server_streaming,
                                            timeout=timeout, metadata=metadata)
        streaming.__name__ = m.name
        return streaming


async def connect_unix(address: str, **kwargs: Any) -> Client:
    return await Client.connect(address, **kwargs)
