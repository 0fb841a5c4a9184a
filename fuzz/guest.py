"""A hostile guest for the shim's agent client: a unix socket the real `AgentClient` connects to
(`AgentClient.connect`, the shim's own transport), whose other end is a `RawPeer` the harness
scripts frame by frame. One connection per input, so inputs do not depend on each other.

The socket lives in a temporary directory owned by `GuestLink`: `close()` removes it, and a
finalizer does too if the harness never got closed (a crashed run)."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
import weakref
from pathlib import Path

from ttrpc.frame import Frame, MessageType
from ttrpc.request_pb2 import Request, Response

from spinbox.shim.agent import AgentClient

from .wire import RawPeer, Streams

REQUEST_WAIT_S = 1.0         # how long the guest waits for the shim's next request


class GuestLink:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spinbox-fuzz-"))
        self.path = str(self.dir / "agent.sock")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)
        self._server: asyncio.AbstractServer | None = None
        self._accepted: asyncio.Queue[Streams] = asyncio.Queue()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._accepted.put(Streams(reader, writer))

    async def connect(self) -> tuple[AgentClient, RawPeer]:
        """A connected agent client and the guest's end of its connection."""
        if self._server is None:
            self._server = await asyncio.start_unix_server(self._on_connect, self.path)
        agent = await AgentClient.connect(self.path)
        try:
            streams = await asyncio.wait_for(self._accepted.get(), REQUEST_WAIT_S)
        except BaseException:
            await agent.close()
            raise
        return agent, RawPeer(streams)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._cleanup()


async def next_request(guest: RawPeer) -> tuple[Frame, Request] | None:
    """The shim's next request frame and its parsed Request (None: nothing came in time)."""
    while True:
        frame = await guest.next_frame(REQUEST_WAIT_S)
        if frame is None:
            return None
        if frame.type == MessageType.REQUEST:
            req = Request()
            req.ParseFromString(frame.data)      # the shim's own request: must parse
            return frame, req


def response(code: int, message: str, payload: bytes) -> bytes:
    resp = Response(payload=payload)
    if code:
        resp.status.code = code
        resp.status.message = message
    return resp.SerializeToString()
