"""Boot one guest (QEMU + vminitd) for a sandbox and hand back its agent client.

    guest = await boot_guest(state_dir, config=None, share_dir=None, name="sandbox-id")
    guest.agent        # AgentClient, connected and answering pings
    guest.vm           # spinbox.shim.vm.VM (QMP, devices, pid, died/exited events)
    guest.timeline     # {"qemu_exec": 0.0, "qmp_ready": ..., "first_console": ..., "probe_ok": ...,
                       #  "ready": ..., plus guest-side marks from the console} seconds since exec
    await guest.stop() # agent Shutdown (bounded) → QEMU quit/kill; every process/file removed

The VM layer knows nothing about the agent API: the readiness probe we give it is
`AgentClient.wait_ready` on the VM's channel (virtio-serial chardev socket or vsock CID).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spinbox.api import contract

from .agent import AgentClient, AgentError
from .vm import VM, VMConfig
from .vm.machine import Restore
from .vm.qemu_args import TemplateArgv

if TYPE_CHECKING:
    from .vm.template import CloneRAM, Template

log = logging.getLogger(__name__)

# console lines printed by the guest image (initrd/README.md) → timeline keys
_GUEST_MARKS = (
    ("guest_init", re.compile(r"spinbox-init: stage1\b.*?t=([0-9.]+)")),
    ("guest_switch_root", re.compile(r"spinbox-init: switch_root\b.*?t=([0-9.]+)")),
    ("guest_vminitd_exec", re.compile(r"spinbox-init: exec vminitd\b.*?t=([0-9.]+)")),
    ("guest_vminitd_started", re.compile(r"spinbox-init: vminitd started\b.*?t=([0-9.]+)")),
    ("guest_agent_ready", re.compile(r"vminitd: ready in ([0-9.]+)s")),
)
SHUTDOWN_TIMEOUT_S = contract.SHUTDOWN_TIMEOUT_S


@dataclass
class Guest:
    vm: VM
    agent: AgentClient
    timeline: dict[str, float] = field(default_factory=dict)
    _stopped: bool = False

    @property
    def boot_seconds(self) -> float:
        return self.timeline.get("ready", float("nan"))

    async def stop(self, *, shutdown_timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Agent Shutdown (bounded), then the VM layer's stop (QMP quit → SIGKILL → cleanup).
        Idempotent; never raises for a guest that is already gone."""
        if self._stopped:
            await self.vm.stop()
            return
        self._stopped = True

        async def graceful() -> None:
            if not self.vm.alive or not self.agent.connected:
                return
            with contextlib.suppress(AgentError, Exception):
                await self.agent.shutdown(timeout=shutdown_timeout)
            # the guest powers off by itself now; the VM layer waits (bounded) for QEMU's exit
        try:
            await self.vm.stop(graceful=graceful)
        finally:
            await self.agent.close()

    async def __aenter__(self) -> Guest:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def guest_marks(console_lines: list[str]) -> dict[str, float]:
    """Guest-side uptime marks (seconds since the guest kernel started) from console lines."""
    marks: dict[str, float] = {}
    for line in console_lines:
        for key, rx in _GUEST_MARKS:
            if key not in marks:
                m = rx.search(line)
                if m:
                    with contextlib.suppress(ValueError):
                        marks[key] = float(m.group(1))
    return marks


def agent_address(vm: VM) -> Path | tuple[int, int]:
    """Where the guest agent answers: the VM's chardev socket, or (cid, port) on vsock."""
    if vm.transport is not None and vm.transport.value == "vsock":
        assert vm.cid is not None
        return (vm.cid, vm.config.vsock_port)
    return vm.paths.agent_socket


def default_config(share_dir: str | os.PathLike[str] | None = None, **overrides) -> VMConfig:
    return VMConfig.from_share_dir(share_dir, **overrides)


async def boot_guest(state_dir: str | os.PathLike[str], config: VMConfig | None = None, *,
                     share_dir: str | os.PathLike[str] | None = None, name: str = "spinbox") -> Guest:
    """Start the VM and wait until vminitd answers a ping. On failure nothing is left running
    (the VM layer cleans up; the agent client is closed) and the VM layer's error propagates."""
    if config is None:
        config = default_config(share_dir)
    return await _start_guest(VM(config, state_dir, name=name), name)


async def boot_guest_for_template(state_dir: str | os.PathLike[str], config: VMConfig, ram: TemplateArgv, *,
                                  name: str = "spinbox-template") -> Guest:
    """A cold boot with the RAM in a file and a vmgenid device (shim/vm/template.py saves it).
    Never in a sandbox's cgroup: the RAM file it writes outlives the sandbox that built it. Not
    jailed (shim/vm/jail.py): QEMU creates that file, and no sandbox workload runs in it."""
    config = dataclasses.replace(config, host_cgroup_dirs=(), qemu_jail=False)
    return await _start_guest(VM(config, state_dir, name=name), name, template=ram)


async def restore_guest(state_dir: str | os.PathLike[str], config: VMConfig, template: "Template", *,
                        ram: "CloneRAM | None" = None, name: str = "spinbox",
                        set_clock: bool = True, add_entropy: bool = True) -> Guest:
    """Start a clone of `template` (shim/vm/template.py) and wait until its vminitd answers on
    this VM's own channel; then, at once and concurrently, set the guest clock from the host
    (the clone wakes with the template's time) and give the guest kernel 64 bytes of host
    randomness with a CRNG reseed (on top of the vmgenid reseed: every clone starts from the
    template's RNG state). Timeline: `clock_set`, `entropy_added`. `ram` (default COPY:
    virtiofs works) says how the clone's RAM is backed.
    Errors as `boot_guest`: nothing is left running; the caller may boot cold instead."""
    import asyncio
    from collections.abc import Awaitable

    from .vm.template import CloneRAM, TemplateError, clone_config, clone_memory
    if config.memory_mb != template.memory_mb:   # the key covers it; a cheap guard for callers
        raise TemplateError(f"template {template.dir} has {template.memory_mb} MiB of RAM, the VM {config.memory_mb}")
    mode = ram or CloneRAM.COPY
    mem = clone_memory(template, mode)
    try:
        vm = VM(clone_config(config, mode), state_dir, name=name)
        guest = await _start_guest(vm, name, template=mem.argv,
                                   restore=Restore(template.state_file, pass_fds=mem.fds),
                                   first_stream_id=template.next_stream_id)
    finally:
        mem.close()   # QEMU holds its own copy of the fd

    async def mark(key: str, call: Awaitable[None]) -> None:
        await call
        guest.timeline[key] = guest.vm.elapsed()

    try:
        await asyncio.gather(
            *([mark("entropy_added", guest.agent.add_entropy(os.urandom(64)))] if add_entropy else []),
            *([mark("clock_set", guest.agent.set_time())] if set_clock else []))
    except BaseException:
        await guest.stop()
        raise
    log.info("guest %s restored from %s (RAM %s, %d MiB copied) in %.2f s (entropy %.2f s, clock %.2f s)", name,
             template.dir, mode.value, mem.copied_bytes >> 20, guest.timeline.get("ready", float("nan")),
             guest.timeline.get("entropy_added", float("nan")), guest.timeline.get("clock_set", float("nan")))
    return guest


async def _start_guest(vm: VM, name: str, *, template: TemplateArgv | None = None,
                       restore: Restore | None = None, first_stream_id: int = 1) -> Guest:
    config = vm.config
    holder: list[AgentClient] = []

    async def probe() -> None:
        # One wait_ready per probe round; the VM layer bounds it by its boot deadline.
        if holder and holder[0].connected:
            await holder[0].ping(timeout=1.0)
            return
        sid = first_stream_id
        for old in holder:
            if restore is not None:  # the guest may still hold the old client's ids
                sid = max(sid, old.next_stream_id)
            await old.close()
        holder.clear()
        deadline = time.monotonic() + min(config.timeouts.boot_s, 30.0)
        holder.append(await AgentClient.wait_ready(agent_address(vm), deadline, first_stream_id=sid))

    try:
        if template is None:
            timeline = await vm.start(probe=probe)
        else:
            timeline = await vm.start(probe=probe, template=template, restore=restore)
    except BaseException:
        for a in holder:
            with contextlib.suppress(Exception):
                await a.close()
        raise
    agent = holder[0]
    if vm.console is not None and restore is None:
        vm.console.poll()
        for key, t in guest_marks([ln.text for ln in vm.console.lines()]).items():
            timeline.setdefault(key, t)
    guest = Guest(vm, agent, timeline)
    log.info("guest %s ready in %.2f s%s", name, guest.boot_seconds, " (restored)" if restore else "")
    return guest
