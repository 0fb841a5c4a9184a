"""What a stdio stream's reader gets when the guest ends the stream with an error status: the
guest's code, and its message sanitised and bounded, DEADLINE_EXCEEDED included (the fuzz
target `replies` found that unary calls passed that one through as the guest wrote it; the
streams did too until shim/agent/streams.py's _as_agent_error sanitised it)."""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile

import pytest

import ttrpc
from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb
from spinbox.shim.agent import AgentClient
from spinbox.shim.agent.validate import MAX_ERROR_MESSAGE

S = "spinbox.agent.v1.Stdio"
Y = "spinbox.agent.v1.System"
HOSTILE = "\x1b[2J\nforged log line\r" + "x" * 10_000


async def _ping(req, ctx):
    return cpb.Empty()


@pytest.fixture
async def guest_failing_streams():
    """A real ttrpc server as the guest; its Output and Input streams fail with the status
    the test sets on `failure`."""
    d = tempfile.mkdtemp(prefix="sbse-")
    path = os.path.join(d, "a.sock")
    failure: list[ttrpc.TTRPCError] = []

    async def fail(stream, ctx):
        await stream.recv()
        raise failure[0]

    server = ttrpc.Server()
    server.register_method(Y, "Ping", _ping, cpb.Empty)
    server.register_method(S, "Output", fail, spb.OutputClient, client_streaming=True, server_streaming=True)
    server.register_method(S, "Input", fail, spb.InputClient, client_streaming=True, server_streaming=True)
    await server.serve_unix(path)
    agent = await AgentClient.wait_ready(path, timeout=10)
    try:
        yield agent, failure
    finally:
        await agent.close()
        await server.close()
        shutil.rmtree(d, ignore_errors=True)


def _check_sanitised(e: ttrpc.TTRPCError) -> None:
    assert e.message.isprintable(), repr(e.message[:80])
    assert "\n" not in e.message and "\x1b" not in e.message
    assert len(e.message) < MAX_ERROR_MESSAGE + 100


@pytest.mark.parametrize("error", [ttrpc.DeadlineExceeded, ttrpc.NotFound, ttrpc.Internal])
async def test_output_stream_error_from_the_guest_is_sanitised(guest_failing_streams, error):
    agent, failure = guest_failing_streams
    failure.append(error(HOSTILE))
    out = agent.open_output("c1", "", 1)
    async with asyncio.timeout(10):
        with pytest.raises(error) as got:
            await out.read()
    _check_sanitised(got.value)
    assert "c1/init/stdout" in got.value.message
    await out.aclose()


async def test_input_stream_deadline_from_the_guest_is_sanitised(guest_failing_streams):
    agent, failure = guest_failing_streams
    failure.append(ttrpc.DeadlineExceeded(HOSTILE))
    inp = agent.open_input("c1")
    async with asyncio.timeout(10):
        with pytest.raises(ttrpc.DeadlineExceeded) as got:
            await inp.close()
    _check_sanitised(got.value)
    await inp.aclose()
