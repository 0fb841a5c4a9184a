"""A small service built at runtime (no .proto file) for tests and the benchmark.

Service `ttrpc.testing.v1.Test`, one message type `Msg` used in every direction:
  Unary(Msg) -> Msg;  Server(Msg) -> stream Msg;  Client(stream Msg) -> Msg;
  Bidi(stream Msg) -> stream Msg;  Download(stream Msg) -> stream Msg (credit flow control).
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory

from .flow import SendWindow
from .metadata import CallContext
from .stream import ServerStream

PACKAGE = "ttrpc.testing.v1"
SERVICE_NAME = f"{PACKAGE}.Test"


def _build() -> tuple[Any, descriptor.ServiceDescriptor, descriptor.FileDescriptor]:
    # Msg is typed Any: its fields exist only at run time, so a type checker cannot know them.
    fdp = descriptor_pb2.FileDescriptorProto(name="ttrpc/testing/v1/test.proto", package=PACKAGE,
                                             syntax="proto3")
    msg = fdp.message_type.add(name="Msg")
    F = descriptor_pb2.FieldDescriptorProto
    for number, (name, typ) in enumerate([
        ("text", F.TYPE_STRING),
        ("data", F.TYPE_BYTES),
        ("credit", F.TYPE_UINT64),   # a flow-control grant (Download)
        ("sleep", F.TYPE_DOUBLE),    # seconds the handler sleeps
        ("code", F.TYPE_INT32),      # a status code the handler raises
        ("count", F.TYPE_UINT32),    # messages to send back
        ("size", F.TYPE_UINT32),     # bytes per message / total bytes
        ("total", F.TYPE_UINT64),
    ], start=1):
        msg.field.add(name=name, number=number, type=typ, label=F.LABEL_OPTIONAL)
    svc = fdp.service.add(name="Test")
    t = f".{PACKAGE}.Msg"
    for name, cs, ss in [("Unary", False, False), ("Server", False, True),
                         ("Client", True, False), ("Bidi", True, True), ("Download", True, True)]:
        svc.method.add(name=name, input_type=t, output_type=t, client_streaming=cs,
                       server_streaming=ss)
    pool = descriptor_pool.DescriptorPool()
    file = pool.AddSerializedFile(fdp.SerializeToString())
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Msg")),
            pool.FindServiceByName(SERVICE_NAME), file)


Msg, SERVICE, FILE = _build()


async def download(stream: ServerStream, ctx: CallContext) -> None:
    """Download: the first message asks for `total` bytes in `size`-byte chunks with an initial
    window `credit`; later client messages carry credit grants. The server never sends beyond
    the credits, so a client that stops reading stalls only this stream."""
    first: Any = await stream.recv()  # a Msg (fields known at run time only)
    if first is None:
        return
    window = SendWindow(first.credit)
    chunk = first.size or 64 * 1024

    async def read_grants() -> None:
        # The client may close its send side once it has granted enough: keep sending.
        m: Any
        async for m in stream:
            window.grant(m.credit)

    grants = asyncio.create_task(read_grants())
    try:
        remaining = first.total
        payload = b"x" * chunk
        while remaining > 0:
            n = await window.acquire(min(chunk, remaining), partial=True)
            await stream.send(Msg(data=payload[:n]))
            remaining -= n
    finally:
        grants.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await grants


class BenchServicer:
    async def Unary(self, request: Any, ctx: CallContext) -> Any:
        return request

    Download = staticmethod(download)
