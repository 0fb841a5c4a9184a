"""vminitd's lean start: the argument fast path, the ping answered before the agent loads, the
agent built once (by the first request that needs it, or by warm_up), a failed load ending
vminitd. Real AgentServer on a unix socket, driven by the shim's real AgentClient."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from spinbox.shim.agent import AgentClient
from spinbox.vminitd import main as vmain
from spinbox.vminitd import server as vserver
from spinbox.vminitd.agent import Agent
from spinbox.vminitd.reaper import Reaper


def test_no_arguments_give_the_parsers_defaults():
    fast = vars(vmain._parse([]))
    assert fast == vmain.DEFAULTS
    parsed = vars(vmain._parse(["kernel-word"]))      # goes through argparse, unknown words ignored
    assert parsed == fast
    custom = vars(vmain._parse(["--listen", "unix:/x", "--runc", "crun", "--drain-timeout", "2", "-v"]))
    assert custom == {**vmain.DEFAULTS, "listen": "unix:/x", "runc": "crun", "drain_timeout": 2.0,
                      "verbose": True}


@pytest.fixture
async def served(tmp_path):
    """An AgentServer whose make_agent records each build, listening on a unix socket."""
    built: list[Agent] = []

    def make_agent() -> Agent:
        agent = Agent(tmp_path / "state", Reaper())
        built.append(agent)
        return agent

    srv = vserver.AgentServer(make_agent)
    sock = tmp_path / "agent.sock"
    listener = await asyncio.start_unix_server(srv.handle_connection, path=str(sock))
    clients: list[AgentClient] = []

    async def connect() -> AgentClient:
        c = await AgentClient.wait_ready(sock, timeout=10)
        clients.append(c)
        return c

    try:
        yield srv, built, connect
    finally:
        for c in clients:
            await c.close()
        listener.close()
        await srv.close()


async def test_ping_answers_without_loading_the_agent(served):
    srv, built, connect = served
    client = await connect()                 # wait_ready pings
    await client.ping()
    assert built == [] and srv.agent is None
    v = await client.version()               # needs the agent: built now
    assert v.api == "spinbox.agent.v1" and v.runtime == "runc"
    assert len(built) == 1 and srv.agent is built[0]
    await client.info()
    await client.ping()
    assert len(built) == 1                   # once


async def test_warm_up_waits_for_the_first_ping_then_builds_the_agent(served):
    srv, built, connect = served
    warm = asyncio.ensure_future(srv.warm_up())
    await asyncio.sleep(vserver.WARM_UP_IDLE_S / 5)
    assert built == [] and not warm.done()   # no ping yet, idle wait not over
    await connect()
    await asyncio.wait_for(warm, 30)
    assert len(built) == 1 and srv.agent is built[0]
    assert set(srv.services()) == {"Containers", "Stdio", "Events", "System", "Network"}
    assert len(built) == 1


async def test_warm_up_without_a_ping_starts_after_the_idle_wait(served, monkeypatch):
    srv, built, _ = served
    monkeypatch.setattr(vserver, "WARM_UP_IDLE_S", 0.01)
    await asyncio.wait_for(srv.warm_up(), 30)
    assert len(built) == 1


async def test_warm_up_raises_what_building_the_agent_raises():
    def broken():
        raise OSError(30, "Read-only file system: '/run/spinbox'")

    srv = vserver.AgentServer(broken)
    with pytest.raises(OSError, match="Read-only"):
        await asyncio.wait_for(srv.warm_up(), 30)
    assert srv.agent is None
    await srv.close()


def test_vminitd_ends_when_the_agent_cannot_load(tmp_path):
    """A state dir that cannot exist (under a file): vminitd listens, then fails loading the
    agent and exits non-zero instead of serving without one."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    sock = tmp_path / "agent.sock"
    proc = subprocess.run([sys.executable, "-m", "spinbox.vminitd.main", "--listen", f"unix:{sock}",
                           "--state-dir", str(blocker / "state")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "ready in" in proc.stderr and "the agent failed to load" in proc.stderr, proc.stderr
    assert "NotADirectoryError" in proc.stderr, proc.stderr
    assert not sock.exists()                 # the listener's socket is removed on the way out


# ----------------------------------------------------------------------------- System.AddEntropy

async def test_add_entropy_is_validated_and_ignored_outside_a_vm(served, monkeypatch):
    """Served by the real SystemService: 1..512 bytes, else InvalidArgument; a vminitd that is
    not PID 1 (this one runs on the test host, maybe as root) never touches the host's RNG."""
    import ttrpc
    from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
    from spinbox.api._pb.spinbox.agent.v1 import system_pb2 as sypb
    from spinbox.vminitd import system as vsystem

    touched: list[object] = []
    monkeypatch.setattr(vsystem, "_feed_kernel", lambda *a: touched.append(a))
    srv, built, connect = served
    client = await connect()
    await client.add_entropy(b"\x00" * 64)
    await client.add_entropy(b"\xff" * vsystem.MAX_ENTROPY_BYTES)

    async def raw(data: bytes):
        return await client._unary("spinbox.agent.v1.System", "AddEntropy", sypb.AddEntropyRequest(data=data),
                                   cpb.Empty, 10)
    for bad, match in ((b"", "no entropy"), (b"x" * 513, "513 entropy bytes")):
        with pytest.raises(ttrpc.InvalidArgument, match=match):
            await raw(bad)
    assert touched == []


def test_add_entropy_as_pid1_credits_and_reseeds(monkeypatch):
    """As the VM's init: RNDADDENTROPY with struct rand_pool_info (bits, bytes, data), then
    RNDRESEEDCRNG, on /dev/random; the fd is closed. (os.open/ioctl faked: the host's RNG is
    never touched.)"""
    import struct

    from spinbox.vminitd import errors as verrors
    from spinbox.vminitd import system as vsystem

    calls: list[tuple] = []
    monkeypatch.setattr(vsystem.os, "open", lambda path, flags: calls.append(("open", path)) or 99)
    monkeypatch.setattr(vsystem.os, "close", lambda fd: calls.append(("close", fd)))
    monkeypatch.setattr(vsystem.fcntl, "ioctl", lambda fd, req, *arg: calls.append(("ioctl", fd, req, *arg)))
    data = bytes(range(64))
    assert vsystem.add_entropy(data, pid1=True) is True
    assert calls == [("open", "/dev/random"),
                     ("ioctl", 99, vsystem.RNDADDENTROPY, struct.pack("ii", 512, 64) + data),
                     ("ioctl", 99, vsystem.RNDRESEEDCRNG),
                     ("close", 99)]
    assert (vsystem.RNDADDENTROPY, vsystem.RNDRESEEDCRNG) == (0x40085203, 0x5207)
    calls.clear()
    assert vsystem.add_entropy(data, pid1=False) is False and calls == []
    with pytest.raises(verrors.InvalidArgument):
        vsystem.add_entropy(b"", pid1=True)
    assert calls == []
