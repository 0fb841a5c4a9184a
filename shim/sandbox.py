"""The agent endpoint of a sandbox: where the containers of one shim run.

* `VMSandbox` (production): a QEMU microVM booted through `shim.guest`, rootfs and bind
  sources shared into it with virtiofs hot-attached through `shim.vm.devices`.
* `LocalSandbox` (tests, debugging): a `vminitd --listen unix:...` process on the host using the
  host's runc; guest paths are host paths, so nothing needs sharing.

The Task service only sees the `Sandbox` interface: `agent` (shim.agent.AgentClient),
`share_rootfs`, `share_binds`, `unshare`, `lost` (set when the agent is gone for good), `stop`.
`SandboxHolder` starts the sandbox lazily on the first Create and stops it on Shutdown.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import ttrpc

log = logging.getLogger("spinbox.shim.sandbox")



@dataclass
class GuestRootfs:
    """How the guest finds a container's rootfs: a guest directory, or mounts the agent makes."""
    path: str = ""
    mounts: list = field(default_factory=list)     # shim.agent.Mount
    readonly: bool = False


@dataclass
class SharedBinds:
    sources: dict[int, str] | None = None       # bind index -> guest path of its source
    mounts: list = field(default_factory=list)  # shim.agent.Mount for CreateRequest.shares


class Sandbox:
    """Base class; see the module docstring."""

    id: str
    agent = None          # shim.agent.AgentClient once started
    lost: asyncio.Event   # the agent is gone for good (VM died / agent process exited)

    def __init__(self, id: str) -> None:
        self.id = id
        self.lost = asyncio.Event()

    @property
    def agent_client(self):
        if self.agent is None:
            raise ttrpc.Unavailable(f"sandbox {self.id} has no agent connection")
        return self.agent

    async def start(self, spec: dict | None = None) -> None:
        """Boot the sandbox; `spec` is the first container's OCI spec (it decides the network)."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def share_rootfs(self, container_id: str, host_rootfs: Path) -> GuestRootfs:
        raise NotImplementedError

    async def share_binds(self, container_id: str, binds: list) -> SharedBinds:
        """Make the sources of a container's bind mounts (shim.spec.BindMount) visible in the
        guest; `SharedBinds.sources` None means guest paths are host paths."""
        raise NotImplementedError

    async def unshare(self, container_id: str) -> None:
        """Release everything shared for the container (after its Delete)."""


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
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._watch: asyncio.Task | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "agent.sock"

    async def start(self, spec: dict | None = None) -> None:
        # Host processes: the host's network, nothing to set up.
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.dir / "vminitd.log", "ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "spinbox.vminitd.main", "--listen", f"unix:{self.socket}",
             "--state-dir", str(self.dir / "state"), "--runc", self.runc,
             "--drain-timeout", str(self.drain_timeout)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        from spinbox.shim.agent import AgentClient
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.boot_timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"local vminitd exited with {self.proc.returncode} during start: "
                                   f"{self.log_tail()}")
            if loop.time() > deadline:
                raise TimeoutError(f"local vminitd not ready within {self.boot_timeout}s: {self.log_tail()}")
            await asyncio.sleep(0.05)
        self.agent = await AgentClient.wait_ready(str(self.socket), timeout=max(1.0, deadline - loop.time()))
        self._watch = asyncio.ensure_future(self._watch_process())

    async def _watch_process(self) -> None:
        # The agent's death is the process's exit, not a connection hiccup.
        await asyncio.to_thread(self.proc.wait)
        self.lost.set()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.dir / "vminitd.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def share_rootfs(self, container_id: str, host_rootfs: Path) -> GuestRootfs:
        return GuestRootfs(path=str(host_rootfs))

    async def share_binds(self, container_id: str, binds: list) -> SharedBinds:
        return SharedBinds(None)

    async def stop(self) -> None:
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
        self.lost.set()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class VMSandbox(Sandbox):
    """A microVM per sandbox (production). `boot` is `shim.guest`'s boot function: an awaitable
    returning a Guest with `.vm` (shim.vm.machine.VM), `.agent` and `stop()`.

    A container's rootfs is shared with one virtiofs device (tag "rootfs-<n>", mounted by the
    agent as GuestRootfs.mounts), its bind sources, staged by shim.binds, with one more
    ("binds-<n>", CreateRequest.shares). The network (optional) is set up beside the boot.
    """

    def __init__(self, id: str, boot: Callable[[], Awaitable[object]], *, network=None, state=None) -> None:
        super().__init__(id)
        self._boot = boot
        self.network = network        # shim.network.lifecycle.SandboxNetworking, or None
        self.state = state            # shim.state.State: crash-safe records (bind staging dirs)
        self._stages: dict[str, Path] = {}
        self.guest = None
        self._handles: dict[str, list] = {}
        self._n = 0
        self._watch: asyncio.Task | None = None

    async def start(self, spec: dict | None = None) -> None:
        """Boot the VM while the host side of the network is set up (both take their own time:
        ~2.7 s vs ~0.05 s under TCG), then hot-plug the NICs and configure the guest. Either
        failing stops the other at once; `stop` (called by the holder) releases what exists."""
        net = self.network
        if net is not None:
            net.decide(spec or {})          # a bad config or annotation fails before any boot
        boot = asyncio.ensure_future(self._boot())
        tasks = [boot] + ([asyncio.ensure_future(net.prepare())] if net is not None else [])
        errors: list[BaseException] = []
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        finally:
            if errors or not all(t.done() for t in tasks):    # a failure, or we were cancelled
                for t in tasks:
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if boot.done() and not boot.cancelled() and boot.exception() is None:
                self.guest = boot.result()                    # stop() will stop it
        if errors:
            raise errors[0]
        self.agent = self.guest.agent
        self._watch = asyncio.ensure_future(self._watch_vm())
        if net is not None:
            from spinbox.shim.network.plan import guest_hostname
            await net.connect(self.guest.vm, self.agent, guest_hostname(spec or {}))

    async def _watch_vm(self) -> None:
        # VM death = the QEMU process exit (not a channel EOF: virtio-serial may reconnect).
        wait = getattr(self.guest.vm, "wait_died", None)
        if wait is not None:
            await wait()
            self.lost.set()

    async def _share(self, container_id: str, host_dir: str, prefix: str) -> str:
        from spinbox.shim.vm import devices
        self._n += 1
        tag = f"{prefix}-{self._n}"
        handle = await devices.add_virtiofs(self.guest.vm, host_dir, tag)
        self._handles.setdefault(container_id, []).append(handle)
        return tag

    async def share_rootfs(self, container_id: str, host_rootfs: Path) -> GuestRootfs:
        tag = await self._share(container_id, str(host_rootfs), "rootfs")
        from spinbox.shim.agent import Mount
        return GuestRootfs(mounts=[Mount("virtiofs", tag, "", ())])

    async def share_binds(self, container_id: str, binds: list) -> SharedBinds:
        """Stage the bind sources under the VM dir (shim.binds: only they are visible to the
        guest, read-only ones read-only on the host too) and share that one directory."""
        if not binds:
            return SharedBinds({})
        from spinbox.shim import binds as binds_mod
        from spinbox.shim.agent import SHARES_ROOT, Mount

        stage_dir = self.guest.vm.paths.state_dir / "binds" / container_id
        if self.state is not None:       # recorded first: `delete` unmounts and removes it
            self.state.record("dir", str(stage_dir), owner=self.id, path=str(stage_dir))
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
        if self.state is not None:
            try:
                self.state.forget("dir", str(stage_dir))
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
            from spinbox.shim import binds as binds_mod
            try:
                await asyncio.to_thread(binds_mod.release, stage_dir)
                self._forget_stage(stage_dir)
            except Exception as e:
                log.warning("sandbox %s: releasing the binds of %s: %s (left for delete)",
                            self.id, container_id, e)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for cid in list(self._handles):
            await self.unshare(cid)
        try:
            if self.guest is not None:
                await self.guest.stop()
                self.guest = None
        finally:
            if self.network is not None:       # after QEMU is gone: it held the TAPs
                await self.network.release()
            self.lost.set()


class SandboxHolder:
    """Starts the sandbox on first use (the first Create), once, and stops it at Shutdown."""

    def __init__(self, factory: Callable[[], Sandbox]) -> None:
        self._factory = factory
        self.sandbox: Sandbox | None = None
        self._lock = asyncio.Lock()
        self.on_started: list[Callable[[Sandbox], None]] = []

    async def get(self, spec: dict | None = None) -> Sandbox:
        """`spec`: the OCI spec of the container asking (the first one decides the network)."""
        async with self._lock:
            if self.sandbox is None:
                sb = self._factory()
                try:
                    await sb.start(spec)
                except BaseException:
                    try:
                        await sb.stop()
                    except Exception as e:
                        log.warning("stopping a sandbox that failed to start: %s", e)
                    raise
                self.sandbox = sb
                for cb in self.on_started:
                    cb(sb)
            return self.sandbox

    @property
    def started(self) -> bool:
        return self.sandbox is not None

    async def stop(self) -> None:
        async with self._lock:
            if self.sandbox is not None:
                sb, self.sandbox = self.sandbox, None
                await sb.stop()
