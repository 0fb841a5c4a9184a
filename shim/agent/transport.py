"""The agent channel: the service names on it, opening it (a unix socket path, optionally
`unix:`-prefixed — the VM's virtio-serial chardev or a local `vminitd --listen unix:` — or a
vsock `(cid, port)` tuple), and `Channel`, the connection with its readiness probe."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Union

import ttrpc

from .errors import AgentUnavailable

log = logging.getLogger(__name__)

Address = Union[str, "os.PathLike[str]", tuple[int, int]]   # unix socket path, or (cid, port) for vsock

SVC_CONTAINERS = "spinbox.agent.v1.Containers"
SVC_STDIO = "spinbox.agent.v1.Stdio"
SVC_EVENTS = "spinbox.agent.v1.Events"
SVC_SYSTEM = "spinbox.agent.v1.System"
SVC_NETWORK = "spinbox.agent.v1.Network"

READ_LIMIT = 1 << 20             # asyncio stream buffer: a frame is read whole
STREAM_BUFFER_MESSAGES = 1024    # ttrpc per-stream receive buffer (readers drain at once)
PING_TIMEOUT_FIRST = 0.25        # readiness pings start short and grow (late bytes are normal)
PING_TIMEOUT_MAX = 3.0


async def open_channel(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the guest agent at `address`; OSError when nothing listens there yet."""
    if isinstance(address, tuple):
        cid, port = address
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (int(cid), int(port)))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=READ_LIMIT)
    path = os.fspath(address)
    if path.startswith("unix://"):
        path = path[len("unix://"):]
    elif path.startswith("unix:"):
        path = path[len("unix:"):]
    return await asyncio.open_unix_connection(path, limit=READ_LIMIT)


def describe(address: Address) -> str:
    """`address` for messages: vsock:<cid>:<port> or unix:<path>."""
    if isinstance(address, tuple):
        return f"vsock:{address[0]}:{address[1]}"
    return f"unix:{os.fspath(address)}"


class Channel:
    """The one connection to the guest agent.

    `stream_client()` hands out the live `ttrpc.Client`. The connection is made once (the
    readiness probe may drop and redo it while the guest opens its port); after that a lost
    connection is a lost VM: nothing reconnects. Stream ids continue across the probe's
    connections: on virtio-serial, frames the guest wrote for a previous connection may still
    arrive on the next one, and must not match a new call.
    """

    def __init__(self, address: Address, *, first_stream_id: int = 1) -> None:
        self.address = address
        self.client: ttrpc.Client | None = None
        self.closed = False
        self._changed = asyncio.Event()       # set and replaced whenever the connection changes
        self._next_stream_id = first_stream_id

    @property
    def next_stream_id(self) -> int:
        c = self.client
        return max(self._next_stream_id, c.next_stream_id if c is not None else 0)

    @property
    def connected(self) -> bool:
        return self.client is not None and not self.client.closed

    async def connect(self) -> None:
        reader, writer = await open_channel(self.address)
        self._install(ttrpc.Client(reader, writer, stream_buffer_messages=STREAM_BUFFER_MESSAGES,
                                   first_stream_id=self._next_stream_id))

    def _install(self, client: ttrpc.Client | None) -> None:
        old = self.client
        if old is not None:
            self._next_stream_id = max(self._next_stream_id, old.next_stream_id)
        self.client = client
        self._signal()

    def _signal(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def drop(self) -> None:
        """Close the current connection, if any."""
        client = self.client
        if client is None:
            return
        self._install(None)
        with contextlib.suppress(Exception):
            await client.close()

    async def close(self) -> None:
        """Close for good: `wait_closed()` returns, `stream_client()` raises AgentUnavailable."""
        self.closed = True
        await self.drop()
        self._signal()

    def stream_client(self) -> ttrpc.Client:
        """The connected client, for opening a stream; AgentUnavailable when there is none."""
        if self.closed:
            raise AgentUnavailable("agent client is closed")
        c = self.client
        if c is None or c.closed:
            raise AgentUnavailable(f"not connected to the guest agent at {describe(self.address)}")
        return c

    async def wait_closed(self) -> None:
        """Returns once `close()` was called."""
        while not self.closed:
            await self._changed.wait()

    async def wait_lost(self) -> None:
        """Returns once the connection made by the probe is gone: its client closed (the peer
        hung up, a send to a guest that stopped reading timed out and dropped it, a protocol
        error) or `close()` was called. Call it after the probe: nothing reconnects then."""
        while not self.closed:
            client = self.client
            if client is None or client.closed:
                return
            await client.wait_closed()

    async def probe(self, ping: Callable[[float], Awaitable[None]], deadline: float) -> None:
        """Connect (again) until `ping(timeout)` is answered or the deadline (a time.monotonic()
        value) passes; TimeoutError then names the last error."""
        last: BaseException | None = None
        ping_timeout = PING_TIMEOUT_FIRST
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"guest agent at {describe(self.address)} did not answer a ping "
                                   f"in time (last error: {last!r})")
            if self.client is None or self.client.closed:
                if self.client is not None:
                    await self.drop()
                try:
                    await self.connect()
                except (OSError, ValueError) as e:   # socket not there yet / refused
                    last = e
                    await asyncio.sleep(min(0.05, max(0.0, deadline - now)))
                    continue
            try:
                await ping(min(ping_timeout, max(0.01, deadline - time.monotonic())))
                return
            except ttrpc.DeadlineExceeded as e:
                # The guest may not have opened the port yet: bytes can be late or lost. Ask
                # again on a new stream id; a late answer to this one is dropped.
                last = e
                ping_timeout = min(ping_timeout * 1.5, PING_TIMEOUT_MAX)
            except AgentUnavailable as e:
                last = e
                await self.drop()
                await asyncio.sleep(0.05)
