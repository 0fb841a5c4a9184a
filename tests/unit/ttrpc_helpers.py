"""Shared pieces for the ttrpc unit tests: a servicer for ttrpc.testing's service, a server on a
unix socket in a temp dir, and a raw-frame connection for protocol-level checks."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator

import ttrpc
from ttrpc.frame import Flags, Frame, FrameDecoder, MessageType, encode_frame
from ttrpc.request_pb2 import KeyValue, Request, Response
from ttrpc.testing import SERVICE, SERVICE_NAME, Msg


class Servicer:
    """Unary echoes (with optional sleep / error / block); streaming methods per their name."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()
        self.cancelled: list[str] = []
        self.contexts: list[ttrpc.CallContext] = []

    async def Unary(self, req, ctx):
        self.contexts.append(ctx)
        try:
            if req.text == "block":
                self.blocked.set()
                await self.release.wait()
            if req.sleep:
                await asyncio.sleep(req.sleep)
        except asyncio.CancelledError:
            self.cancelled.append(req.text)
            raise
        if req.code:
            raise ttrpc.error_from_status(req.code, f"asked for code {req.code}")
        if req.text == "none":
            return None
        return Msg(text=req.text, data=req.data,
                   total=len(ctx.metadata.get_all("k")))

    async def Server(self, stream, ctx):
        req = await stream.recv()
        for i in range(req.count):
            await stream.send(Msg(text=str(i), data=b"x" * req.size))
        if req.code:
            raise ttrpc.error_from_status(req.code, "stream failed on purpose")

    async def Client(self, stream, ctx):
        texts = []
        async for m in stream:
            texts.append(m.text)
        return Msg(text=",".join(texts), count=len(texts))

    async def Bidi(self, stream, ctx):
        async for m in stream:
            if m.text == "stall":  # stop reading: the client's messages pile up
                await asyncio.Event().wait()
            await stream.send(Msg(text=m.text.upper(), data=m.data))


@contextlib.asynccontextmanager
async def running_server(servicer=None, **server_kwargs) -> AsyncIterator[tuple[ttrpc.Server, str]]:
    tmp = tempfile.mkdtemp(prefix="ttrpc-test-")
    path = os.path.join(tmp, "ttrpc.sock")
    server = ttrpc.Server(**server_kwargs)
    server.register(SERVICE, servicer or Servicer())
    try:
        await server.serve_unix(path)
        yield server, path
    finally:
        await server.close()
        shutil.rmtree(tmp, ignore_errors=True)


class RawConnection:
    """Frames in, frames out: for checking the server's answers to malformed traffic."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, path: str) -> RawConnection:
        return cls(*await asyncio.open_unix_connection(path))

    async def send(self, sid: int, typ: int, flags: int = 0, data: bytes = b"") -> None:
        self.writer.write(encode_frame(sid, typ, flags, data))
        await self.writer.drain()

    async def request(self, sid: int, method: str = "Unary", msg=None, *, flags: int = 0,
                      service: str = SERVICE_NAME, timeout_nano: int = 0,
                      payload: bytes | None = None) -> None:
        if payload is None:
            payload = (msg if msg is not None else Msg()).SerializeToString()
        req = Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
        await self.send(sid, MessageType.REQUEST, flags, req.SerializeToString())

    async def recv(self, timeout: float = 10) -> Frame | None:
        """Next frame, None at EOF."""
        async with asyncio.timeout(timeout):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def response(self, timeout: float = 10) -> tuple[int, Response]:
        frame = await self.recv(timeout)
        assert frame is not None, "connection closed instead of a Response"
        assert frame.type == MessageType.RESPONSE, frame
        resp = Response()
        resp.ParseFromString(frame.data)
        return frame.stream_id, resp

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


__all__ = ["Flags", "KeyValue", "Msg", "RawConnection", "SERVICE", "SERVICE_NAME", "Servicer",
           "running_server"]
