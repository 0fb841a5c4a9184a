"""asyncio TTRPC server (Go ttrpc `server.go`).

Per connection, one read loop decodes frames and never waits on a handler: every Request
becomes its own task (a blocked Wait must not stall other calls), streaming payloads go to
bounded per-stream buffers, and responses are written in completion order under the channel's
write lock.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING, Any, NamedTuple

from google.rpc import status_pb2

from .channel import Channel, ProtocolError, open_fd_streams
from .frame import MAX_DATA, Flags, Frame, MessageType, Oversized, Payload
from .metadata import CallContext, Metadata
from .request_pb2 import Request, Response
from .services import Handler, Method, ServiceRegistry
from .status import (Code, DeadlineExceeded, InvalidArgument, ResourceExhausted, TTRPCError,
                     status_from_exception)
from .stream import DEFAULT_BUFFER_BYTES, DEFAULT_BUFFER_MESSAGES, SendFrame, ServerStream, StreamBuffer

if TYPE_CHECKING:
    from google.protobuf import descriptor as _descriptor
    from google.protobuf import message as _message

log = logging.getLogger(__name__)


class PeerCredentials(NamedTuple):
    """SO_PEERCRED of a unix socket peer. (A NamedTuple, not a dataclass: cheaper to import.)"""
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return PeerCredentials(*struct.unpack("3i", raw))


def _status(code: Code, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=int(code), message=message)


class _Call:
    """One in-flight request on a connection."""

    def __init__(self, method: Method, ctx: CallContext, payload: bytes,
                 buffer: StreamBuffer | None, remote_closed: bool) -> None:
        self.method = method
        self.ctx = ctx
        self.payload = payload
        self.buffer = buffer  # streaming methods only
        self.remote_closed = remote_closed
        self.task: asyncio.Task[None] | None = None
        self.started = False  # a task cancelled before its first step never runs its body
        self.fail_status: status_pb2.Status | None = None  # set when the read loop fails it


class ServerConnection:
    def __init__(self, server: Server, channel: Channel, peer: object = None) -> None:
        self.server = server
        self.channel = channel
        self.peer = peer
        self.calls: dict[int, _Call] = {}
        self.last_stream_id = 0
        self._side_tasks: set[asyncio.Task[None]] = set()  # immediate error responses
        self._closing = False
        self.done = asyncio.Event()

    async def run(self) -> None:
        try:
            async for events in self.channel.events():
                for event in events:
                    self._on_event(event)
        except ProtocolError as exc:
            log.info("ttrpc: closing connection: %s", exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ttrpc: connection read loop failed")
        finally:
            try:
                await self._shutdown()
            finally:
                self.done.set()

    def close(self) -> None:
        self._closing = True
        self.channel.close()

    async def _shutdown(self) -> None:
        self._closing = True
        tasks = [c.task for c in self.calls.values() if c.task is not None] + list(self._side_tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.calls.clear()
        self.channel.close()
        await self.channel.wait_closed()

    # -- read loop: synchronous, never waits ----------------------------------------------

    def _on_event(self, event: Frame | Oversized) -> None:
        if isinstance(event, Oversized):
            self._on_oversized(event)
        elif event.type == MessageType.REQUEST:
            self._on_request(event)
        elif event.type == MessageType.DATA:
            self._on_data(event)
        else:
            # Responses and unknown types: ignored for forward compatibility (as Go does).
            log.debug("ttrpc: ignoring frame type %d on stream %d", event.type, event.stream_id)

    def _on_oversized(self, event: Oversized) -> None:
        status = _status(Code.RESOURCE_EXHAUSTED, event.message(self.channel.max_data))
        call = self.calls.get(event.stream_id)
        if call is not None:
            self._fail_call(event.stream_id, call, status)
            return
        if event.type == MessageType.REQUEST and event.stream_id % 2 == 1 \
                and event.stream_id > self.last_stream_id:
            self.last_stream_id = event.stream_id
        self._respond_soon(event.stream_id, status)

    def _on_request(self, frame: Frame) -> None:
        sid = frame.stream_id
        if sid % 2 != 1:
            self._respond_soon(sid, _status(Code.INVALID_ARGUMENT,
                                            "StreamID must be odd for client initiated streams"))
            return
        if sid <= self.last_stream_id:
            self._respond_soon(sid, _status(Code.INVALID_ARGUMENT,
                                            "StreamID cannot be re-used and must increment"))
            return
        self.last_stream_id = sid
        req = Request()
        try:
            req.ParseFromString(frame.data)
        except Exception as exc:
            self._respond_soon(sid, _status(Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}"))
            return
        try:
            method = self.server.services.lookup(req.service, req.method)
        except TTRPCError as exc:
            self._respond_soon(sid, exc.to_status())
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        ctx = CallContext(req.service, req.method, sid, Metadata.from_proto(req.metadata),
                          deadline, self.peer)
        buffer = None
        # Request flags 0 = unary: the client sends nothing after it; RC says the same.
        remote_closed = bool(frame.flags & Flags.REMOTE_CLOSED) or not frame.flags & Flags.REMOTE_OPEN
        if method.streaming:
            buffer = StreamBuffer(self.server.stream_buffer_messages, self.server.stream_buffer_bytes)
            # With RO an empty payload means "no initial message" (ttrpc issue #126).
            if req.payload or not frame.flags & Flags.REMOTE_OPEN:
                buffer.put(req.payload)
            if remote_closed:
                buffer.end()
        call = _Call(method, ctx, req.payload, buffer, remote_closed)
        self.calls[sid] = call
        call.task = asyncio.create_task(self._run_call(sid, call), name=f"ttrpc{ctx.full_method}#{sid}")

    def _on_data(self, frame: Frame) -> None:
        sid = frame.stream_id
        call = self.calls.get(sid)
        if call is None:
            self._respond_soon(sid, _status(Code.INVALID_ARGUMENT, "StreamID is no longer active"))
            return
        if call.buffer is None or call.remote_closed:
            self._fail_call(sid, call, _status(Code.INVALID_ARGUMENT, "StreamID is no longer active"))
            return
        closing = bool(frame.flags & Flags.REMOTE_CLOSED)
        if closing and frame.data and not frame.flags & Flags.NO_DATA:
            self._fail_call(sid, call, _status(Code.INVALID_ARGUMENT,
                                               "data close message cannot include data"))
            return
        if not frame.flags & Flags.NO_DATA and not call.buffer.put(frame.data):
            self._fail_call(sid, call, _status(
                Code.RESOURCE_EXHAUSTED,
                f"stream {sid} receive buffer full ({call.buffer.max_messages} messages / "
                f"{call.buffer.max_bytes} bytes): the handler does not keep up"))
            return
        if closing:
            call.remote_closed = True
            call.buffer.end()

    def _fail_call(self, sid: int, call: _Call, status: status_pb2.Status) -> None:
        """End one call with `status`; the connection and other calls carry on."""
        if call.fail_status is not None:
            return
        call.fail_status = status
        if call.buffer is not None:
            call.buffer.fail(ResourceExhausted(status.message) if status.code == Code.RESOURCE_EXHAUSTED
                             else InvalidArgument(status.message))
        if call.task is not None and call.started:
            call.task.cancel()
        # not started yet: _run_call sees fail_status first thing

    def _respond_soon(self, sid: int, status: status_pb2.Status) -> None:
        if self._closing:
            return
        task = asyncio.create_task(self._send_response(sid, status))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- calls ------------------------------------------------------------------------------

    async def _send_response(self, sid: int, status: status_pb2.Status, payload: bytes = b"") -> None:
        data = Response(status=status, payload=payload).SerializeToString()
        try:
            await self.channel.send(sid, MessageType.RESPONSE, 0, data)
        except TTRPCError as exc:
            if isinstance(exc, ResourceExhausted):  # our reply is too big: say so instead
                await self._send_response(sid, _status(Code.RESOURCE_EXHAUSTED, exc.message))
            else:
                log.debug("ttrpc: response on stream %d not sent: %s", sid, exc)

    async def _run_call(self, sid: int, call: _Call) -> None:
        method, ctx = call.method, call.ctx
        call.started = True
        try:
            if call.fail_status is not None:
                await self._send_response(sid, call.fail_status)
                return
            try:
                async with asyncio.timeout_at(ctx.deadline):
                    if method.streaming:
                        assert call.buffer is not None  # every streaming call gets one
                        stream = ServerStream(method, sid, call.buffer, self._stream_sender(sid))
                        result = await method.handler(stream, ctx)
                    else:
                        request = method.parse_request(call.payload)
                        result = await method.handler(request, ctx)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                assert task is not None  # this runs as its call's task
                if self._closing or (call.fail_status is None and task.cancelling()):
                    raise  # connection closing or server shutting down
                if task.cancelling():
                    task.uncancel()  # we cancelled it to fail the stream: answer instead
                # else the handler let a CancelledError of its own escape: still answer
                await self._send_response(
                    sid, call.fail_status or _status(Code.CANCELLED, "handler was cancelled"))
                return
            except TimeoutError:
                if ctx.deadline is not None and asyncio.get_running_loop().time() >= ctx.deadline:
                    await self._send_response(sid, DeadlineExceeded("context deadline exceeded").to_status())
                    return
                raise
            if method.server_streaming:
                if result is not None:
                    log.warning("ttrpc: %s returned a value; streaming handlers send with "
                                "stream.send()", method.full_name)
                await self.channel.send(sid, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA)
            else:
                payload = method.encode_response(result)
                await self._send_response(sid, _status(Code.OK, ""), payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status = status_from_exception(exc)
            if not isinstance(exc, TTRPCError) and status.code in (Code.UNKNOWN, Code.INTERNAL):
                log.error("ttrpc: %s failed", method.full_name, exc_info=exc)
            else:
                log.debug("ttrpc: %s: %s", method.full_name, exc)
            if not self._closing:
                await self._send_response(sid, status)
        finally:
            if self.calls.get(sid) is call:
                del self.calls[sid]

    def _stream_sender(self, sid: int) -> SendFrame:
        async def send(type: int, flags: int, data: Payload) -> None:
            await self.channel.send(sid, type, flags, data)
        return send


class Server:
    """Serves registered services on unix sockets, stream pairs and character-device fds."""

    def __init__(self, registry: ServiceRegistry | None = None, *,
                 stream_buffer_messages: int = DEFAULT_BUFFER_MESSAGES,
                 stream_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 max_data: int = MAX_DATA) -> None:
        self.services = registry or ServiceRegistry()
        self.stream_buffer_messages = stream_buffer_messages
        self.stream_buffer_bytes = stream_buffer_bytes
        self.max_data = max_data
        self._listeners: list[tuple[asyncio.AbstractServer, str | None]] = []
        self._connections: set[ServerConnection] = set()
        self._connection_tasks: set[asyncio.Task[Any]] = set()
        self._closed = asyncio.Event()

    def register(self, service: _descriptor.ServiceDescriptor, servicer: object,
                 name: str | None = None) -> list[str]:
        return self.services.register(service, servicer, name)

    def register_method(self, service: str, method: str, handler: Handler,
                        request_type: type[_message.Message],
                        response_type: type[_message.Message] | None = None,
                        *, client_streaming: bool = False, server_streaming: bool = False) -> None:
        self.services.register_method(service, method, handler, request_type, response_type,
                                      client_streaming=client_streaming,
                                      server_streaming=server_streaming)

    @property
    def connections(self) -> int:
        return len(self._connections)

    # -- ways to serve ----------------------------------------------------------------------

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                               peer: object = None) -> None:
        """Serve one connected byte stream until it ends (EOF, error or close())."""
        conn = ServerConnection(self, Channel(reader, writer, max_data=self.max_data), peer)
        if self._closed.is_set():
            conn.close()
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    async def serve_fd(self, fd: int) -> None:
        """Serve one bidirectional fd (virtio-serial port, pty, socket) until EOF or error.
        The caller keeps ownership of `fd` (the library uses dups and closes them)."""
        reader, writer = await open_fd_streams(fd)
        await self.serve_connection(reader, writer)

    async def serve_unix(self, path: str, *, require_same_user: bool = False,
                         mode: int | None = None) -> None:
        """Listen on a unix socket path (removing a stale socket file first). Returns once
        listening; the socket file is removed by close()."""
        if path.startswith("unix://"):
            path = path[len("unix://"):]
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            if mode is not None:
                os.chmod(path, mode)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        await self.serve_listener(sock, require_same_user=require_same_user, _path=path)

    async def serve_listener(self, sock: socket.socket, *, require_same_user: bool = False,
                             _path: str | None = None) -> None:
        """Serve an already bound and listening unix socket (e.g. inherited from `start`)."""
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None  # asyncio runs each connection callback as a task
            self._connection_tasks.add(task)
            try:
                peer = None
                raw = writer.get_extra_info("socket")
                if raw is not None and raw.family == socket.AF_UNIX:
                    peer = peer_credentials(raw)
                    if require_same_user and (peer.uid != os.geteuid() or peer.gid != os.getegid()):
                        log.warning("ttrpc: rejected connection from pid %d uid %d gid %d: "
                                    "not our uid %d gid %d", peer.pid, peer.uid, peer.gid,
                                    os.geteuid(), os.getegid())
                        writer.close()
                        with contextlib.suppress(Exception):
                            await writer.wait_closed()
                        return
                await self.serve_connection(reader, writer, peer=peer)
            finally:
                self._connection_tasks.discard(task)

        listener = await asyncio.start_unix_server(on_connect, sock=sock)
        self._listeners.append((listener, _path))

    # -- shutdown ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop listening, cancel in-flight handlers, close every connection."""
        self._closed.set()
        for listener, path in self._listeners:
            listener.close()
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for conn in list(self._connections):
            conn.close()
        # serve_connection() callers finish as their read loops see the close.
        pending = list(self._connection_tasks)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for conn in list(self._connections):
            await conn.done.wait()
        for listener, _ in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "ttrpc: exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: a leftover from a dead process
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "ttrpc: a server already listens on", path)
