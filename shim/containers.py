"""Per-container orchestration of one sandbox: what each Task RPC does on the host and in the
guest, in what order, and how a failed step is undone.

The Task service (shim.task_service) checks its request and calls one method here; this
module owns the containers (shim.process records), the sandbox (started on the first Create,
shim.sandbox), the host resources of each container (rootfs mount, shares, stdio pumps) and the
guest event follower (shim.exits). It publishes no RPC event itself, only exits and OOMs,
which come from the guest.

Create is the long one; its undo is an `AsyncExitStack`: every step registers its own undo
right after it succeeded, and a failure (or a cancelled RPC) unwinds them newest first.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2

import ttrpc

from spinbox.api import contract
from spinbox.api import types as api_types
from spinbox.api._pb.containerd.events import task_pb2 as ev

from . import rootfs as rootfs_mod
from . import sizing
from . import spec as spec_mod
from .agent import AgentClient, ProcessInfo, Stats
from .agent.records import ProcessState as GuestProcessState
from .errors import (AlreadyExists, FailedPrecondition, GuestProtocolError, GuestUnavailable, HostError, InvalidArgument,
                     NotFound)
from .exits import ExitSequencer, GuestEventFollower, TaskEvents, drain_output, guest_exit
from .process import Container, ExitInfo, Process, StdioPaths
from .sandbox import Sandbox
from .states import ProcessState
from .state import State
from .stdio import AgentInput, AgentOutput, ProcessIO
from .timeline import Timelines

log = logging.getLogger(__name__)

STDOUT, STDERR = 1, 2
SandboxFactory = Callable[[], Sandbox]


def json_any(value: any_pb2.Any, expected_url: str, what: str) -> bytes:
    """The JSON document inside an Any that containerd sends (exec spec, resources); refused
    before it reaches the guest when it is not a JSON object of the expected type."""
    name = value.type_url.rsplit("/", 1)[-1] if value.type_url else ""
    if name and name != expected_url.rsplit("/", 1)[-1]:
        raise InvalidArgument(f"{what}: unexpected type_url {value.type_url!r} (want {expected_url})")
    spec_mod.parse_json_object(value.value, what)
    return value.value


def _describe(size: sizing.Size | None) -> str:
    return size.describe() if size is not None else "(not a VM)"


class ContainerManager:
    def __init__(self, sandbox_factory: SandboxFactory, events: TaskEvents, *,
                 state: State | None = None, agent_timeout: float = contract.AGENT_CALL_TIMEOUT_S,
                 drain_timeout: float = 30.0) -> None:
        self._sandbox_factory = sandbox_factory
        self.events = events
        self.state = state                    # crash-safe records (rootfs mounts, task exits)
        self.agent_timeout = agent_timeout
        self.drain_timeout = drain_timeout
        self.containers: dict[str, Container] = {}
        self.sandbox: Sandbox | None = None
        self.closing = False
        self._creating: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._sandbox_lock = asyncio.Lock()
        self.follower = GuestEventFollower(self.containers, self._publish_oom, lambda: self.closing,
                                           query_state=self._guest_state)
        self.timelines = Timelines()
        self._needs: dict[str, sizing.Need] = {}     # per container: what it asks of the VM
        self._pod_need = sizing.Need()                # CRI pod annotations (first container)
        self._size_lock = asyncio.Lock()
        self._size: sizing.Size | None = None         # the sandbox's size, confirmed by the guest

    # --- lookups ---------------------------------------------------------------------------

    def get(self, id: str) -> Container:
        c = self.containers.get(id)
        if c is None:
            raise NotFound(f"container {id!r} not created")
        return c

    def lock(self, id: str) -> asyncio.Lock:
        """Serialises the RPCs of one container (create/start/exec/delete/pause/resume)."""
        return self._locks.setdefault(id, asyncio.Lock())

    @property
    def busy(self) -> bool:
        """Containers exist or are being created: the shim must keep serving."""
        return bool(self.containers or self._creating)

    def _agent(self) -> AgentClient:
        sb = self.sandbox
        if sb is None:
            raise FailedPrecondition("the sandbox is not running")
        return sb.agent_client

    @property
    def sandbox_lost(self) -> bool:
        return self.sandbox is None or self.sandbox.lost.is_set()

    # --- the sandbox -----------------------------------------------------------------------

    async def _sandbox_for(self, spec: dict[str, Any]) -> Sandbox:
        """The sandbox, started by the first Create (its spec decides the network). A sandbox
        that failed to start is stopped and forgotten: the next Create starts a fresh one."""
        async with self._sandbox_lock:
            if self.sandbox is None:
                sb = self._sandbox_factory()
                await sb.start(spec)            # stops itself on failure
                self.sandbox = sb
                self.follower.start(sb)
            return self.sandbox

    # --- exits -----------------------------------------------------------------------------

    async def _publish_exit(self, p: Process, info: ExitInfo) -> None:
        if not p.exec_id:
            self._record_task(p.container_id, pid=info.pid, exit_status=info.status)
        await self.events.exit(p, info)
        if not p.exec_id:
            self.timelines.mark(p.container_id, "exit")

    async def _guest_state(self, id: str, exec_id: str) -> GuestProcessState:
        """A process's state in the guest (the follower asks after an event gap)."""
        if self.sandbox is None:
            raise GuestUnavailable("no sandbox")
        return await self.sandbox.agent_client.state(id, exec_id, timeout=self.agent_timeout)

    async def _publish_oom(self, container_id: str) -> None:
        await self.events.publish(container_id, "/tasks/oom", ev.TaskOOM(container_id=container_id))

    def _sequencer(self, c: Container) -> ExitSequencer:
        return ExitSequencer(self._publish_exit, drain_output, drain_timeout=self.drain_timeout,
                             container=c)

    def _record_task(self, id: str, **info: Any) -> None:
        if self.state is not None:
            try:
                self.state.set_task(id, **info)
            except Exception as e:
                log.warning("recording task %s: %s", id, e)

    # --- stdio -----------------------------------------------------------------------------

    def _attach_stdio(self, agent: AgentClient, p: Process) -> None:
        io = p.io
        if io is None:
            return
        want = io.wanted()
        for which, fd in (("stdout", STDOUT), ("stderr", STDERR)):
            if want[which]:
                io.start_output(which, AgentOutput(agent.open_output(p.container_id, p.exec_id, fd)))
        if want["stdin"]:
            io.start_input(AgentInput(agent.open_input(p.container_id, p.exec_id)))

    # --- rootfs ----------------------------------------------------------------------------

    async def _mount_rootfs(self, c: Container, bundle: Path, mounts: list[rootfs_mod.MountSpec],
                            readonly: bool = False, mount_points: list[tuple[str, bool]] | None = None) -> None:
        rootfs_path = str(bundle / "rootfs")
        mounting = bool(mounts) or readonly         # a read-only rootfs is a bind of its own
        if mounting and self.state is not None:      # recorded first: `delete` unmounts it
            self.state.record("mount", rootfs_path, owner=c.id, path=rootfs_path)
        try:
            c.rootfs = await rootfs_mod.mount_rootfs(bundle, mounts, readonly=readonly,
                                                     mount_points=mount_points or ())
        except rootfs_mod.RootfsError as e:
            if mounting and self.state is not None:
                self.state.forget("mount", rootfs_path)
            raise FailedPrecondition(f"rootfs of {c.id}: {e}") from None

    def _release_rootfs(self, c: Container) -> None:
        if c.rootfs is not None and c.rootfs.mounted:
            rootfs_mod.release(c.rootfs)
            if self.state is not None:
                self.state.forget("mount", str(c.rootfs.path))

    # --- RPC operations --------------------------------------------------------------------

    async def create(self, id: str, bundle: Path, stdio: StdioPaths,
                     mounts: list[rootfs_mod.MountSpec]) -> Container:
        if self.closing:
            raise FailedPrecondition("the shim is shutting down")
        if id in self.containers or id in self._creating:
            raise AlreadyExists(f"container {id} already exists")
        self._creating.add(id)
        try:
            async with contextlib.AsyncExitStack() as undo:
                undo.callback(self.timelines.forget, id)
                c = await self._create(undo, id, bundle, stdio, mounts)
                undo.pop_all()                   # success: the container owns it all now
            self.containers[id] = c
            self._record_task(id, bundle=str(bundle), pid=c.init.pid)
            return c
        finally:
            self._creating.discard(id)

    async def _create(self, undo: contextlib.AsyncExitStack, id: str, bundle: Path,
                      stdio: StdioPaths, mounts: list[rootfs_mod.MountSpec]) -> Container:
        spec = spec_mod.load_spec(bundle / "config.json")
        spec_mod.refuse_host_namespaces(spec)       # before anything is made for the container
        binds = spec_mod.plan_binds(spec)
        need = sizing.need_of_spec(spec)            # bad sizing annotations fail before anything
        c = Container(id, str(bundle), stdio)

        await self._mount_rootfs(c, bundle, mounts, spec_mod.root_readonly(spec),
                                 spec_mod.mount_points(spec, binds))
        undo.callback(self._release_rootfs, c)
        self.timelines.mark(id, "rootfs")

        starting = self.sandbox is None
        sb = await self._sandbox_for(spec)
        undo.push_async_callback(sb.unshare, id)
        self.timelines.mark(id, "sandbox", sb.start_kind if starting else "running")
        if starting and "network" in sb.marks:
            self.timelines.mark(id, "network", at=sb.marks["network"])
        if starting:
            self._pod_need = sizing.pod_need_of_spec(spec)
        await self._fit(sb, id, need)
        undo.callback(self._needs.pop, id, None)
        guest_root = await sb.share_rootfs(id, c.rootfs.path if c.rootfs else bundle / "rootfs")
        shared = await sb.share_binds(id, binds)
        self.timelines.mark(id, "shared")
        adapted, notes = spec_mod.adapt_spec(spec, rootfs=guest_root.path or "rootfs",
                                             shared=shared.sources, terminal=stdio.terminal,
                                             inits={o.init.pid: o.id for o in self.containers.values()
                                                    if o.init.pid and not o.init.exited})
        for n in notes:
            log.info("%s: %s", id, n)

        io = ProcessIO(id)
        c.init.io = io
        undo.push_async_callback(io.close)
        io.open_fifos(stdio.stdin, stdio.stdout, stdio.stderr, stdio.terminal)
        want = io.wanted()
        agent = sb.agent_client
        pid = await agent.create(
            id, spec_mod.to_json(adapted), rootfs_path=guest_root.path, rootfs_mounts=guest_root.mounts,
            readonly=guest_root.readonly, terminal=stdio.terminal, stdin=want["stdin"],
            stdout=want["stdout"], stderr=want["stderr"], shares=shared.mounts, timeout=self.agent_timeout)
        undo.push_async_callback(agent.delete, id, timeout=self.agent_timeout)
        self.timelines.mark(id, "created")
        c.init.pid = pid
        c.sequencer = self._sequencer(c)
        self._attach_stdio(agent, c.init)
        return c

    # --- sizing ---------------------------------------------------------------------------

    def _target(self, sb: Sandbox, needs: dict[str, sizing.Need]) -> sizing.Size | None:
        """The sandbox's size for these containers' needs; over a ceiling: SizingError."""
        sz = sb.sizing()
        if sz is None:
            return None
        base, limits = sz
        want = sizing.target(base, needs.values(), self._pod_need)
        sizing.check(want, limits, base)
        return want

    async def _fit(self, sb: Sandbox, id: str, need: sizing.Need) -> None:
        """Grow the VM so that a new container fits beside the others (create never shrinks)."""
        async with self._size_lock:
            needs = {**self._needs, id: need}
            want = self._target(sb, needs)
            if want is not None and (self._size is None or want.vcpus > self._size.vcpus
                                     or want.memory_mb > self._size.memory_mb):
                t = time.monotonic()
                got = await sb.resize(sizing.Size(max(want.vcpus, self._size.vcpus if self._size else 0),
                                                  max(want.memory_mb, self._size.memory_mb if self._size else 0)))
                self._size = got
                if got is not None:
                    log.info("%s: sandbox sized to %s in %.2f s", id, got.describe(), time.monotonic() - t)
                    self.timelines.mark(id, "sized", f"{got.vcpus}cpu/{got.memory_mb}MiB")
            self._needs[id] = need

    async def start(self, c: Container, p: Process) -> int:
        """Start the init or an exec. The caller publishes the start event and then calls
        `announced(p)`: an exit that raced this reply waits for that (shim.exits)."""
        async with self.lock(c.id):
            p.check("start")
            if p.exec_id:
                c.init.check("exec_start")
            agent = self._agent()
            pid = await agent.start(c.id, p.exec_id, timeout=self.agent_timeout)
            if p.exec_id and p.pid and pid != p.pid:
                raise GuestProtocolError(f"the guest started {p.name} as pid {pid}, not {p.pid}")
            p.started(pid)
            if not p.exec_id:
                self.timelines.mark(c.id, "started")
            if p.exec_id:
                # The guest made the exec's stdio at start: attach now, before the start event,
                # so the exit path waits for this output.
                try:
                    self._attach_stdio(agent, p)
                except Exception as e:
                    log.warning("%s: attaching stdio failed: %s", p.name, e)
            return pid

    @staticmethod
    def announced(p: Process) -> None:
        """The start event of `p` is out: its exit may now be published."""
        p.start_published.set()

    async def exec(self, c: Container, exec_id: str, stdio: StdioPaths, spec: any_pb2.Any) -> Process:
        async with self.lock(c.id):
            p = c.add_exec(exec_id, stdio)
            try:
                raw = json_any(spec, api_types.OCI_PROCESS_TYPE_URL, "exec process spec")
                proc = spec_mod.adapt_process(spec_mod.parse_json_object(raw, "exec process spec"),
                                              terminal=stdio.terminal)
                p.io = ProcessIO(p.name)
                p.io.open_fifos(stdio.stdin, stdio.stdout, stdio.stderr, stdio.terminal)
                want = p.io.wanted()
                await self._agent().exec(
                    c.id, exec_id, spec_mod.to_json(proc), terminal=stdio.terminal, stdin=want["stdin"],
                    stdout=want["stdout"], stderr=want["stderr"], timeout=self.agent_timeout)
            except BaseException:
                del c.execs[exec_id]
                if p.io is not None:
                    await p.io.close()
                raise
            return p

    async def kill(self, c: Container, p: Process, signal: int, all: bool) -> None:
        # `--all` on the init still reaches the container's other processes after its exit.
        p.check("kill_all" if all and not p.exec_id else "kill")
        if not 0 < signal < 65:
            raise InvalidArgument(f"invalid signal {signal}")
        await self._agent().kill(c.id, p.exec_id, signal, all, timeout=self.agent_timeout)

    async def delete(self, c: Container, p: Process) -> ExitInfo:
        async with self.lock(c.id):
            p.check("delete")
            if c.sequencer is not None and p.state == ProcessState.EXIT_PENDING:
                await c.sequencer.flush()          # its exit arrived: report it first
            if p.exec_id:
                return await self._delete_exec(c, p)
            return await self._delete_init(c)

    async def _delete_exec(self, c: Container, p: Process) -> ExitInfo:
        try:
            await self._agent().delete(c.id, p.exec_id, timeout=self.agent_timeout)
        except ttrpc.NotFound:                 # the guest's answer: it has forgotten it already
            pass
        except Exception:
            if not self.sandbox_lost:
                raise
        p.mark_deleted()
        del c.execs[p.exec_id]
        if p.io is not None:
            await p.io.close()
        assert p.exit is not None
        return p.exit

    async def _delete_init(self, c: Container) -> ExitInfo:
        p = c.init
        info = p.exit
        sb = self.sandbox
        if sb is not None and not sb.lost.is_set():
            try:
                r = await sb.agent_client.delete(c.id, timeout=self.agent_timeout)
                if info is None:
                    info = guest_exit(r.pid or p.pid, r.exit_status, r.exited_at_ns)
            except ttrpc.NotFound:
                pass
        if info is None:
            info = ExitInfo.unknown(p.pid)
        for proc in c.processes():
            proc.mark_deleted()
        if c.sequencer is not None:
            c.sequencer.cancel()
        for proc in c.processes():
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
            raise HostError(f"container {c.id}: unmounting the rootfs failed: {e}") from None
        del self.containers[c.id]
        self._locks.pop(c.id, None)
        self._needs.pop(c.id, None)        # the VM is not shrunk for it: the next Update may
        self.timelines.mark(c.id, "deleted")
        if self.state is not None:
            try:
                self.state.remove_task(c.id)
            except Exception as e:
                log.warning("forgetting task %s: %s", c.id, e)
        return info

    async def pids(self, c: Container) -> list[ProcessInfo]:
        if not c.init.allows("pids"):
            return []
        return [pi for pi in await self._agent().pids(c.id, timeout=self.agent_timeout)
                if contract.is_valid_pid(pi.pid)]

    async def pause(self, c: Container) -> None:
        async with self.lock(c.id):
            c.init.check("pause")
            await self._agent().pause(c.id, timeout=self.agent_timeout)
            c.init.machine.apply("paused")

    async def resume(self, c: Container) -> None:
        async with self.lock(c.id):
            c.init.check("resume")
            await self._agent().resume(c.id, timeout=self.agent_timeout)
            c.init.machine.apply("resumed")

    async def update(self, c: Container, resources: any_pb2.Any) -> None:
        if not c.init.allows("update"):
            raise FailedPrecondition(f"container {c.id} is stopped")
        raw = json_any(resources, api_types.OCI_LINUX_RESOURCES_TYPE_URL, "update resources")
        asked = sizing.need_of_resources(spec_mod.parse_json_object(raw, "update resources"))
        async with self._size_lock:
            sb = self.sandbox
            old = self._needs.get(c.id, sizing.Need())
            need = sizing.Need(asked.vcpus if asked.vcpus is not None else old.vcpus,
                               asked.memory_mb if asked.memory_mb is not None else old.memory_mb)
            want = self._target(sb, {**self._needs, c.id: need}) if sb is not None else None
            if sb is None or want is None:
                await self._agent().update(c.id, raw, timeout=self.agent_timeout)
                return
            # grow first (confirmed by the guest), then the cgroup, then give back what is
            # no longer needed: the container never has a limit the VM cannot hold
            t = time.monotonic()
            have = self._size
            grow = want if have is None else sizing.Size(max(have.vcpus, want.vcpus),
                                                         max(have.memory_mb, want.memory_mb))
            if grow != have:
                self._size = await sb.resize(grow)
                log.info("%s: update: sandbox grown to %s in %.2f s (confirmed by the guest)",
                         c.id, _describe(self._size), time.monotonic() - t)
            await self._agent().update(c.id, raw, timeout=self.agent_timeout)
            self._needs[c.id] = need
            if self._size is not None and want != self._size:      # less is needed now
                self._size = await sb.resize(want)
                log.info("%s: update: sandbox now %s (wanted %s)", c.id, _describe(self._size),
                         want.describe())

    async def stats(self, c: Container) -> Stats:
        return await self._agent().stats(c.id, timeout=self.agent_timeout)

    async def close_stdin(self, c: Container, p: Process) -> None:
        if p.io is not None and p.io.input_task is not None:
            await p.io.close_stdin()
        else:
            await self._agent().close_stdin(c.id, p.exec_id, timeout=self.agent_timeout)

    async def resize_pty(self, c: Container, p: Process, width: int, height: int) -> None:
        if not p.stdio.terminal:
            raise FailedPrecondition(f"process {p.name} has no terminal")
        await self._agent().resize_pty(c.id, p.exec_id, width, height, timeout=self.agent_timeout)

    # --- the end ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop following events, close every pump, unmount every rootfs, stop the sandbox
        (Shutdown, or the daemon exiting). What the sandbox's stop leaves, `delete` releases."""
        self.closing = True
        await self.follower.stop()
        for c in list(self.containers.values()):
            for p in c.processes():
                if p.io is not None:
                    await p.io.close()
            try:
                self._release_rootfs(c)
            except Exception as e:
                log.warning("%s: unmounting the rootfs at close: %s", c.id, e)
        async with self._sandbox_lock:
            sb, self.sandbox = self.sandbox, None
        try:
            if sb is not None:
                await sb.stop()
                self.timelines.mark_all("vm_stopped")
        finally:
            self.timelines.flush()
