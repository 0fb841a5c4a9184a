"""Registers the guest API servicers on a ttrpc.Server, translating our AgentError into ttrpc
status errors and adapting streaming methods to ttrpc's stream objects."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import ttrpc

from spinbox.api._pb.spinbox.agent.v1 import containers_pb2, events_pb2, network_pb2, stdio_pb2, system_pb2

from .agent import Agent
from .errors import AgentError
from .log import log
from .network import NetworkService
from .service import ContainersService, EventsService, StdioService, SystemService


def _ttrpc_error(e: AgentError) -> Exception:
    try:
        code = ttrpc.Code(e.code)
    except ValueError:
        code = ttrpc.Code.UNKNOWN
    return ttrpc.TTRPCError(code, str(e))


def _unary(fn):
    async def handler(request, ctx):
        try:
            return await fn(request)
        except AgentError as e:
            raise _ttrpc_error(e) from None
    return handler


async def _incoming(stream) -> AsyncIterator[Any]:
    while (msg := await stream.recv()) is not None:
        yield msg


def _server_streaming(fn):
    async def handler(stream, ctx):
        request = await stream.recv()
        try:
            async for msg in fn(request):
                await stream.send(msg)
        except AgentError as e:
            raise _ttrpc_error(e) from None
    return handler


def _bidi(fn):
    async def handler(stream, ctx):
        try:
            async for msg in fn(_incoming(stream)):
                await stream.send(msg)
        except AgentError as e:
            raise _ttrpc_error(e) from None
    return handler


class _Adapter:
    """A servicer object for ttrpc.Server.register built from our service object."""

    def __init__(self, descriptor, impl) -> None:
        for m in descriptor.methods:
            fn = getattr(impl, m.name)
            if m.client_streaming:
                wrapped = _bidi(fn)
            elif m.server_streaming:
                wrapped = _server_streaming(fn)
            else:
                wrapped = _unary(fn)
            setattr(self, m.name, wrapped)


class AgentServer:
    def __init__(self, agent: Agent, on_shutdown=None) -> None:
        self.agent = agent
        self.server = ttrpc.Server()
        services = (
            (containers_pb2, "Containers", ContainersService(agent)),
            (stdio_pb2, "Stdio", StdioService(agent)),
            (events_pb2, "Events", EventsService(agent)),
            (system_pb2, "System", SystemService(agent, on_shutdown)),
            (network_pb2, "Network", NetworkService(agent)),
        )
        for module, name, impl in services:
            desc = module.DESCRIPTOR.services_by_name[name]
            self.server.register(desc, _Adapter(desc, impl))

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.server.serve_connection(reader, writer)
        except Exception as e:
            log(f"connection ended: {e!r}")

    async def serve_fd(self, fd: int) -> None:
        await self.server.serve_fd(fd)

    async def close(self) -> None:
        await self.server.close()
