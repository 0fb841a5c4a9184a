"""The sandbox: where the containers of one shim run, and what is attached to it.

* `VMSandbox` (production): a QEMU microVM with vminitd (shim.guest), plus the host side of its
  network (shim.network) and the virtiofs shares of each container's rootfs and bind sources.
* `LocalSandbox` (tests, debugging): a `vminitd --listen unix:...` process on the host using the
  host's runc; guest paths are host paths, so nothing needs sharing.

The container manager (shim.containers) sees the `Sandbox` interface only: `start(spec)`,
`agent_client`, `guest_events`, `share_rootfs`, `share_binds`, `unshare`, `lost` (set when the
agent is gone for good) and `stop()`, the one stop path. The lifecycle is a table
(shim.states.SandboxMachine): new -> starting -> ready [-> lost] -> stopping -> stopped.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from spinbox.api.contract import SHARES_ROOT

from . import binds as binds_mod
from . import resize as resize_mod
from .autoscale import Policy
from .autoscaler import VCPUAutoscaler
from .agent import AgentClient, AgentEvent, Mount
from .aio import race
from .errors import FailedPrecondition, GuestUnavailable, HostError
from .guest import Guest
from .network.plan import guest_hostname
from .sizing import Limits, Size
from .spec import BindMount
from .states import SandboxMachine, SandboxState
from .state import State
from .vm import devices, hostcgroup

if TYPE_CHECKING:
    from .network.attachment import NetworkAttachment

log = logging.getLogger(__name__)


class LocalSandboxError(HostError):
    """The local vminitd did not come up."""


@dataclass
class GuestRootfs:
    """How the guest finds a container's rootfs: a guest directory, or mounts the agent makes."""
    path: str = ""
    mounts: list[Mount] = field(default_factory=list)
    readonly: bool = False


@dataclass
class SharedBinds:
    sources: dict[int, str] | None = None       # bind index -> guest path of its source
    mounts: list[Mount] = field(default_factory=list)   # for CreateRequest.shares


class Sandbox:
    """Base class: the lifecycle (shim.states.SandboxMachine) and the one stop path. Subclasses
    implement `_start`, `_stop` and the sharing methods; nobody else changes the state."""

    def __init__(self, id: str) -> None:
        self.id = id
        self.machine = SandboxMachine(id)
        self.agent: AgentClient | None = None
        # Set when the agent is gone for good (the VM or the agent process died, or stop()):
        # the exits of every live process are then reported by the event follower.
        self.lost = asyncio.Event()
        self._stopped: asyncio.Future[None] | None = None
        self.start_kind = "cold"                 # how it started (a template restore, later)
        self.marks: dict[str, float] = {}        # monotonic times of start steps (shim.timeline)

    @property
    def state(self) -> SandboxState:
        return self.machine.state

    @property
    def agent_client(self) -> AgentClient:
        if self.agent is None:
            raise GuestUnavailable(f"sandbox {self.id} has no agent connection")
        return self.agent

    def guest_events(self, after_seq: int) -> AsyncIterator[AgentEvent]:
        return self.agent_client.events(after_seq=after_seq)

    async def start(self, spec: dict[str, Any] | None = None) -> None:
        """Boot the sandbox; `spec` is the first container's OCI spec (it decides the network).
        On failure (or cancellation) everything started is stopped before the error leaves."""
        if not self.machine.apply("start"):
            raise FailedPrecondition(f"sandbox {self.id} is {self.state.value}: cannot start it")
        try:
            await self._start(spec or {})
            if not self.machine.apply("ready"):      # lost while starting (QEMU died)
                raise GuestUnavailable(f"sandbox {self.id} was {self.state.value} while starting")
        except BaseException:
            try:
                await self.stop()
            except Exception as e:
                log.warning("stopping sandbox %s that failed to start: %s", self.id, e)
            raise
        log.info("sandbox %s ready", self.id)

    def mark_lost(self, why: str = "") -> None:
        """The VM layer's verdict: the agent can never answer again."""
        if self.machine.apply("lost"):
            log.error("sandbox %s lost%s", self.id, f": {why}" if why else "")
        self.lost.set()

    async def stop(self) -> None:
        """The one stop path: idempotent; a second caller waits for the first one's stop."""
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
            return
        self._stopped = asyncio.get_running_loop().create_future()
        self.machine.apply("stop")
        try:
            await self._stop()
        finally:
            self.machine.apply("stopped")
            self.lost.set()
            self._stopped.set_result(None)

    async def _start(self, spec: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    async def share_rootfs(self, container_id: str, host_rootfs: Path) -> GuestRootfs:
        raise NotImplementedError

    async def share_binds(self, container_id: str, binds: list[BindMount]) -> SharedBinds:
        """Make the sources of a container's bind mounts visible in the guest;
        `SharedBinds.sources` None means guest paths are host paths."""
        raise NotImplementedError

    async def unshare(self, container_id: str) -> None:
        """Release everything shared for the container (after its Delete)."""

    # --- sizing (shim.sizing, shim.resize) -------------------------------------------------

    def sizing(self) -> tuple[Size, Limits] | None:
        """(base size, ceilings) of a sandbox that can be resized; None: not a VM."""
        return None

    async def resize(self, want: Size) -> Size | None:
        """Grow (or shrink) to `want`; the size the guest confirmed. None: not a VM."""
        return None


class LocalSandbox(Sandbox):
    """vminitd as a host process (no VM)."""

    def __init__(self, id: str, work_dir: str | os.PathLike[str] | None = None, *,
                 python: str = sys.executable, runc: str = "runc", drain_timeout: float = 30.0,
                 boot_timeout: float = 30.0) -> None:
        super().__init__(id)
        self._own_dir = work_dir is None
        self.dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="spinbox-local-"))
        self.python = python
        self.runc = runc
        self.drain_timeout = drain_timeout
        self.boot_timeout = boot_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "agent.sock"

    async def _start(self, spec: dict[str, Any]) -> None:
        # Host processes: the host's network, nothing to set up.
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.dir / "vminitd.log", "ab")
        self.proc = proc = subprocess.Popen(
            [self.python, "-m", "spinbox.vminitd.main", "--listen", f"unix:{self.socket}",
             "--state-dir", str(self.dir / "state"), "--runc", self.runc,
             "--drain-timeout", str(self.drain_timeout)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.boot_timeout
        while not self.socket.exists():
            if proc.poll() is not None:
                raise LocalSandboxError(f"local vminitd exited with {proc.returncode} during start: "
                                        f"{self.log_tail()}")
            if loop.time() > deadline:
                raise LocalSandboxError(f"local vminitd not ready within {self.boot_timeout}s: {self.log_tail()}")
            await asyncio.sleep(0.05)
        self.agent = await AgentClient.wait_ready(str(self.socket), timeout=max(1.0, deadline - loop.time()))
        self._watch = asyncio.ensure_future(self._watch_process(proc))

    async def _watch_process(self, proc: subprocess.Popen[bytes]) -> None:
        # The agent's death is the process's exit, not a connection hiccup.
        await asyncio.to_thread(proc.wait)
        self.mark_lost()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.dir / "vminitd.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def share_rootfs(self, container_id: str, host_rootfs: Path) -> GuestRootfs:
        return GuestRootfs(path=str(host_rootfs))

    async def share_binds(self, container_id: str, binds: list[BindMount]) -> SharedBinds:
        return SharedBinds(None)

    async def _stop(self) -> None:
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)     # vminitd kills and deletes its containers
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 30)
            except asyncio.TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        if self._watch is not None:
            self._watch.cancel()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class VMSandbox(Sandbox):
    """A microVM per sandbox (production). `boot` is `shim.guest`'s boot function: an awaitable
    returning a Guest with `.vm` (shim.vm.machine.VM), `.agent` and `stop()`.

    A container's rootfs is shared with one virtiofs device (tag "rootfs-<n>", mounted by the
    agent as GuestRootfs.mounts), its bind sources, staged by shim.binds, with one more
    ("binds-<n>", CreateRequest.shares). The network (optional) is set up beside the boot.
    """

    def __init__(self, id: str, boot: Callable[[], Awaitable[Guest]], *,
                 network: NetworkAttachment | None = None, state: State | None = None,
                 cgroup: hostcgroup.CgroupOwner | None = None, autoscale: Policy | None = None) -> None:
        super().__init__(id)
        self.cgroup = cgroup            # the host cgroup of QEMU and virtiofsd (made before boot)
        self._boot = boot
        self.network = network
        self.records = state            # crash-safe records (bind staging dirs)
        self._stages: dict[str, Path] = {}
        self.guest: Guest | None = None
        self._handles: dict[str, list[devices.Handle]] = {}
        self._n = 0
        self._watch: asyncio.Task[None] | None = None
        self._resizer: resize_mod.VMResizer | None = None
        self._autoscale = autoscale            # the vCPU controller's policy (autoscale.enabled)
        self.autoscaler: VCPUAutoscaler | None = None

    async def _start(self, spec: dict[str, Any]) -> None:
        """Boot the VM while the host side of the network is set up (both take their own time:
        ~2.7 s vs ~0.05 s under TCG), then hot-plug the NICs and configure the guest. Either
        failing stops the other at once; `stop` releases what exists."""
        net = self.network
        if net is not None:
            net.decide(spec or {})          # a bad config or annotation fails before any boot
        if self.cgroup is not None:         # before boot: QEMU joins it at spawn
            await asyncio.to_thread(self.cgroup.prepare, spec or {})
        boot = asyncio.ensure_future(self._boot())
        tasks = [boot] + ([asyncio.ensure_future(self._prepare_network(net))] if net is not None else [])
        errors: list[BaseException] = []
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            errors = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
        finally:
            if errors or not all(t.done() for t in tasks):    # a failure, or we were cancelled
                for t in tasks:
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if boot.done() and not boot.cancelled() and boot.exception() is None:
                self.guest = boot.result()                    # stop() will stop it
        if errors:
            raise errors[0]
        guest = self._guest
        self.start_kind = "template" if "state_loaded" in guest.timeline else "cold"
        self.agent = guest.agent
        self._watch = asyncio.ensure_future(self._watch_vm(guest))
        if net is not None:
            await self._connect_network(net, guest, guest_hostname(spec))
        if self._autoscale is not None:
            self.autoscaler = VCPUAutoscaler(self.id, self._autoscale, await self._sizer(), guest.agent,
                                             self._resize_locked, vm_max_vcpus=guest.vm.config.effective_max_vcpus)
            self.autoscaler.start()

    @staticmethod
    async def _connect_network(net: NetworkAttachment, guest: Guest, hostname: str) -> None:
        """Hot-plug one virtio-net per planned NIC (the TAP fds go to QEMU), then configure the
        guest (addresses, routes, DNS, hostname; it waits for the NICs to appear)."""
        plan = net.plan(hostname)
        try:
            for nic in plan.nics:      # no handle kept: the NIC lives as long as the VM
                await devices.add_tap_nic(guest.vm, nic.tap_fd, nic.mac)
        finally:
            net.close_tap_fds()        # QEMU holds its own copies (or the VM is being torn down)
        names = await guest.agent.configure_network(plan.request, timeout=plan.agent_timeout_s)
        net.record_guest(names)

    async def _prepare_network(self, net: NetworkAttachment) -> None:
        await net.prepare()
        self.marks["network"] = time.monotonic()

    @property
    def _guest(self) -> Guest:
        if self.guest is None:
            raise GuestUnavailable(f"sandbox {self.id} has no VM")
        return self.guest

    async def _watch_vm(self, guest: Guest) -> None:
        # The sandbox is lost when QEMU exits, or when the agent connection is gone after the
        # guest was ready: nothing reconnects then (a send to a guest that stopped reading timed
        # out and dropped it, a protocol violation, the peer hung up), so no call or event can
        # reach us again; the live processes are then reported exited and Delete/Shutdown tear
        # the VM down instead of waiting on a guest that will never answer.
        await race(guest.vm.wait_died(), guest.agent.wait_connection_lost())
        self.mark_lost("QEMU exited" if not guest.vm.alive else "the agent connection was dropped")

    async def _share(self, container_id: str, host_dir: str, prefix: str) -> str:
        self.machine.require(SandboxState.READY)     # nothing is attached to a lost or stopping VM
        self._n += 1
        tag = f"{prefix}-{self._n}"
        handle = await devices.add_virtiofs(self._guest.vm, host_dir, tag)
        self._handles.setdefault(container_id, []).append(handle)
        return tag

    async def share_rootfs(self, container_id: str, host_rootfs: Path) -> GuestRootfs:
        tag = await self._share(container_id, str(host_rootfs), "rootfs")
        return GuestRootfs(mounts=[Mount("virtiofs", tag, "", ())])

    async def share_binds(self, container_id: str, binds: list[BindMount]) -> SharedBinds:
        """Stage the bind sources under the VM dir (shim.binds: only they are visible to the
        guest, read-only ones read-only on the host too) and share that one directory."""
        if not binds:
            return SharedBinds({})

        stage_dir = self._guest.vm.paths.state_dir / "binds" / container_id
        if self.records is not None:       # recorded first: `delete` unmounts and removes it
            self.records.record("dir", str(stage_dir), owner=self.id, path=str(stage_dir))
        try:
            staged = await asyncio.to_thread(binds_mod.stage, binds, stage_dir)
        except BaseException:
            self._forget_stage(stage_dir)
            raise
        self._stages[container_id] = stage_dir
        tag = await self._share(container_id, str(stage_dir), "binds")
        guest_dir = f"{SHARES_ROOT}/{container_id}/binds"
        return SharedBinds({i: f"{guest_dir}/{rel}" for i, rel in staged.paths.items()},
                           [Mount("virtiofs", tag, "binds", ())])

    def _forget_stage(self, stage_dir: Path) -> None:
        if self.records is not None:
            try:
                self.records.forget("dir", str(stage_dir))
            except Exception as e:
                log.warning("sandbox %s: forgetting %s: %s", self.id, stage_dir, e)

    async def unshare(self, container_id: str) -> None:
        for h in reversed(self._handles.pop(container_id, [])):
            try:
                await h.detach()
            except Exception as e:
                log.warning("sandbox %s: detaching a share of %s: %s", self.id, container_id, e)
        stage_dir = self._stages.pop(container_id, None)
        if stage_dir is not None:         # after virtiofsd is gone: it held the mounts
            try:
                await asyncio.to_thread(binds_mod.release, stage_dir)
                self._forget_stage(stage_dir)
            except Exception as e:
                log.warning("sandbox %s: releasing the binds of %s: %s (left for delete)",
                            self.id, container_id, e)

    def sizing(self) -> tuple[Size, Limits] | None:
        vm = self._guest.vm
        return resize_mod.base_of(vm), resize_mod.limits_of(vm)

    async def _sizer(self) -> resize_mod.VMResizer:
        if self._resizer is None:
            vm = self._guest.vm
            r = resize_mod.VMResizer(vm, self.agent_client, records=self.records, owner=self.id)
            rec = self.records.find(resize_mod.RECORD_KIND, vm.name) if self.records is not None else None
            if rec is not None:            # a size this VM had before (persisted by a resizer)
                try:
                    await r.adopt(resize_mod.SizeRecord.from_data(rec.data))
                except Exception as e:
                    log.warning("sandbox %s: not resuming from the recorded size: %s", self.id, e)
            self._resizer = r
        return self._resizer

    async def resize(self, want: Size) -> Size:
        """An explicit size (Create, Update): serialised with the vCPU controller, whose floor
        it becomes."""
        self.machine.require(SandboxState.READY)
        r = await self._sizer()
        async with r.lock:
            got = await self._resize_locked(want)
            if self.autoscaler is not None:
                self.autoscaler.declared(want)
            return got

    async def _resize_locked(self, want: Size) -> Size:
        self.machine.require(SandboxState.READY)
        r = await self._sizer()
        if self.cgroup is None:
            return await r.resize(want)
        have = r.size                      # room for the growth first, the confirmed size after
        self.cgroup.resized(max(want.vcpus, have.vcpus), max(want.memory_mb, have.memory_mb))
        try:
            return await r.resize(want)
        finally:
            self.cgroup.resized(r.size.vcpus, r.size.memory_mb)

    async def _stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.autoscaler is not None:
            await self.autoscaler.stop()
        for cid in list(self._handles):
            await self.unshare(cid)
        try:
            if self.guest is not None:
                await self.guest.stop()
                self.guest = None
                if self._resizer is not None:      # its devices went with QEMU
                    self._resizer.forget()
        finally:
            try:
                if self.network is not None:       # after QEMU is gone: it held the TAPs
                    await self.network.release()
            finally:
                if self.cgroup is not None:        # after QEMU and virtiofsd are gone
                    await self.cgroup.remove()
