"""containerd's shim Sandbox API (containerd.runtime.sandbox.v1.Sandbox), served beside the
Task API: what containerd 2.x calls when a CRI runtime table says `sandboxer = "shim"`.

A thin service like shim.task_service: each RPC checks its sandbox id, calls one method of the
pod sandbox (shim.pod_sandbox, which runs on the container manager), and answers; errors leave
through shim.errors.maps_errors. ShutdownSandbox answers first, then the daemon stops what is
left and exits (containerd then deletes the shim).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import ttrpc
from spinbox.api import types as api_types
from spinbox.api._pb.containerd.runtime.sandbox.v1 import sandbox_pb2 as sb_pb
from spinbox.api._pb.containerd.types import metrics_pb2 as types_metrics_pb2
from spinbox.api._pb.containerd.types import platform_pb2

from .errors import maps_errors
from .exits import timestamp
from .pod_sandbox import PodSandbox, guest_platform, pod_request
from .task_service import TaskService, cgroup_metrics

log = logging.getLogger(__name__)

SERVICE = "containerd.runtime.sandbox.v1.Sandbox"


class SandboxService:
    """One per shim daemon; the daemon's group id is the only sandbox it answers for."""

    def __init__(self, pod: PodSandbox, tasks: TaskService, *,
                 request_exit: Callable[[], None] | None = None) -> None:
        self.pod = pod
        self.tasks = tasks
        self.request_exit = request_exit
        self._exit_task: asyncio.Task[None] | None = None

    def register(self, server: ttrpc.Server) -> None:
        server.register(sb_pb.DESCRIPTOR.services_by_name["Sandbox"], self)

    @maps_errors
    async def CreateSandbox(self, req: sb_pb.CreateSandboxRequest,
                            ctx: ttrpc.CallContext) -> sb_pb.CreateSandboxResponse:
        self.pod.check(req.sandbox_id)
        await self.pod.create(pod_request(
            req.sandbox_id, req.bundle_path, req.netns_path,
            req.options if req.HasField("options") else None, dict(req.annotations), bool(req.rootfs)))
        return sb_pb.CreateSandboxResponse()

    @maps_errors
    async def StartSandbox(self, req: sb_pb.StartSandboxRequest, ctx: ttrpc.CallContext) -> sb_pb.StartSandboxResponse:
        self.pod.check(req.sandbox_id)
        pid, created_ns = await self.pod.start()
        return sb_pb.StartSandboxResponse(pid=pid, created_at=timestamp(created_ns))

    @maps_errors
    async def Platform(self, req: sb_pb.PlatformRequest, ctx: ttrpc.CallContext) -> sb_pb.PlatformResponse:
        self.pod.check(req.sandbox_id)
        os_name, arch = guest_platform()
        return sb_pb.PlatformResponse(platform=platform_pb2.Platform(os=os_name, architecture=arch))

    @maps_errors
    async def StopSandbox(self, req: sb_pb.StopSandboxRequest, ctx: ttrpc.CallContext) -> sb_pb.StopSandboxResponse:
        self.pod.check(req.sandbox_id)
        await self.pod.stop(float(req.timeout_secs))
        return sb_pb.StopSandboxResponse()

    @maps_errors
    async def WaitSandbox(self, req: sb_pb.WaitSandboxRequest, ctx: ttrpc.CallContext) -> sb_pb.WaitSandboxResponse:
        self.pod.check(req.sandbox_id)
        info = await self.pod.wait()
        return sb_pb.WaitSandboxResponse(exit_status=info.status, exited_at=timestamp(info.at_ns))

    @maps_errors
    async def SandboxStatus(self, req: sb_pb.SandboxStatusRequest,
                            ctx: ttrpc.CallContext) -> sb_pb.SandboxStatusResponse:
        self.pod.check(req.sandbox_id)
        st = self.pod.status(req.verbose)
        r = sb_pb.SandboxStatusResponse(sandbox_id=self.pod.id, pid=st.pid, state=st.state, info=st.info)
        if st.created_at_ns:
            r.created_at.CopyFrom(timestamp(st.created_at_ns))
        if st.exited_at_ns:
            r.exited_at.CopyFrom(timestamp(st.exited_at_ns))
        return r

    @maps_errors
    async def PingSandbox(self, req: sb_pb.PingRequest, ctx: ttrpc.CallContext) -> sb_pb.PingResponse:
        self.pod.check(req.sandbox_id)
        self.pod.ping()
        return sb_pb.PingResponse()

    @maps_errors
    async def ShutdownSandbox(self, req: sb_pb.ShutdownSandboxRequest,
                              ctx: ttrpc.CallContext) -> sb_pb.ShutdownSandboxResponse:
        self.pod.check(req.sandbox_id)
        await self.pod.shutdown()
        if self._exit_task is None:
            self._exit_task = asyncio.ensure_future(self._exit())
        return sb_pb.ShutdownSandboxResponse()

    async def _exit(self) -> None:
        await asyncio.sleep(0)                  # the reply leaves before the stop
        try:
            await self.tasks.close()            # whatever containerd left: pumps, rootfs, the VM
        except Exception as e:
            log.warning("sandbox shutdown: %s", e)
        finally:
            if self.request_exit is not None:
                self.request_exit()

    @maps_errors
    async def SandboxMetrics(self, req: sb_pb.SandboxMetricsRequest,
                             ctx: ttrpc.CallContext) -> sb_pb.SandboxMetricsResponse:
        self.pod.check(req.sandbox_id)
        m = cgroup_metrics(await self.pod.metrics())
        out = types_metrics_pb2.Metric(id=self.pod.id, data=api_types.pack_any(m))
        out.timestamp.GetCurrentTime()
        return sb_pb.SandboxMetricsResponse(metrics=out)
