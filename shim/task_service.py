"""containerd's Task API (containerd.task.v2.Task and containerd.task.v3.Task) for one sandbox.

A thin service in the shape of containerd's runc shim: each RPC checks its ids, calls one
method of the container manager (shim.containers), publishes its event, and answers. Errors
leave through one decorator (shim.errors.maps_errors), so no handler picks a wire code.
Exits are not published here: they come from the guest and go out through shim.exits.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

from google.protobuf import empty_pb2

import ttrpc
from spinbox.api import contract
from spinbox.api import types as api_types
from spinbox.api._pb.containerd.cgroups.v2 import metrics_pb2
from spinbox.api._pb.containerd.events import task_pb2 as ev
from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.api._pb.containerd.types import mount_pb2
from spinbox.api._pb.containerd.types.runc.options import oci_pb2
from spinbox.api._pb.containerd.types.task import task_pb2

from . import monitor_service
from . import rootfs as rootfs_mod
from .agent import Stats
from .containers import ContainerManager
from .errors import InvalidArgument, Unimplemented, maps_errors
from .exits import TaskEvents, timestamp
from .process import StdioPaths

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace-ttrpc"


def check_id(value: str, what: str = "id") -> str:
    problem = contract.id_problem(value)
    if problem is not None:
        raise InvalidArgument(f"invalid {what} {value!r}: {problem}")
    return value


def _namespace(ctx: ttrpc.CallContext | None) -> str | None:
    return ctx.metadata.get(NAMESPACE_KEY) if ctx is not None else None



def cgroup_metrics(r: Stats) -> metrics_pb2.Metrics:
    """The guest's cgroup figures of a container (or a pod) as containerd's cgroups v2 Metrics,
    the type ctr and CRI decode (Stats here, SandboxMetrics in shim.sandbox_service)."""
    m = metrics_pb2.Metrics()
    m.cpu.usage_usec = r.cpu_usage_ns // 1000
    m.cpu.user_usec = r.cpu_user_ns // 1000
    m.cpu.system_usec = r.cpu_system_ns // 1000
    m.memory.usage = r.memory_usage_bytes
    m.memory.usage_limit = r.memory_limit_bytes
    m.pids.current = r.pids_current
    m.pids.limit = r.pids_limit
    m.memory_events.oom_kill = r.oom_kills
    return m

class TaskService:
    """One per shim daemon (sandbox). See the module docstring."""

    def __init__(self, manager: ContainerManager, events: TaskEvents, *,
                 request_exit: Callable[[], None] | None = None) -> None:
        self.manager = manager
        self.events = events
        self.request_exit = request_exit      # called once Shutdown decided the daemon may exit
        self.shutdown_done = asyncio.Event()
        self._shutting_down = False
        self._shutdown_task: asyncio.Task[None] | None = None

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def register(self, server: ttrpc.Server) -> None:
        """Serve as containerd.task.v2.Task and containerd.task.v3.Task (same messages)."""
        desc = shim_pb2.DESCRIPTOR.services_by_name["Task"]
        server.register(desc, self)
        server.register(desc, self, name=api_types.TASK_SERVICE_V3)

    @maps_errors
    async def Create(self, req: shim_pb2.CreateTaskRequest, ctx: ttrpc.CallContext) -> shim_pb2.CreateTaskResponse:
        id = check_id(req.id)
        if req.checkpoint or req.parent_checkpoint:
            raise Unimplemented("restoring from a checkpoint is not supported by a VM runtime")
        c = await self.manager.create(
            id, Path(req.bundle), StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal),
            [rootfs_mod.MountSpec.from_proto(m) for m in req.rootfs])
        self.events.bind(id, _namespace(ctx))
        await self.events.publish(id, "/tasks/create", ev.TaskCreate(
            container_id=id, bundle=req.bundle,
            rootfs=[mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
                    for m in req.rootfs],
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal),
            checkpoint=req.checkpoint, pid=c.init.pid))
        return shim_pb2.CreateTaskResponse(pid=c.init.pid)

    @maps_errors
    async def Start(self, req: shim_pb2.StartRequest, ctx: ttrpc.CallContext) -> shim_pb2.StartResponse:
        c = self.manager.get(req.id)
        p = c.process(req.exec_id)
        pid = await self.manager.start(c, p)
        if p.exec_id:
            await self.events.publish(c.id, "/tasks/exec-started",
                                      ev.TaskExecStarted(container_id=c.id, exec_id=p.exec_id, pid=pid))
        else:
            await self.events.publish(c.id, "/tasks/start", ev.TaskStart(container_id=c.id, pid=pid))
        self.manager.announced(p)
        return shim_pb2.StartResponse(pid=pid)

    @maps_errors
    async def Exec(self, req: shim_pb2.ExecProcessRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        c = self.manager.get(req.id)
        exec_id = check_id(req.exec_id, "exec id")
        await self.manager.exec(c, exec_id, StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal),
                                   req.spec)
        await self.events.publish(c.id, "/tasks/exec-added", ev.TaskExecAdded(container_id=c.id, exec_id=exec_id))
        return empty_pb2.Empty()

    @maps_errors
    async def Kill(self, req: shim_pb2.KillRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        c = self.manager.get(req.id)
        await self.manager.kill(c, c.process(req.exec_id), req.signal, req.all)
        return empty_pb2.Empty()

    @maps_errors
    async def Wait(self, req: shim_pb2.WaitRequest, ctx: ttrpc.CallContext) -> shim_pb2.WaitResponse:
        c = self.manager.get(req.id)
        info = await c.process(req.exec_id).wait()
        return shim_pb2.WaitResponse(exit_status=info.status, exited_at=timestamp(info.at_ns))

    @maps_errors
    async def Delete(self, req: shim_pb2.DeleteRequest, ctx: ttrpc.CallContext) -> shim_pb2.DeleteResponse:
        c = self.manager.get(req.id)
        p = c.process(req.exec_id)
        info = await self.manager.delete(c, p)
        if not p.exec_id:
            await self.events.publish(c.id, "/tasks/delete", ev.TaskDelete(
                container_id=c.id, pid=info.pid, exit_status=info.status, exited_at=timestamp(info.at_ns)))
            self.events.unbind(c.id)
        return shim_pb2.DeleteResponse(pid=info.pid, exit_status=info.status, exited_at=timestamp(info.at_ns))

    @maps_errors
    async def State(self, req: shim_pb2.StateRequest, ctx: ttrpc.CallContext) -> shim_pb2.StateResponse:
        c = self.manager.get(req.id)
        p = c.process(req.exec_id)
        r = shim_pb2.StateResponse(
            id=c.id, bundle=c.bundle, pid=p.pid, status=cast(task_pb2.Status, int(c.status_of(p))),
            stdin=p.stdio.stdin, stdout=p.stdio.stdout, stderr=p.stdio.stderr, terminal=p.stdio.terminal,
            exec_id=p.exec_id)
        if p.exit is not None:
            r.exit_status = p.exit.status
            r.exited_at.CopyFrom(timestamp(p.exit.at_ns))
        return r

    @maps_errors
    async def Pids(self, req: shim_pb2.PidsRequest, ctx: ttrpc.CallContext) -> shim_pb2.PidsResponse:
        c = self.manager.get(req.id)
        out = shim_pb2.PidsResponse()
        for pi in await self.manager.pids(c):
            info = task_pb2.ProcessInfo(pid=pi.pid)
            if pi.exec_id and pi.exec_id in c.execs:
                info.info.CopyFrom(api_types.pack_any(oci_pb2.ProcessDetails(exec_id=pi.exec_id)))
            out.processes.append(info)
        return out

    @maps_errors
    async def Pause(self, req: shim_pb2.PauseRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        c = self.manager.get(req.id)
        await self.manager.pause(c)
        await self.events.publish(c.id, "/tasks/paused", ev.TaskPaused(container_id=c.id))
        return empty_pb2.Empty()

    @maps_errors
    async def Resume(self, req: shim_pb2.ResumeRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        c = self.manager.get(req.id)
        await self.manager.resume(c)
        await self.events.publish(c.id, "/tasks/resumed", ev.TaskResumed(container_id=c.id))
        return empty_pb2.Empty()

    @maps_errors
    async def Checkpoint(self, req: shim_pb2.CheckpointTaskRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        raise Unimplemented("checkpoint is not supported by a VM runtime")

    @maps_errors
    async def Update(self, req: shim_pb2.UpdateTaskRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        c = self.manager.get(req.id)
        await self.manager.update(c, req.resources)
        return empty_pb2.Empty()

    @maps_errors
    async def Stats(self, req: shim_pb2.StatsRequest, ctx: ttrpc.CallContext) -> shim_pb2.StatsResponse:
        c = self.manager.get(req.id)
        m = cgroup_metrics(await self.manager.stats(c))
        if monitor_service.is_sandbox_task(self.manager, c.id):     # it stands for the whole VM
            vm = await monitor_service.vm_figures(self.manager)
            if vm is not None:
                monitor_service.apply_vm_figures(m, vm)
        return shim_pb2.StatsResponse(stats=api_types.pack_any(m))

    @maps_errors
    async def CloseIO(self, req: shim_pb2.CloseIORequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        c = self.manager.get(req.id)
        p = c.process(req.exec_id)
        if req.stdin:
            await self.manager.close_stdin(c, p)
        return empty_pb2.Empty()

    @maps_errors
    async def ResizePty(self, req: shim_pb2.ResizePtyRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        c = self.manager.get(req.id)
        await self.manager.resize_pty(c, c.process(req.exec_id), req.width, req.height)
        return empty_pb2.Empty()

    @maps_errors
    async def Connect(self, req: shim_pb2.ConnectRequest, ctx: ttrpc.CallContext) -> shim_pb2.ConnectResponse:
        c = self.manager.containers.get(req.id)
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0,
                                        version=contract.version())

    @maps_errors
    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        if self.manager.busy:
            return empty_pb2.Empty()            # still serving other containers
        if not self._shutting_down:
            self._shutting_down = True
            self.manager.closing = True      # no Create may start now
            # Answer first: containerd treats a closed connection as success, but a reply is nicer.
            self._shutdown_task = asyncio.ensure_future(self._shutdown())
        return empty_pb2.Empty()

    async def _shutdown(self) -> None:
        await asyncio.sleep(0)                  # answer first: the reply leaves before the stop
        try:
            await self.close()
        except Exception as e:
            log.warning("shutdown: %s", e)
        finally:
            self.shutdown_done.set()
            if self.request_exit is not None:
                try:
                    self.request_exit()
                except Exception as e:
                    log.warning("requesting the daemon exit: %s", e)

    async def close(self) -> None:
        """Stop the sandbox and the event follower (Shutdown, or the daemon exiting)."""
        await self.manager.close()
