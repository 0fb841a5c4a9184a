"""The guest API servicers: protobuf messages <-> Agent calls.

Unary methods are plain `async def Method(self, request) -> response`; streaming methods are
async generators over the incoming message iterator. AgentError subclasses carry the status
code; `wrap_errors` (applied at registration in server.py) turns them into ttrpc errors.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from ttrpc.stream import Encoded

from spinbox.api import contract
from spinbox.api.stdio_session import OutputChunk
from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import events_pb2 as epb
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb
from spinbox.api._pb.spinbox.agent.v1 import system_pb2 as sypb

from . import system as _system
from .agent import Agent
from .errors import InvalidArgument
from .ids import validate_hostname
from .stdio import serve_input, serve_output



class ContainersService:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def Create(self, req: cpb.CreateRequest) -> cpb.CreateResponse:
        mounts = [{"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}
                  for m in req.rootfs.mounts]
        shares = [{"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}
                  for m in req.shares]
        pid = await self.agent.create(req.id, req.spec, rootfs_path=req.rootfs.path, rootfs_mounts=mounts,
                                      readonly=req.rootfs.readonly, terminal=req.terminal, stdin=req.stdin,
                                      stdout=req.stdout, stderr=req.stderr, shares=shares)
        return cpb.CreateResponse(pid=pid)

    async def Start(self, req: cpb.StartRequest) -> cpb.StartResponse:
        return cpb.StartResponse(pid=await self.agent.start(req.id, req.exec_id))

    async def Exec(self, req: cpb.ExecRequest) -> cpb.Empty:
        await self.agent.exec(req.id, req.exec_id, req.process, terminal=req.terminal, stdin=req.stdin,
                              stdout=req.stdout, stderr=req.stderr)
        return cpb.Empty()

    async def Kill(self, req: cpb.KillRequest) -> cpb.Empty:
        await self.agent.kill(req.id, req.exec_id, req.signal, req.all)
        return cpb.Empty()

    async def Wait(self, req: cpb.WaitRequest) -> cpb.WaitResponse:
        status, at, pid = await self.agent.wait(req.id, req.exec_id)
        return cpb.WaitResponse(exit_status=status, exited_at_ns=at, pid=pid)

    async def Delete(self, req: cpb.DeleteRequest) -> cpb.DeleteResponse:
        pid, status, at = await self.agent.delete(req.id, req.exec_id)
        return cpb.DeleteResponse(pid=pid, exit_status=status, exited_at_ns=at)

    async def State(self, req: cpb.StateRequest) -> cpb.StateResponse:
        return cpb.StateResponse(**self.agent.state(req.id, req.exec_id))

    async def Pids(self, req: cpb.PidsRequest) -> cpb.PidsResponse:
        return cpb.PidsResponse(processes=[cpb.ProcessInfo(pid=p, exec_id=e) for p, e in await self.agent.pids(req.id)])

    async def Pause(self, req: cpb.ContainerRequest) -> cpb.Empty:
        await self.agent.pause(req.id)
        return cpb.Empty()

    async def Resume(self, req: cpb.ContainerRequest) -> cpb.Empty:
        await self.agent.resume(req.id)
        return cpb.Empty()

    async def Update(self, req: cpb.UpdateRequest) -> cpb.Empty:
        await self.agent.update(req.id, req.resources)
        return cpb.Empty()

    async def Stats(self, req: cpb.StatsRequest) -> cpb.StatsResponse:
        flat, raw = await self.agent.stats(req.id)
        return cpb.StatsResponse(raw=json.dumps(raw).encode(), **flat)

    async def CloseStdin(self, req: cpb.CloseStdinRequest) -> cpb.Empty:
        self.agent.close_stdin(req.id, req.exec_id)
        return cpb.Empty()

    async def ResizePty(self, req: cpb.ResizePtyRequest) -> cpb.Empty:
        self.agent.resize_pty(req.id, req.exec_id, req.width, req.height)
        return cpb.Empty()


class StdioService:
    """The two bidirectional stdio streams. Each method gets the host's messages and the
    stream's `send`, and runs one session (vminitd/stdio.py) that sends as it goes: no queue
    or task between the session and the wire (each costs per message under TCG)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def Output(self, requests: AsyncIterator[spb.OutputClient],
                     send: Callable[[Encoded], Awaitable[None]]) -> None:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("msg") != "open":
            raise InvalidArgument("Output stream must start with an open message")
        o = first.open
        if o.fd not in (spb.STDOUT, spb.STDERR):
            raise InvalidArgument("Output stream fd must be STDOUT or STDERR")
        buf = self.agent.output(o.id, o.exec_id, int(o.fd))

        async def acks() -> AsyncIterator[spb.OutputAck]:
            async for m in requests:
                if m.WhichOneof("msg") != "ack":
                    raise InvalidArgument("only ack messages may follow open on an Output stream")
                yield m.ack          # windows are clamped by the session itself

        async def send_chunk(chunk: OutputChunk) -> None:
            # in wire-form pieces: views of the output buffer, never joined (stdio_session)
            await send(Encoded(chunk.encode()))

        await serve_output(buf, o.offset, o.window, acks(), send_chunk)

    async def Input(self, requests: AsyncIterator[spb.InputClient],
                    send: Callable[[spb.InputServer], Awaitable[None]]) -> None:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("msg") != "open":
            raise InvalidArgument("Input stream must start with an open message")
        sink = self.agent.input(first.open.id, first.open.exec_id)

        async def data() -> AsyncIterator[spb.InputData]:
            async for m in requests:
                if m.WhichOneof("msg") != "data":
                    raise InvalidArgument("only data messages may follow open on an Input stream")
                yield m.data

        await serve_input(sink, data(), send)


class EventsService:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def Subscribe(self, req: epb.SubscribeRequest) -> AsyncIterator[epb.Event]:
        async for ev, gap in self.agent.events.follow(req.after_seq):
            msg = epb.Event(seq=ev.seq, timestamp_ns=ev.timestamp_ns, gap=gap)
            if ev.kind == "exit":
                msg.exit.CopyFrom(epb.ExitEvent(**ev.fields))
            elif ev.kind == "oom":
                msg.oom.CopyFrom(epb.OomEvent(**ev.fields))
            yield msg


class SystemService:
    def __init__(self, agent: Agent, on_shutdown=None) -> None:
        self.agent = agent
        self.on_shutdown = on_shutdown

    # Ping is answered by server.AgentServer itself (it must not wait for this module to load).

    async def Version(self, req: cpb.Empty) -> sypb.VersionResponse:
        return sypb.VersionResponse(agent_version=contract.version(), api="spinbox.agent.v1", runtime=self.agent.runc.binary)

    async def Info(self, req: cpb.Empty) -> sypb.InfoResponse:
        return sypb.InfoResponse(**_system.info())

    async def SetTime(self, req: sypb.SetTimeRequest) -> cpb.Empty:
        _system.set_time(req.unix_ns)
        return cpb.Empty()

    async def AddEntropy(self, req: sypb.AddEntropyRequest) -> cpb.Empty:
        _system.add_entropy(req.data)
        return cpb.Empty()

    async def SetHostname(self, req: sypb.SetHostnameRequest) -> cpb.Empty:
        socket.sethostname(validate_hostname(req.hostname))
        return cpb.Empty()

    async def Sync(self, req: cpb.Empty) -> cpb.Empty:
        await asyncio.get_running_loop().run_in_executor(None, os.sync)
        return cpb.Empty()

    async def Shutdown(self, req: sypb.ShutdownRequest) -> cpb.Empty:
        if self.on_shutdown is None:
            raise InvalidArgument("Shutdown is only available when vminitd is the VM's init")
        # Answer first, then power off: the reply must leave before the VM disappears.
        asyncio.get_running_loop().call_later(0.05, self.on_shutdown, req.reboot)
        return cpb.Empty()

    async def OnlineCpus(self, req: cpb.Empty) -> sypb.OnlineCpusResponse:
        return sypb.OnlineCpusResponse(**_system.online_cpus())

    async def SetOnlineCpus(self, req: sypb.SetOnlineCpusRequest) -> sypb.OnlineCpusResponse:
        return sypb.OnlineCpusResponse(**_system.set_online_cpus(req.online))

    async def OnlineMemory(self, req: cpb.Empty) -> sypb.OnlineMemoryResponse:
        return sypb.OnlineMemoryResponse(**_system.online_memory())
