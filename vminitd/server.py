"""Registers the guest API servicers on a ttrpc.Server, translating our AgentError into ttrpc
status errors and adapting streaming methods to ttrpc's stream objects.

The servicers and the agent behind them are built lazily: registering needs only the generated
service descriptors, so vminitd can answer the host's readiness ping before the agent's modules
(runc driver, bundles, stdio, network: about half a second of imports under TCG) are loaded.
`warm_up()` loads them right after; a request that needs them earlier loads them at once.
System.Ping never waits for them: it only says that the agent's loop answers.
"""
from __future__ import annotations

import asyncio
import functools
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import ttrpc

from spinbox.api._pb.spinbox.agent.v1 import containers_pb2, events_pb2, network_pb2, stdio_pb2, system_pb2

from .errors import AgentError
from .init import uptime

log = logging.getLogger(__name__)

# (generated module, service name) in registration order.
SERVICES = ((containers_pb2, "Containers"), (stdio_pb2, "Stdio"), (events_pb2, "Events"),
            (system_pb2, "System"), (network_pb2, "Network"))
# What warm_up() imports, one module per event-loop turn (leaves first, so that each turn is
# short and a request arriving meanwhile waits for one module at most); services() imports
# whatever is still missing.
WARM_UP_MODULES = ("json", "pathlib", "shutil", "ctypes", "termios", ".errors", ".ids", ".states", ".fdio",
                   ".events", ".stdio", ".cgroups", ".mounts", ".bundle", ".runc", ".agent", ".system",
                   ".service", ".network")
# warm_up() starts after the host's first ping or after this many seconds.
WARM_UP_IDLE_S = 0.5


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
    # fn(requests, send): it sends as it goes (see StdioService)
    async def handler(stream, ctx):
        try:
            await fn(_incoming(stream), stream.send)
        except AgentError as e:
            raise _ttrpc_error(e) from None
    return handler


def _late(resolve: Callable[[], Any], name: str):
    """The method `name` of the servicer that `resolve()` returns, looked up at call time."""
    def method(*args):
        return getattr(resolve(), name)(*args)
    return method


class _Adapter:
    """A servicer object for ttrpc.Server.register: each method of the service, wrapped, calls
    the same-named method of the servicer that `resolve()` returns, unless `own` has it."""

    def __init__(self, descriptor, resolve: Callable[[], Any], own: object = None) -> None:
        for m in descriptor.methods:
            fn = getattr(own, m.name, None) or _late(resolve, m.name)
            if m.client_streaming:
                wrapped = _bidi(fn)
            elif m.server_streaming:
                wrapped = _server_streaming(fn)
            else:
                wrapped = _unary(fn)
            setattr(self, m.name, wrapped)


class _Liveness:
    """System.Ping, answered without the agent: it is the host's readiness probe."""

    def __init__(self) -> None:
        self.pinged = asyncio.Event()

    async def Ping(self, request: containers_pb2.Empty) -> containers_pb2.Empty:
        self.pinged.set()
        return containers_pb2.Empty()


class AgentServer:
    """`make_agent()` builds the Agent; it runs once, on first need (see the module doc)."""

    def __init__(self, make_agent: Callable[[], Any], on_shutdown=None,
                 wrap: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None) -> None:
        self.agent = None
        self._make_agent = make_agent
        self._wrap = wrap          # the servicers, changed (a test's hostile agent, vminitd/hostile.py)
        self._on_shutdown = on_shutdown
        self._impls: dict[str, Any] | None = None
        self._liveness = _Liveness()
        self.server = ttrpc.Server()
        for module, name in SERVICES:
            desc = module.DESCRIPTOR.services_by_name[name]
            own = self._liveness if name == "System" else None
            self.server.register(desc, _Adapter(desc, functools.partial(self._servicer, name), own))

    def _servicer(self, name: str) -> Any:
        return self.services()[name]

    def services(self) -> dict[str, Any]:
        """The servicers by service name; the first call imports them and builds the agent."""
        if self._impls is None:
            from .network import NetworkService
            from .service import ContainersService, EventsService, StdioService, SystemService
            agent = self._make_agent()
            impls = {
                "Containers": ContainersService(agent),
                "Stdio": StdioService(agent),
                "Events": EventsService(agent),
                "System": SystemService(agent, self._on_shutdown),
                "Network": NetworkService(agent),
            }
            if self._wrap is not None:
                impls = self._wrap(impls, agent)
            for module, name in SERVICES:   # a missing method fails here, not on its first call
                for m in module.DESCRIPTOR.services_by_name[name].methods:
                    if not (name == "System" and hasattr(self._liveness, m.name)):
                        getattr(impls[name], m.name)
            self.agent, self._impls = agent, impls
            log.info(f"agent loaded in {uptime():.2f}s")
        return self._impls

    async def warm_up(self) -> None:
        """Load the servicers in the background: after the host's first ping (or a short idle
        wait), one module per loop turn, then build them. Raises what building raises."""
        try:
            await asyncio.wait_for(self._liveness.pinged.wait(), WARM_UP_IDLE_S)
        except asyncio.TimeoutError:
            pass
        for name in WARM_UP_MODULES:
            if self._impls is not None:
                return
            await asyncio.sleep(0)
            importlib.import_module(name, __package__)
        await asyncio.sleep(0)
        self.services()

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.server.serve_connection(reader, writer)
        except Exception as e:
            log.info(f"connection ended: {e!r}")

    async def serve_fd(self, fd: int) -> None:
        await self.server.serve_fd(fd)

    async def close(self) -> None:
        await self.server.close()
