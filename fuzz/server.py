"""Target `server`: a real ttrpc `Server` (ttrpc/server.py) serving a test service on one end of
a socketpair, fed hostile frames on the other: requests with bad service or method names, bad
protobuf, reused / even / zero stream ids, deadlines, metadata; data frames for unknown ids,
after the close, with data on a close; every flag combination; frames over the limit; raw
bytes; then EOF or an abrupt close.

Invariants: the connection ends once the peer is gone and every handler task with it (the
async harness checks that nothing is left); everything the server writes is a well-formed
frame within its limit, a parseable Response with a known status code or a Data frame on a
stream the peer opened; no response on a stream id the peer never used; at most one Response
per request; a well-formed unary echo request that is answered is answered with its echo.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ttrpc.frame import Flags, Frame, FrameDecoder, MessageType, Oversized, encode_header
from ttrpc.metadata import CallContext
from ttrpc.request_pb2 import Request, Response
from ttrpc.server import Server
from ttrpc.services import ServiceRegistry
from ttrpc.status import Code, error_from_status
from ttrpc.stream import ServerStream
from ttrpc.testing import SERVICE, SERVICE_NAME, Msg

from . import messages
from .data import Input
from .driver import AsyncHarness, Finding, Target
from .wire import RawPeer, connected_pair

METHODS = ("Unary", "Server", "Client", "Bidi", "Download", "Nope", "", "unary", "Unary\n")
SERVICES = (SERVICE_NAME, SERVICE_NAME, SERVICE_NAME, "", "ttrpc.testing.v1.Tes", SERVICE_NAME + "/x",
            "containerd.task.v2.Task")
MAX_DATA = (256, 4096)
MAX_SEND = 16                 # messages a streaming handler sends or takes, at most
KNOWN_CODES = frozenset(int(c) for c in Code)
QUIET_TURNS = 8               # loop turns that let handlers run before the next frames


class EchoServicer:
    """The test service without Download (its sender obeys the client's credit: a peer's
    "send me 2^64 bytes" is not a server bug). Each call does at most MAX_SEND steps."""

    async def Unary(self, request: Any, ctx: CallContext) -> Any:
        if request.code:
            raise error_from_status(_known(request.code), request.text[:64])
        return Msg(text=request.text, data=request.data)

    async def Server(self, stream: ServerStream, ctx: CallContext) -> None:
        first: Any = await stream.recv()
        if first is None:
            return
        for i in range(min(first.count, 4)):
            await stream.send(Msg(count=i))
        if first.code:
            raise error_from_status(_known(first.code), "asked to fail")

    async def Client(self, stream: ServerStream, ctx: CallContext) -> Any:
        n = 0
        async for _ in stream:
            n += 1
            if n >= MAX_SEND:
                break
        return Msg(count=n)

    async def Bidi(self, stream: ServerStream, ctx: CallContext) -> None:
        n = 0
        m: Any
        async for m in stream:
            await stream.send(Msg(text=m.text, data=m.data))
            n += 1
            if n >= MAX_SEND:
                return


@dataclass
class Sent:
    """What the peer sent, for the checks on what came back."""
    ids: set[int] = field(default_factory=set)            # every stream id on any frame
    streaming: set[int] = field(default_factory=set)      # ids of streaming requests
    echo: dict[int, Any] = field(default_factory=dict)    # id -> Msg of a well-formed unary echo
    last_request_id: int = 0                              # the server's last_stream_id, as it must be
    frames: int = 0


class ServerHarness(AsyncHarness):
    def __init__(self) -> None:
        super().__init__(time_bound_s=2.0)
        self.registries = {}
        for limit in MAX_DATA:
            reg = ServiceRegistry()
            reg.register(SERVICE, EchoServicer())
            self.registries[limit] = reg

    async def run(self, inp: Input) -> None:
        max_data = inp.pick(MAX_DATA)
        server = Server(self.registries[max_data], stream_buffer_messages=4, stream_buffer_bytes=512,
                        max_data=max_data)
        client_end, server_end = await connected_pair()
        serving = asyncio.create_task(server.serve_connection(server_end.reader, server_end.writer),
                                      name="fuzz-serve")
        peer = RawPeer(client_end, max_data=1 << 20)
        sent = Sent()
        next_id = 1
        try:
            for _ in range(inp.below(10) + 1):
                next_id = self._one_frame(inp, peer, sent, next_id, max_data)
                if inp.chance(3):
                    await peer.drain()
                    for _ in range(QUIET_TURNS):
                        await asyncio.sleep(0)
            if inp.chance(8):
                tail = inp.blob(24)             # a torn frame at the end, or whole ones
                sent.ids.update(ev.stream_id for ev in FrameDecoder(max_data).feed(tail))
                peer.send_raw(tail)
            await peer.drain()
            for _ in range(QUIET_TURNS):
                await asyncio.sleep(0)
            if inp.chance(6):
                peer.close()                    # gone at once: no more reads either
                got: list[Frame] = []
            else:
                peer.end_writes()
                got = await self._read_all(peer)
            await serving
        finally:
            peer.close()
            if not serving.done():
                serving.cancel()
        if server.connections:
            raise Finding(f"{server.connections} connection(s) still registered after the peer left")
        self._check(got, sent, max_data)

    def _one_frame(self, inp: Input, peer: RawPeer, sent: Sent, next_id: int, max_data: int) -> int:
        kind = inp.below(8)
        sid_kind = inp.below(8)
        if sid_kind <= 3:
            sid, next_id = next_id, next_id + 2             # the right next id
        elif sid_kind == 4:
            sid = max(1, next_id - 2)                        # reused
        elif sid_kind == 5:
            sid = next_id + 1                                # even
        elif sid_kind == 6:
            sid = inp.pick((0, (1 << 32) - 1, (1 << 31) + 1, 3))
        else:
            sid = inp.pick(sorted(sent.ids)) if sent.ids else 1
        flags = inp.pick((0, 0, Flags.REMOTE_CLOSED, Flags.REMOTE_OPEN, Flags.NO_DATA,
                          Flags.REMOTE_CLOSED | Flags.NO_DATA, Flags.REMOTE_OPEN | Flags.REMOTE_CLOSED))
        if inp.chance(8):
            flags = inp.byte()
        touched = sid in sent.ids         # an earlier frame on this id may have its own answer
        sent.ids.add(sid)
        sent.frames += 1
        sent.echo.pop(sid, None)          # a later frame on a unary call may fail it: no echo due
        if kind <= 3:                                        # a request
            req = Request(service=inp.pick(SERVICES), method=inp.pick(METHODS))
            if inp.chance(4):
                messages.fill(req, inp)                      # timeouts, metadata, anything
            payload = messages.hostile(Msg, inp)
            req.payload = payload
            data = req.SerializeToString() if not inp.chance(10) else messages.mutate(req.SerializeToString(), inp)
            if len(data) > max_data:
                if sid % 2 == 1 and sid > sent.last_request_id:
                    sent.last_request_id = sid
                peer.send_raw(encode_header(sid, MessageType.REQUEST, flags, len(data)) + data)
                return next_id
            peer.send(sid, MessageType.REQUEST, flags, data)
            if req.method in ("Server", "Client", "Bidi") and req.service == SERVICE_NAME:
                sent.streaming.add(sid)
            fresh = sid % 2 == 1 and sid > sent.last_request_id
            if fresh:
                sent.last_request_id = sid
            if (fresh and not touched and req.service == SERVICE_NAME and req.method == "Unary" and req.timeout_nano == 0
                    and flags in (0, Flags.REMOTE_CLOSED) and data == req.SerializeToString()):
                msg = _parse_msg(payload)
                if msg is not None and not msg.code:
                    sent.echo[sid] = msg
        elif kind <= 5:                                      # data on a stream
            data = messages.hostile(Msg, inp) if not flags & Flags.NO_DATA or inp.flag() else b""
            peer.send(sid, MessageType.DATA, flags, data[:max_data])
        elif kind == 6:                                      # oversized, its body (partly) follows
            length = max_data + 1 + inp.below(512)
            typ = inp.pick((MessageType.REQUEST, MessageType.DATA, MessageType.RESPONSE, 9))
            if typ == MessageType.REQUEST and sid % 2 == 1 and sid > sent.last_request_id:
                sent.last_request_id = sid        # the server takes the id of an oversized request too
            # the whole body: a torn one would swallow the frames after it (the torn tail is below)
            peer.send_raw(encode_header(sid, typ, flags, length) + b"\0" * length)
        else:                                                # a response or an unknown type
            peer.send(sid, inp.pick((MessageType.RESPONSE, 0, 4, 255)), flags, inp.blob(32))
        return next_id

    async def _read_all(self, peer: RawPeer) -> list[Frame]:
        got: list[Frame] = []
        while (ev := await peer.next_event()) is not None:
            if isinstance(ev, Oversized):
                raise Finding(f"server sent a frame of {ev.length} bytes")
            got.append(ev)
        return got

    def _check(self, got: list[Frame], sent: Sent, max_data: int) -> None:
        answered: set[int] = set()
        for f in got:
            if len(f.data) > max_data:
                raise Finding(f"server frame of {len(f.data)} bytes over its limit {max_data}")
            if f.stream_id not in sent.ids:
                raise Finding(f"server wrote on stream {f.stream_id}, which the peer never used")
            if f.type == MessageType.DATA:
                if f.stream_id not in sent.streaming:
                    raise Finding(f"data frame on stream {f.stream_id}, not a streaming call")
                continue
            if f.type != MessageType.RESPONSE:
                raise Finding(f"server wrote a frame of type {f.type}")
            resp = Response()
            try:
                resp.ParseFromString(f.data)
            except Exception as exc:
                raise Finding(f"unparseable response on stream {f.stream_id}: {exc}") from None
            if resp.status.code not in KNOWN_CODES:
                raise Finding(f"response with status code {resp.status.code}")
            expected = sent.echo.get(f.stream_id)
            if expected is not None:
                if f.stream_id in answered:
                    raise Finding(f"two responses to the unary request on stream {f.stream_id}")
                answered.add(f.stream_id)
                if resp.status.code != Code.OK:
                    raise Finding(f"echo on stream {f.stream_id} failed: {resp.status.code} {resp.status.message!r}")
                echo = _parse_msg(resp.payload)
                if echo is None or echo.text != expected.text or echo.data != expected.data:
                    raise Finding(f"echo on stream {f.stream_id} answered with something else")
        if len(got) > sent.frames * (MAX_SEND + 2):
            raise Finding(f"{len(got)} frames back for {sent.frames} sent")


def _known(code: int) -> int:
    """A handler's code (the peer's request picks it; an unknown one is the handler's bug)."""
    return code if code in KNOWN_CODES else int(Code.UNKNOWN)


def _parse_msg(data: bytes) -> Any:
    m = Msg()
    try:
        m.ParseFromString(data)
    except Exception:
        return None
    return m


def seeds() -> list[bytes]:
    return [b"", bytes(range(40)), b"\x00\x00\x00\x00\x00" * 12, b"\x01" * 60,
            b"\x00\x04\x00\x00\x00\x03\x01\x00\x01\x05\x02" * 5]


TARGET = Target("server", "ttrpc Server dispatch of hostile frames on a socketpair (test service)",
                ServerHarness, seeds, weight=1.0, time_bound_s=2.0, memory_bound_mb=32)
