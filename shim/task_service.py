"""containerd's Task API (containerd.task.v2.Task and containerd.task.v3.Task) for one sandbox.

The shim is a checking proxy: every RPC validates against the host-side process state
(`shim.process`), forwards to the guest agent (spinbox.agent.v1.Containers) and keeps the
host side (rootfs mounts, shares, containerd's FIFOs, events) in step. Exits come from the
agent's event stream and go out through `ExitSequencer`, which keeps containerd's order:
create -> start -> exec-added -> exec-started -> exits (execs before init) -> delete, and a
process's /tasks/exit only once its output is in the FIFOs.

Hooks: `build_services(server, ctx)` is what shim/daemon.py calls (VM sandbox, its ShimContext);
`register(server, runtime_ctx)` is the general form (any sandbox factory; tests use LocalSandbox).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

import ttrpc
from spinbox.api import types as api_types
from spinbox.api._pb.containerd.cgroups.v2 import metrics_pb2
from spinbox.api._pb.containerd.events import task_pb2 as ev
from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.api._pb.containerd.types import mount_pb2
from spinbox.api._pb.containerd.types.runc.options import oci_pb2
from spinbox.api._pb.containerd.types.task import task_pb2

from . import binds as binds_mod
from . import rootfs as rootfs_mod
from .network.lifecycle import NetworkSetupError
from . import spec as spec_mod
from .process import Container, ExitInfo, ExitSequencer, Process, Status, StdioPaths
from .sandbox import Sandbox, SandboxHolder
from .stdio import AgentInput, AgentOutput, ProcessIO

log = logging.getLogger("spinbox.shim.task")

VERSION = "0.1.0"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,75}$")   # the agent's id rule
PID_MAX = 1 << 22                                           # Linux's pid_max ceiling
STDOUT, STDERR = 1, 2


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(ns))
    return t


def _check_id(value: str, what: str = "id") -> str:
    if not _ID_RE.match(value or ""):
        raise ttrpc.InvalidArgument(f"invalid {what} {value!r}: must match {_ID_RE.pattern}")
    return value


def _guest_exit(pid: int, status: int, at_ns: int) -> ExitInfo:
    # The guest is untrusted: clamp to what containerd can represent; a missing time is now.
    status = status if 0 <= status <= 255 else 255
    now = time.time_ns()
    at = at_ns if 0 < at_ns <= now + 60 * 10**9 else now
    return ExitInfo(pid if 0 <= pid < PID_MAX else 0, status, at)


def _json_any(value: any_pb2.Any, expected_url: str, what: str) -> bytes:
    name = value.type_url.rsplit("/", 1)[-1] if value.type_url else ""
    if name and name != expected_url.rsplit("/", 1)[-1]:
        raise ttrpc.InvalidArgument(f"{what}: unexpected type_url {value.type_url!r} (want {expected_url})")
    spec_mod.parse_json_object(value.value, what)   # refuse non-JSON before it reaches the guest
    return value.value


class TaskService:
    """One per shim daemon (sandbox). See the module docstring."""

    def __init__(self, sandboxes: SandboxHolder, publisher, *, namespace: str = "default",
                 state=None, request_exit=None, drain_timeout: float = 30.0,
                 agent_timeout: float = 60.0) -> None:
        self.sandboxes = sandboxes
        self.publisher = publisher
        self.namespace = namespace
        self.state = state                    # shim.state.State (crash-safe records), optional
        self.request_exit = request_exit      # called once Shutdown decided the daemon may exit
        self.drain_timeout = drain_timeout
        self.agent_timeout = agent_timeout
        self.containers: dict[str, Container] = {}
        self._namespaces: dict[str, str] = {}
        self._creating: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._events_task: asyncio.Task | None = None
        self._event_seq = 0
        self.shutting_down = False
        self.shutdown_done = asyncio.Event()
        sandboxes.on_started.append(self._sandbox_started)

    # --- helpers ----------------------------------------------------------------------------

    def _container(self, id: str) -> Container:
        c = self.containers.get(id)
        if c is None:
            raise ttrpc.NotFound(f"container {id!r} not created")
        return c

    def _lock(self, id: str) -> asyncio.Lock:
        return self._locks.setdefault(id, asyncio.Lock())

    def _ns(self, ctx) -> str:
        ns = ctx.metadata.get(NAMESPACE_KEY) if ctx is not None else None
        return ns or self.namespace

    async def _publish(self, container_id: str, topic: str, msg) -> None:
        ns = self._namespaces.get(container_id, self.namespace)
        try:
            r = self.publisher.publish(ns, topic, msg)
            if inspect.isawaitable(r):
                await r
        except Exception as e:
            log.warning("publishing %s for %s failed: %s", topic, container_id, e)

    async def _sandbox(self) -> Sandbox:
        sb = self.sandboxes.sandbox
        if sb is None:
            raise ttrpc.FailedPrecondition("the sandbox is not running")
        return sb

    async def _agent(self):
        """The sandbox's shim.agent.AgentClient (typed, validated calls)."""
        return (await self._sandbox()).agent_client

    def _record_task(self, id: str, **info: Any) -> None:
        if self.state is not None:
            try:
                self.state.set_task(id, **info)
            except Exception as e:
                log.warning("recording task %s: %s", id, e)

    # --- guest events -----------------------------------------------------------------------

    def _sandbox_started(self, sb: Sandbox) -> None:
        self._events_task = asyncio.ensure_future(self._follow_events(sb))

    async def _follow_events(self, sb: Sandbox) -> None:
        """Exits and OOMs from the agent until the sandbox is lost (then every live process is
        reported exited). The event stream itself may wait forever for a reconnect of a dead
        VM's channel, so it is raced against `sb.lost`, the VM layer's verdict."""
        follow = asyncio.ensure_future(self._consume_events(sb))
        lost = asyncio.ensure_future(sb.lost.wait())
        try:
            await asyncio.wait([follow, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (follow, lost):
                t.cancel()
            await asyncio.gather(follow, lost, return_exceptions=True)
        if not self.shutting_down:
            await self._sandbox_lost()

    async def _consume_events(self, sb: Sandbox) -> None:
        """Resubscribes after a hiccup (no event is lost: the agent keeps a ring and we ask for
        everything after the last seq we saw)."""
        while not sb.lost.is_set() and sb.agent is not None:
            try:
                async for e in sb.agent.events(after_seq=self._event_seq):
                    self._on_guest_event(e)
                return          # the agent client was closed
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if sb.lost.is_set():
                    return
                log.warning("agent event stream failed (%s); resubscribing", e)
                await asyncio.sleep(0.5)

    def _on_guest_event(self, e) -> None:
        """One shim.agent.AgentEvent (already validated by the agent client)."""
        if e.seq <= self._event_seq:
            return                     # replay after a resubscribe
        self._event_seq = e.seq
        if e.gap:
            log.warning("agent event ring overflowed: some events were lost before seq %d", e.seq)
        if e.kind == "exit":
            x = e
            c = self.containers.get(x.id)
            if c is None:
                return
            p = c.execs.get(x.exec_id) if x.exec_id else c.init
            if p is None or p.deleted:
                return
            if p.pid and x.pid and x.pid != p.pid:
                log.warning("agent reported exit of pid %d for %s (pid %d): ignored", x.pid, p.name, p.pid)
                return
            c.sequencer.submit(p, _guest_exit(x.pid or p.pid, x.exit_status, x.exited_at_ns))
        elif e.kind == "oom":
            if e.id in self.containers:
                asyncio.ensure_future(self._publish(e.id, "/tasks/oom", ev.TaskOOM(container_id=e.id)))

    async def _sandbox_lost(self) -> None:
        """The agent is gone (VM died): every process that has not exited is reported as
        exited with containerd's "unknown" status, so Wait returns and containerd can clean up.
        Their output streams can never end now: they are closed first (containerd's readers
        see EOF) so the exits do not wait for a drain that cannot happen."""
        log.error("sandbox lost: reporting every live process as exited (status %d)",
                  ExitInfo.unknown(0).status)
        for c in list(self.containers.values()):
            for p in [*c.execs.values(), c.init]:
                if p.io is not None and not p.exited:
                    await p.io.close()
        for c in self.containers.values():
            for p in [*c.execs.values(), c.init]:
                if not p.exited and not p.exit_arrived and not p.deleted:
                    if p.pid:
                        p.start_published.set()
                    c.sequencer.submit(p, ExitInfo.unknown(p.pid))

    async def _publish_exit(self, p: Process, info: ExitInfo) -> None:
        if not p.exec_id:
            self._record_task(p.container_id, pid=info.pid, exit_status=info.status)
        await self._publish(p.container_id, "/tasks/exit", ev.TaskExit(
            container_id=p.container_id, id=p.event_id, pid=info.pid, exit_status=info.status,
            exited_at=_ts(info.at_ns)))

    @staticmethod
    async def _drain(p: Process, timeout: float) -> bool:
        return True if p.io is None else await p.io.drained(timeout)

    # --- stdio ------------------------------------------------------------------------------

    async def _attach_outputs(self, sb: Sandbox, p: Process) -> None:
        io: ProcessIO = p.io
        for which, fd in (("stdout", STDOUT), ("stderr", STDERR)):
            if io.wanted()[which]:
                io.start_output(which, AgentOutput(sb.agent_client.open_output(p.container_id, p.exec_id, fd)))

    async def _attach_input(self, sb: Sandbox, p: Process) -> None:
        io: ProcessIO = p.io
        if io.wanted()["stdin"]:
            io.start_input(AgentInput(sb.agent_client.open_input(p.container_id, p.exec_id)))

    # --- RPCs -------------------------------------------------------------------------------

    async def Create(self, req: shim_pb2.CreateTaskRequest, ctx) -> shim_pb2.CreateTaskResponse:
        id = _check_id(req.id)
        if self.shutting_down:
            raise ttrpc.FailedPrecondition("the shim is shutting down")
        if id in self.containers or id in self._creating:
            raise ttrpc.AlreadyExists(f"container {id} already exists")
        if req.checkpoint or req.parent_checkpoint:
            raise ttrpc.Unimplemented("restoring from a checkpoint is not supported by a VM runtime")
        self._creating.add(id)
        undo: list = []
        try:
            bundle = Path(req.bundle)
            try:
                spec = spec_mod.load_spec(bundle / "config.json")
                binds = spec_mod.plan_binds(spec)
            except spec_mod.SpecError as e:
                raise ttrpc.InvalidArgument(str(e)) from None
            stdio = StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal)
            c = Container(id, str(bundle), stdio)

            mounts = [rootfs_mod.MountSpec.from_proto(m) for m in req.rootfs]
            rootfs_path = str(bundle / "rootfs")
            if mounts and self.state is not None:
                self.state.record("mount", rootfs_path, owner=id, path=rootfs_path)
            try:
                c.rootfs = await rootfs_mod.mount_rootfs(bundle, mounts)
            except rootfs_mod.RootfsError as e:
                if mounts and self.state is not None:
                    self.state.forget("mount", rootfs_path)
                raise ttrpc.FailedPrecondition(f"rootfs of {id}: {e}") from None
            undo.append(lambda: self._release_rootfs(c))

            try:
                sb = await self.sandboxes.get(spec)
            except NetworkSetupError as e:
                raise ttrpc.FailedPrecondition(str(e)) from None
            undo.append(lambda: sb.unshare(id))
            guest_root = await sb.share_rootfs(id, c.rootfs.path)
            try:
                shared = await sb.share_binds(id, binds)
            except binds_mod.BindError as e:
                raise ttrpc.FailedPrecondition(f"{id}: {e}") from None
            try:
                adapted, notes = spec_mod.adapt_spec(spec, rootfs=guest_root.path or "rootfs",
                                                     shared=shared.sources, terminal=req.terminal)
            except spec_mod.SpecError as e:
                raise ttrpc.InvalidArgument(str(e)) from None
            for n in notes:
                log.info("%s: %s", id, n)

            io = ProcessIO(id)
            c.init.io = io
            undo.append(io.close)
            io.open_fifos(req.stdin, req.stdout, req.stderr, req.terminal)
            want = io.wanted()
            agent = sb.agent_client
            pid = await agent.create(
                id, spec_mod.to_json(adapted), rootfs_path=guest_root.path, rootfs_mounts=guest_root.mounts,
                readonly=guest_root.readonly, terminal=req.terminal, stdin=want["stdin"],
                stdout=want["stdout"], stderr=want["stderr"], shares=shared.mounts, timeout=self.agent_timeout)
            undo.append(lambda: agent.delete(id, timeout=self.agent_timeout))
            c.init.pid = pid
            c.sequencer = ExitSequencer(self._publish_exit, self._drain, drain_timeout=self.drain_timeout)
            c.sequencer.container = c
            await self._attach_outputs(sb, c.init)
            await self._attach_input(sb, c.init)
            self.containers[id] = c
            self._namespaces[id] = self._ns(ctx)
            self._record_task(id, bundle=str(bundle), pid=pid)
        except BaseException:
            for fn in reversed(undo):
                try:
                    r = fn()
                    if inspect.isawaitable(r):
                        await r
                except Exception as e:
                    log.warning("undoing a failed create of %s: %s", id, e)
            raise
        finally:
            self._creating.discard(id)
        await self._publish(id, "/tasks/create", ev.TaskCreate(
            container_id=id, bundle=req.bundle,
            rootfs=[mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
                    for m in req.rootfs],
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal),
            checkpoint=req.checkpoint, pid=pid))
        return shim_pb2.CreateTaskResponse(pid=pid)

    def _release_rootfs(self, c: Container) -> None:
        if c.rootfs is not None and c.rootfs.mounted:
            rootfs_mod.release(c.rootfs)
            if self.state is not None:
                self.state.forget("mount", str(c.rootfs.path))

    async def Start(self, req: shim_pb2.StartRequest, ctx) -> shim_pb2.StartResponse:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        async with self._lock(c.id):
            p.check_start()
            if p.exec_id:
                c.check_exec_start()
            pid = await (await self._agent()).start(c.id, p.exec_id, timeout=self.agent_timeout)
            if p.exec_id and p.pid and pid != p.pid:
                raise ttrpc.Internal(f"the guest started {p.name} as pid {pid}, not {p.pid}")
            p.started(pid)
            if p.exec_id:
                # The guest made the exec's stdio at start: attach now, before the start event,
                # so the exit path waits for this output.
                sb = await self._sandbox()
                try:
                    await self._attach_outputs(sb, p)
                    await self._attach_input(sb, p)
                except Exception as e:
                    log.warning("%s: attaching stdio failed: %s", p.name, e)
                await self._publish(c.id, "/tasks/exec-started",
                                    ev.TaskExecStarted(container_id=c.id, exec_id=p.exec_id, pid=pid))
            else:
                await self._publish(c.id, "/tasks/start", ev.TaskStart(container_id=c.id, pid=pid))
            p.start_published.set()
            return shim_pb2.StartResponse(pid=pid)

    async def Exec(self, req: shim_pb2.ExecProcessRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        exec_id = _check_id(req.exec_id, "exec id")
        async with self._lock(c.id):
            p = c.add_exec(exec_id, StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal))
            try:
                try:
                    raw = _json_any(req.spec, api_types.OCI_PROCESS_TYPE_URL, "exec process spec")
                    proc = spec_mod.adapt_process(spec_mod.parse_json_object(raw, "exec process spec"),
                                                  terminal=req.terminal)
                except spec_mod.SpecError as e:
                    raise ttrpc.InvalidArgument(str(e)) from None
                p.io = ProcessIO(p.name)
                p.io.open_fifos(req.stdin, req.stdout, req.stderr, req.terminal)
                want = p.io.wanted()
                await (await self._agent()).exec(
                    c.id, exec_id, spec_mod.to_json(proc), terminal=req.terminal, stdin=want["stdin"],
                    stdout=want["stdout"], stderr=want["stderr"], timeout=self.agent_timeout)
            except BaseException:
                del c.execs[exec_id]
                if p.io is not None:
                    await p.io.close()
                raise
        await self._publish(c.id, "/tasks/exec-added", ev.TaskExecAdded(container_id=c.id, exec_id=exec_id))
        return empty_pb2.Empty()

    async def Kill(self, req: shim_pb2.KillRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        if not (req.all and not p.exec_id and not p.deleted and not p.exited):
            p.check_kill()
        if not 0 < req.signal < 65:
            raise ttrpc.InvalidArgument(f"invalid signal {req.signal}")
        await (await self._agent()).kill(c.id, p.exec_id, req.signal, req.all, timeout=self.agent_timeout)
        return empty_pb2.Empty()

    async def Wait(self, req: shim_pb2.WaitRequest, ctx) -> shim_pb2.WaitResponse:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        info = await p.wait()
        return shim_pb2.WaitResponse(exit_status=info.status, exited_at=_ts(info.at_ns))

    async def Delete(self, req: shim_pb2.DeleteRequest, ctx) -> shim_pb2.DeleteResponse:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        async with self._lock(c.id):
            p.check_delete()
            if p.status == Status.STOPPED and not p.exited:
                await c.sequencer.flush()
            if p.exec_id:
                return await self._delete_exec(c, p)
            return await self._delete_init(c)

    async def _delete_exec(self, c: Container, p: Process) -> shim_pb2.DeleteResponse:
        try:
            await (await self._agent()).delete(c.id, p.exec_id, timeout=self.agent_timeout)
        except ttrpc.NotFound:
            pass
        except Exception:
            if not (await self._sandbox()).lost.is_set():
                raise
        p.mark_deleted()
        del c.execs[p.exec_id]
        if p.io is not None:
            await p.io.close()
        info = p.exit
        return shim_pb2.DeleteResponse(pid=info.pid, exit_status=info.status, exited_at=_ts(info.at_ns))

    async def _delete_init(self, c: Container) -> shim_pb2.DeleteResponse:
        p = c.init
        info = p.exit
        sb = self.sandboxes.sandbox
        if sb is not None and not sb.lost.is_set():
            try:
                r = await sb.agent_client.delete(c.id, timeout=self.agent_timeout)
                if info is None:
                    info = _guest_exit(r.pid or p.pid, r.exit_status, r.exited_at_ns)
            except ttrpc.NotFound:
                pass
        if info is None:
            info = ExitInfo.unknown(p.pid)
        p.mark_deleted()
        for e in c.execs.values():
            e.mark_deleted()
        if c.sequencer is not None:
            c.sequencer.cancel()
        for proc in [*c.execs.values(), p]:
            if proc.io is not None:
                await proc.io.close()
        if sb is not None:
            try:
                await sb.unshare(c.id)
            except Exception as e:
                log.warning("%s: unsharing: %s", c.id, e)
        try:
            self._release_rootfs(c)
        except Exception as e:
            raise ttrpc.Internal(f"container {c.id}: unmounting the rootfs failed: {e}") from None
        del self.containers[c.id]
        self._locks.pop(c.id, None)
        if self.state is not None:
            try:
                self.state.remove_task(c.id)
            except Exception as e:
                log.warning("forgetting task %s: %s", c.id, e)
        await self._publish(c.id, "/tasks/delete", ev.TaskDelete(
            container_id=c.id, pid=info.pid, exit_status=info.status, exited_at=_ts(info.at_ns)))
        self._namespaces.pop(c.id, None)
        return shim_pb2.DeleteResponse(pid=info.pid, exit_status=info.status, exited_at=_ts(info.at_ns))

    async def State(self, req: shim_pb2.StateRequest, ctx) -> shim_pb2.StateResponse:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        r = shim_pb2.StateResponse(
            id=c.id, bundle=c.bundle, pid=p.pid, status=int(c.status_of(p)),
            stdin=p.stdio.stdin, stdout=p.stdio.stdout, stderr=p.stdio.stderr, terminal=p.stdio.terminal,
            exec_id=p.exec_id)
        if p.exit is not None:
            r.exit_status = p.exit.status
            r.exited_at.CopyFrom(_ts(p.exit.at_ns))
        return r

    async def Pids(self, req: shim_pb2.PidsRequest, ctx) -> shim_pb2.PidsResponse:
        c = self._container(req.id)
        if c.init.exited or c.init.exit_arrived:
            return shim_pb2.PidsResponse()
        procs = await (await self._agent()).pids(c.id, timeout=self.agent_timeout)
        out = shim_pb2.PidsResponse()
        for pi in procs:
            if not 0 < pi.pid < PID_MAX:
                continue
            info = task_pb2.ProcessInfo(pid=pi.pid)
            if pi.exec_id and pi.exec_id in c.execs:
                info.info.CopyFrom(api_types.pack_any(oci_pb2.ProcessDetails(exec_id=pi.exec_id)))
            out.processes.append(info)
        return out

    async def Pause(self, req: shim_pb2.PauseRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        async with self._lock(c.id):
            c.check_pause()
            await (await self._agent()).pause(c.id, timeout=self.agent_timeout)
            c.paused = True
        await self._publish(c.id, "/tasks/paused", ev.TaskPaused(container_id=c.id))
        return empty_pb2.Empty()

    async def Resume(self, req: shim_pb2.ResumeRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        async with self._lock(c.id):
            c.check_resume()
            await (await self._agent()).resume(c.id, timeout=self.agent_timeout)
            c.paused = False
        await self._publish(c.id, "/tasks/resumed", ev.TaskResumed(container_id=c.id))
        return empty_pb2.Empty()

    async def Checkpoint(self, req, ctx):
        raise ttrpc.Unimplemented("checkpoint is not supported by a VM runtime")

    async def Update(self, req: shim_pb2.UpdateTaskRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        if c.init.exited or c.init.exit_arrived:
            raise ttrpc.FailedPrecondition(f"container {c.id} is stopped")
        try:
            raw = _json_any(req.resources, api_types.OCI_LINUX_RESOURCES_TYPE_URL, "update resources")
        except spec_mod.SpecError as e:
            raise ttrpc.InvalidArgument(str(e)) from None
        await (await self._agent()).update(c.id, raw, timeout=self.agent_timeout)
        return empty_pb2.Empty()

    async def Stats(self, req: shim_pb2.StatsRequest, ctx) -> shim_pb2.StatsResponse:
        c = self._container(req.id)
        r = await (await self._agent()).stats(c.id, timeout=self.agent_timeout)
        m = metrics_pb2.Metrics()
        m.cpu.usage_usec = r.cpu_usage_ns // 1000
        m.cpu.user_usec = r.cpu_user_ns // 1000
        m.cpu.system_usec = r.cpu_system_ns // 1000
        m.memory.usage = r.memory_usage_bytes
        m.memory.usage_limit = r.memory_limit_bytes
        m.pids.current = r.pids_current
        m.pids.limit = r.pids_limit
        m.memory_events.oom_kill = r.oom_kills
        return shim_pb2.StatsResponse(stats=api_types.pack_any(m))

    async def CloseIO(self, req: shim_pb2.CloseIORequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        if req.stdin:
            if p.io is not None and p.io.input_task is not None:
                await p.io.close_stdin()
            else:
                await (await self._agent()).close_stdin(c.id, p.exec_id, timeout=self.agent_timeout)
        return empty_pb2.Empty()

    async def ResizePty(self, req: shim_pb2.ResizePtyRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        if not p.stdio.terminal:
            raise ttrpc.FailedPrecondition(f"process {p.name} has no terminal")
        await (await self._agent()).resize_pty(c.id, p.exec_id, req.width, req.height,
                                               timeout=self.agent_timeout)
        return empty_pb2.Empty()

    async def Connect(self, req: shim_pb2.ConnectRequest, ctx) -> shim_pb2.ConnectResponse:
        c = self.containers.get(req.id)
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0, version=VERSION)

    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx) -> empty_pb2.Empty:
        if self.containers or self._creating:
            return empty_pb2.Empty()            # still serving other containers
        if not self.shutting_down:
            self.shutting_down = True
            # Answer first: containerd treats a closed connection as success, but a reply is nicer.
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._shutdown()))
        return empty_pb2.Empty()

    async def _shutdown(self) -> None:
        try:
            await self.close()
        finally:
            self.shutdown_done.set()
            if self.request_exit is not None:
                try:
                    self.request_exit()
                except Exception as e:
                    log.warning("requesting the daemon exit: %s", e)

    async def close(self) -> None:
        """Stop the sandbox and the event follower (Shutdown, or the daemon exiting)."""
        self.shutting_down = True
        if self._events_task is not None:
            self._events_task.cancel()
            try:
                await self._events_task
            except (asyncio.CancelledError, Exception):
                pass
        for c in list(self.containers.values()):
            for p in [*c.execs.values(), c.init]:
                if p.io is not None:
                    await p.io.close()
            try:
                self._release_rootfs(c)
            except Exception as e:
                log.warning("%s: unmounting the rootfs at close: %s", c.id, e)
        await self.sandboxes.stop()


def register(server: ttrpc.Server, runtime_ctx) -> TaskService:
    """The daemon's hook: build the Task service and serve it as containerd.task.v2.Task and
    containerd.task.v3.Task on `server`.

    `runtime_ctx` attributes (read with getattr; only `sandbox_factory` is required):
      sandbox_factory: () -> shim.sandbox.Sandbox   (VMSandbox in production, LocalSandbox in tests)
      publisher:       object with `publish(namespace, topic, event)` (sync or async),
                       e.g. shim.publisher.Publisher; None = events are dropped
      namespace:       containerd namespace (-namespace flag); per-call metadata wins
      state:           shim.state.State for crash-safe records (rootfs mounts, task exit info)
      request_exit:    () -> None, called when Shutdown found no container left
      drain_timeout:   seconds an exit waits for its output to reach the FIFOs (default 30)
      agent_timeout:   seconds per agent call (default 60)
    """
    publisher = getattr(runtime_ctx, "publisher", None) or _DropPublisher()
    svc = TaskService(
        SandboxHolder(runtime_ctx.sandbox_factory), publisher,
        namespace=getattr(runtime_ctx, "namespace", None) or "default",
        state=getattr(runtime_ctx, "state", None),
        request_exit=getattr(runtime_ctx, "request_exit", None),
        drain_timeout=getattr(runtime_ctx, "drain_timeout", None) or 30.0,
        agent_timeout=getattr(runtime_ctx, "agent_timeout", None) or 60.0)
    desc = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    server.register(desc, svc)                                           # containerd.task.v2.Task
    server.register(desc, svc, name=api_types.TASK_SERVICE_V3)           # containerd.task.v3.Task
    return svc


def build_services(server: ttrpc.Server, ctx) -> TaskService:
    """What shim/daemon.py calls with its ShimContext: a VM sandbox per daemon, events through
    ctx.publisher, crash-safe records in ctx.state, exit through ctx.request_shutdown."""
    from types import SimpleNamespace

    from spinbox.shim import config as config_mod
    from spinbox.shim.guest import boot_guest
    from spinbox.shim.network.lifecycle import NetworkSettings, SandboxNetworking
    from spinbox.shim.sandbox import VMSandbox

    def boot():
        vm_dir = ctx.paths.vm_dir
        ctx.state.record("vm", str(vm_dir), owner=ctx.group, path=str(vm_dir))
        return boot_guest(vm_dir, config_mod.vm_config(ctx.config), name=ctx.group)

    def sandbox():
        networking = SandboxNetworking(ctx.group, NetworkSettings.from_config(ctx.config),
                                       state=ctx.state, owner=ctx.group)
        return VMSandbox(ctx.group, boot, network=networking, state=ctx.state)

    runtime_ctx = SimpleNamespace(
        sandbox_factory=sandbox, publisher=ctx.publisher,
        namespace=ctx.namespace, state=ctx.state, request_exit=ctx.request_shutdown,
        agent_timeout=ctx.config.timeouts.agent_call_s)
    svc = register(server, runtime_ctx)
    ctx.add_cleanup("task service", svc.close)
    return svc


class _DropPublisher:
    def publish(self, namespace: str, topic: str, event) -> None:
        log.debug("no publisher: dropping %s", topic)
