"""Server and client over real sockets (unix socket, socketpair, pty): unary calls, concurrency,
deadlines, metadata, every protocol error rule, peer credentials, clean shutdown."""
from __future__ import annotations

import asyncio
import os
import pty
import shutil
import socket
import struct
import tempfile
import tty

import pytest

import ttrpc
from ttrpc.frame import MAX_DATA, MessageType
from ttrpc_helpers import SERVICE, SERVICE_NAME, Msg, RawConnection, Servicer, running_server


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_unary_call_and_stub_with_multimap_metadata():
    async with running_server() as (server, path):
        async with await ttrpc.connect_unix("unix://" + path) as client:
            resp = await client.call(SERVICE_NAME, "Unary", Msg(text="hi", data=b"\0\1"), Msg,
                                     metadata=[("K", "a"), ("k", "b")])
            assert (resp.text, resp.data, resp.total) == ("hi", b"\0\1", 2)
            stub = client.stub(SERVICE)
            assert (await stub.Unary(Msg(text="via stub"))).text == "via stub"


async def test_handler_sees_lower_cased_metadata_and_deadline():
    servicer = Servicer()
    async with running_server(servicer) as (_, path):
        async with await ttrpc.Client.connect(path) as client:
            await client.call(SERVICE_NAME, "Unary", Msg(), Msg, timeout=30,
                              metadata={"Containerd-Namespace-TTRPC": "default", "x": ["1", "2"]})
            await client.call(SERVICE_NAME, "Unary", Msg(), Msg)
    with_deadline, without = servicer.contexts
    assert with_deadline.metadata.get("containerd-namespace-ttrpc") == "default"
    assert with_deadline.metadata.get_all("X") == ["1", "2"]
    assert 0 < with_deadline.time_remaining() <= 30
    assert without.deadline is None and len(without.metadata) == 0
    assert with_deadline.full_method == f"/{SERVICE_NAME}/Unary"
    assert with_deadline.peer.uid == os.geteuid()


async def test_served_under_a_second_name():
    server = ttrpc.Server()
    servicer = Servicer()
    server.register(SERVICE, servicer)
    server.register(SERVICE, servicer, name="other.v3.Test")
    a, b = socket.socketpair()
    serving = asyncio.create_task(server.serve_connection(*await asyncio.open_unix_connection(sock=a)))
    client = await ttrpc.Client.from_socket(b)
    try:
        resp = await client.stub(SERVICE, name="other.v3.Test").Unary(Msg(text="v3"))
        assert resp.text == "v3"
    finally:
        await client.close()
        await server.close()
        await serving


async def test_blocked_call_does_not_stall_others_and_responses_come_in_completion_order():
    servicer = Servicer()
    async with running_server(servicer) as (_, path):
        async with await ttrpc.Client.connect(path) as client:
            blocked = asyncio.create_task(client.call(SERVICE_NAME, "Unary", Msg(text="block"), Msg))
            await servicer.blocked.wait()
            quick = await asyncio.gather(*(client.call(SERVICE_NAME, "Unary", Msg(text=str(i)), Msg)
                                           for i in range(20)))
            assert [r.text for r in quick] == [str(i) for i in range(20)]
            assert not blocked.done()
            servicer.release.set()
            assert (await blocked).text == "block"


async def test_client_timeout_bounds_the_wait_and_cancels_the_handler():
    servicer = Servicer()
    async with running_server(servicer) as (_, path):
        async with await ttrpc.Client.connect(path) as client:
            with pytest.raises(ttrpc.DeadlineExceeded):
                await client.call(SERVICE_NAME, "Unary", Msg(text="block"), Msg, timeout=0.2)
            # The server got timeout_nano and cancelled the handler on its side too.
            async with asyncio.timeout(10):
                while servicer.cancelled != ["block"]:
                    await asyncio.sleep(0.01)
            assert (await client.call(SERVICE_NAME, "Unary", Msg(text="after"), Msg)).text == "after"


async def test_server_enforces_timeout_nano_on_its_own():
    servicer = Servicer()
    async with running_server(servicer) as (_, path):
        raw = await RawConnection.open(path)
        try:
            await raw.request(1, msg=Msg(text="block"), timeout_nano=100_000_000)
            sid, resp = await raw.response()
            assert sid == 1 and resp.status.code == ttrpc.Code.DEADLINE_EXCEEDED
            assert servicer.cancelled == ["block"]
        finally:
            await raw.close()


@pytest.mark.parametrize("code", [ttrpc.Code.NOT_FOUND, ttrpc.Code.FAILED_PRECONDITION,
                                  ttrpc.Code.ALREADY_EXISTS, ttrpc.Code.UNAVAILABLE])
async def test_typed_errors_cross_the_wire(code):
    async with running_server() as (_, path):
        async with await ttrpc.Client.connect(path) as client:
            with pytest.raises(ttrpc.TTRPCError) as err:
                await client.call(SERVICE_NAME, "Unary", Msg(code=code), Msg)
    assert type(err.value) is ttrpc.status.ERROR_CLASSES[code]
    assert err.value.message == f"asked for code {int(code)}"


@pytest.mark.parametrize("exc,code", [(FileNotFoundError(2, "gone", "/x"), ttrpc.Code.NOT_FOUND),
                                      (PermissionError(13, "no"), ttrpc.Code.PERMISSION_DENIED),
                                      (RuntimeError("bug"), ttrpc.Code.UNKNOWN)])
async def test_plain_exceptions_are_mapped(exc, code):
    async def handler(request, ctx):
        raise exc
    server = ttrpc.Server()
    server.register_method("t.Svc", "M", handler, Msg)
    a, b = socket.socketpair()
    serving = asyncio.create_task(server.serve_connection(*await asyncio.open_unix_connection(sock=a)))
    client = await ttrpc.Client.from_socket(b)
    try:
        with pytest.raises(ttrpc.TTRPCError) as err:
            await client.call("t.Svc", "M", Msg(), Msg)
        assert err.value.code == code and str(exc) in err.value.message
    finally:
        await client.close()
        await server.close()
        await serving


async def test_unknown_service_and_method_and_missing_implementation():
    class Partial:
        async def Unary(self, req, ctx):
            return req
    async with running_server(Partial()) as (_, path):
        async with await ttrpc.Client.connect(path) as client:
            with pytest.raises(ttrpc.Unimplemented, match="service no.such.Svc"):
                await client.call("no.such.Svc", "Unary", Msg(), Msg)
            with pytest.raises(ttrpc.Unimplemented, match="method Nope"):
                await client.call(SERVICE_NAME, "Nope", Msg(), Msg)
            with pytest.raises(ttrpc.Unimplemented, match="method Server"):
                await client.call(SERVICE_NAME, "Server", Msg(), Msg)


async def test_handler_returning_none_is_internal():
    async with running_server() as (_, path):
        async with await ttrpc.Client.connect(path) as client:
            with pytest.raises(ttrpc.Internal, match="marshal called with nil"):
                await client.call(SERVICE_NAME, "Unary", Msg(text="none"), Msg)


async def test_protocol_error_rules_keep_the_connection_open():
    async with running_server() as (_, path):
        raw = await RawConnection.open(path)
        try:
            await raw.request(2)
            sid, resp = await raw.response()
            assert (sid, resp.status.code) == (2, ttrpc.Code.INVALID_ARGUMENT)
            assert resp.status.message == "StreamID must be odd for client initiated streams"

            await raw.request(5, msg=Msg(text="five"))
            assert (await raw.response())[1].status.code == ttrpc.Code.OK
            for reused in (5, 3):
                await raw.request(reused)
                sid, resp = await raw.response()
                assert (sid, resp.status.code) == (reused, ttrpc.Code.INVALID_ARGUMENT)
                assert resp.status.message == "StreamID cannot be re-used and must increment"

            await raw.request(7, payload=b"\xff\xff\xff")  # not a Msg
            sid, resp = await raw.response()
            assert (sid, resp.status.code) == (7, ttrpc.Code.INTERNAL)
            assert resp.status.message.startswith("ttrpc: error unmarshalling payload:")

            await raw.send(9, MessageType.REQUEST, 0, b"\xff\xff\xff")  # not a Request
            sid, resp = await raw.response()
            assert (sid, resp.status.code) == (9, ttrpc.Code.INVALID_ARGUMENT)
            assert resp.status.message.startswith("unmarshal request error")

            await raw.send(41, MessageType.DATA, 0, b"")
            sid, resp = await raw.response()
            assert (sid, resp.status.code) == (41, ttrpc.Code.INVALID_ARGUMENT)
            assert resp.status.message == "StreamID is no longer active"

            await raw.send(11, 0x42, 0, b"unknown type")  # ignored, no answer
            await raw.request(13, msg=Msg(text="still here"))
            sid, resp = await raw.response()
            assert (sid, resp.status.code) == (13, ttrpc.Code.OK)
            assert Msg.FromString(resp.payload).text == "still here"
        finally:
            await raw.close()


async def test_oversized_frame_answers_resource_exhausted_and_connection_survives():
    async with running_server() as (_, path):
        raw = await RawConnection.open(path)
        try:
            header = struct.pack(">IIBB", MAX_DATA + 1, 1, MessageType.REQUEST, 0)
            raw.writer.write(header + b"\0" * (MAX_DATA + 1))
            await raw.writer.drain()
            sid, resp = await raw.response()
            assert (sid, resp.status.code) == (1, ttrpc.Code.RESOURCE_EXHAUSTED)
            assert "exceed maximum message size" in resp.status.message
            await raw.request(3, msg=Msg(text="after"))
            sid, resp = await raw.response()
            assert (sid, resp.status.code) == (3, ttrpc.Code.OK)
        finally:
            await raw.close()


async def test_client_refuses_to_send_oversized_request():
    async with running_server() as (_, path):
        async with await ttrpc.Client.connect(path) as client:
            with pytest.raises(ttrpc.ResourceExhausted):
                await client.call(SERVICE_NAME, "Unary", Msg(data=b"\0" * MAX_DATA), Msg)
            assert (await client.call(SERVICE_NAME, "Unary", Msg(text="ok"), Msg)).text == "ok"


async def test_truncated_frame_closes_only_that_connection():
    async with running_server() as (server, path):
        async with await ttrpc.Client.connect(path) as good:
            raw = await RawConnection.open(path)
            raw.writer.write(b"\0\0\0\x20\0\0\0\1\1")  # half a header...
            raw.writer.write_eof()  # ...then EOF
            assert await raw.recv() is None  # the server closed it
            await raw.close()
            assert (await good.call(SERVICE_NAME, "Unary", Msg(text="fine"), Msg)).text == "fine"


async def test_pending_calls_fail_with_connection_closed():
    servicer = Servicer()
    async with running_server(servicer) as (server, path):
        client = await ttrpc.Client.connect(path)
        call = asyncio.create_task(client.call(SERVICE_NAME, "Unary", Msg(text="block"), Msg))
        await servicer.blocked.wait()
        await server.close()  # the peer goes away
        with pytest.raises(ttrpc.ConnectionClosed):
            await call
        assert servicer.cancelled == ["block"]
        await client.wait_closed()
        with pytest.raises(ttrpc.ConnectionClosed):
            await client.call(SERVICE_NAME, "Unary", Msg(), Msg)
        await client.close()

    servicer = Servicer()
    async with running_server(servicer) as (server, path):
        client = await ttrpc.Client.connect(path)
        call = asyncio.create_task(client.call(SERVICE_NAME, "Unary", Msg(text="block"), Msg))
        await servicer.blocked.wait()
        await client.close()  # local close
        with pytest.raises(ttrpc.ConnectionClosed):
            await call


async def _stream_ids_seen(calls: int, concurrent: bool, **client_kwargs) -> tuple[list[int], int]:
    """Stream ids the server saw for `calls` calls, and the client's next_stream_id after them."""
    seen = []

    async def record(request, ctx):
        seen.append(ctx.stream_id)
        return request
    server = ttrpc.Server()
    server.register_method("t.Svc", "M", record, Msg)
    a, b = socket.socketpair()
    serving = asyncio.create_task(server.serve_connection(*await asyncio.open_unix_connection(sock=a)))
    client = await ttrpc.Client.from_socket(b, **client_kwargs)
    try:
        if concurrent:
            await asyncio.gather(*(client.call("t.Svc", "M", Msg(), Msg) for _ in range(calls)))
        else:
            for _ in range(calls):
                await client.call("t.Svc", "M", Msg(), Msg)
        return seen, client.next_stream_id
    finally:
        await client.close()
        await server.close()
        await serving


async def test_ids_are_odd_and_increasing_on_the_wire():
    seen, _ = await _stream_ids_seen(50, concurrent=True)
    assert sorted(seen) == list(range(1, 101, 2))


async def test_first_stream_id_continues_a_previous_clients_ids():
    seen, next_id = await _stream_ids_seen(3, concurrent=False, first_stream_id=1001)
    assert seen == [1001, 1003, 1005] and next_id == 1007
    for bad in (0, 2, 1 << 32):
        r, w = socket.socketpair()
        with pytest.raises(ValueError, match="first_stream_id"):
            await ttrpc.Client.from_socket(r, first_stream_id=bad)
        r.close()
        w.close()


async def test_serve_fd_on_a_pty_character_device():
    """serve_fd/from_fd on one bidirectional character-device fd (as a virtio-serial port)."""
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    server = ttrpc.Server()
    server.register(SERVICE, Servicer())
    serving = asyncio.create_task(server.serve_fd(master))
    try:
        client = await ttrpc.Client.from_fd(slave)
        try:
            payload = bytes(range(256)) * 64
            resp = await client.stub(SERVICE).Unary(Msg(text="over a chardev", data=payload))
            assert resp.text == "over a chardev" and resp.data == payload
        finally:
            await client.close()
        await server.close()
        await asyncio.wait_for(serving, 10)
    finally:
        os.close(master)
        os.close(slave)


async def test_clean_close_leaves_no_tasks_and_no_fds():
    before_fds = _fds()
    servicer = Servicer()
    async with running_server(servicer) as (server, path):
        clients = [await ttrpc.Client.connect(path) for _ in range(3)]
        blocked = [asyncio.create_task(c.call(SERVICE_NAME, "Unary", Msg(text="block"), Msg))
                   for c in clients]
        await servicer.blocked.wait()
        assert server.connections == 3
        stream = await clients[0].stub(SERVICE).Bidi()
        await stream.send(Msg(text="x"))
        assert (await stream.recv()).text == "X"
    # server closed: in-flight handlers were cancelled, clients saw the connection close
    for task in blocked:
        with pytest.raises(ttrpc.ConnectionClosed):
            await task
    for c in clients:
        await c.close()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert _fds() == before_fds
    assert len(servicer.cancelled) == 3


async def test_stale_socket_file_is_replaced_and_live_one_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    server = ttrpc.Server()
    await server.serve_unix(path)
    try:
        with pytest.raises(OSError):
            await ttrpc.Server().serve_unix(path)
    finally:
        await server.close()
    assert not os.path.exists(path)


def _connect_as(uid: int, path: str) -> str:
    """Fork a child that drops to `uid`, connects and sends one Request; returns "EOF" if the
    server hung up without answering, "ANSWER" if it replied."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: plain syscalls only, never the parent's event loop
        result = b"ERROR"
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            req = b"\x0a\x01x\x12\x01y"  # a Request for service x, method y: any answer will do
            try:  # a server that hung up already shows as EPIPE / ECONNRESET
                s.sendall(struct.pack(">IIBB", len(req), 1, 1, 0) + req)
                data = s.recv(100)
            except (BrokenPipeError, ConnectionResetError):
                data = b""
            result = b"EOF" if data == b"" else b"ANSWER"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = f"ERROR {exc!r}".encode()
        finally:
            os.write(wfd, result)
            os._exit(0)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as r:
            return r.read().decode()
    finally:
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_require_same_user_rejects_other_uid():
    tmp = tempfile.mkdtemp(prefix="ttrpc-cred-")  # pytest's tmp_path is not reachable by others
    os.chmod(tmp, 0o755)
    path = os.path.join(tmp, "s.sock")
    server = ttrpc.Server()
    server.register(SERVICE, Servicer())
    await server.serve_unix(path, require_same_user=True, mode=0o777)
    try:
        assert await asyncio.to_thread(_connect_as, 65534, path) == "EOF"
        assert await asyncio.to_thread(_connect_as, os.geteuid(), path) == "ANSWER"
    finally:
        await server.close()
        shutil.rmtree(tmp)


async def test_handler_leaking_its_own_cancellation_still_gets_an_answer():
    async def handler(request, ctx):
        inner = asyncio.create_task(asyncio.sleep(60))
        inner.cancel()
        await inner  # raises CancelledError inside the handler, nobody cancelled the call
    server = ttrpc.Server()
    server.register_method("t.Svc", "M", handler, Msg)
    a, b = socket.socketpair()
    serving = asyncio.create_task(server.serve_connection(*await asyncio.open_unix_connection(sock=a)))
    client = await ttrpc.Client.from_socket(b)
    try:
        with pytest.raises(ttrpc.Cancelled):
            await client.call("t.Svc", "M", Msg(), Msg, timeout=10)
    finally:
        await client.close()
        await server.close()
        await serving
