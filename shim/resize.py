"""Resize a running sandbox VM to a `shim.sizing.Size`, and wait until the guest confirms it.

Growing: vCPUs are hot-plugged in core-id order (`devices.set_vcpus`), then the guest onlines
them (agent OnlineCpus) and must report them online; memory grows by virtio-mem (QEMU's
plugged size is the guest driver's answer), or one pc-dimm, then the guest onlines the blocks
(agent OnlineMemory) and its MemTotal must show the growth. Only then is the size recorded.
A grow that fails part way is undone (best effort) before the error leaves.

Shrinking: hot-plugged vCPUs are unplugged newest first (the guest offlines them for the ACPI
eject) and virtio-mem is asked for less; what the guest does not give back within the timeout
is logged and kept in the recorded size: the size is never claimed smaller than confirmed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from .agent import AgentClient
from .sizing import MiB, Limits, Size, SizingError, dimm_sizes
from .vm import devices
from .vm.machine import VM

log = logging.getLogger(__name__)
CONFIRM_TIMEOUT_S = 60.0      # TCG guest, 2 shared host cores: onlining 1 GiB takes seconds


def limits_of(vm: VM) -> Limits:
    c = vm.config
    return Limits(c.effective_max_vcpus, c.memory_mb + c.hotplug_memory_mb, c.machine, c.memory_hotplug)


def base_of(vm: VM) -> Size:
    return Size(vm.config.vcpus, vm.config.memory_mb)


@dataclass
class VMResizer:
    vm: VM
    agent: AgentClient
    timeout: float = CONFIRM_TIMEOUT_S
    size: Size = field(init=False)            # what the guest confirmed
    _cpus: list[devices.CPUHandle] = field(default_factory=list)
    _dimms: list[devices.DimmHandle] = field(default_factory=list)
    _base_total: int | None = None            # guest MemTotal with nothing hot-plugged

    def __post_init__(self) -> None:
        self.size = base_of(self.vm)

    async def resize(self, want: Size) -> Size:
        """Grow to `want` (confirmed by the guest), or shrink as far as the guest lets go.
        Returns the confirmed size."""
        if self._base_total is None:
            self._base_total = (await self.agent.online_memory()).memory_total_bytes
        before = self.size
        try:
            if want.vcpus > self.size.vcpus:
                await self._set_vcpus(want.vcpus)
            if want.memory_mb > self.size.memory_mb:
                await self._set_memory(want.memory_mb)
        except BaseException:
            await self._undo(before)
            raise
        if want.vcpus < self.size.vcpus or want.memory_mb < self.size.memory_mb:
            await self._shrink(want)
        return self.size

    # --- vCPUs -----------------------------------------------------------------------------

    async def _set_vcpus(self, n: int) -> None:
        await devices.set_vcpus(self.vm, n, self._cpus)
        await self._wait_cpus(lambda online: online >= n, f"{n} vCPUs online")
        self.size = Size(n, self.size.memory_mb)

    async def _wait_cpus(self, ok, what: str) -> int:
        deadline = time.monotonic() + self.timeout
        while True:
            r = await self.agent.online_cpus()
            if ok(r.online):
                return r.online
            if time.monotonic() > deadline:
                raise SizingError(f"the guest did not confirm {what} within {self.timeout:.0f} s "
                                  f"({r.online} online, {r.present} present)")
            await asyncio.sleep(0.05)

    # --- memory ----------------------------------------------------------------------------

    async def _set_memory(self, mb: int) -> None:
        base_mb = self.vm.config.memory_mb
        if self.vm.config.memory_hotplug == "virtio-mem":
            mem = devices.VirtioMem(self.vm)
            await mem.resize(mb - base_mb)
            plugged = await mem.wait_plugged(self.timeout)
        else:                                   # pc-dimm: one DIMM for the growth
            have = sum(d.size_mb for d in self._dimms)
            free = self.vm.config.memory_slots - len(self._dimms)
            for sz in dimm_sizes(mb - base_mb - have, free):
                self._dimms.append(await devices.add_dimm(self.vm, sz))
            plugged = sum(d.size_mb for d in self._dimms) * MiB
        await self._wait_memory(plugged)
        self.size = Size(self.size.vcpus, base_mb + plugged // MiB)

    async def _wait_memory(self, plugged: int) -> int:
        """Until the guest's MemTotal shows `plugged` bytes on top of its base."""
        assert self._base_total is not None
        want = self._base_total + plugged
        deadline = time.monotonic() + self.timeout
        while True:
            r = await self.agent.online_memory()
            if r.memory_total_bytes >= want:
                return r.memory_total_bytes
            if time.monotonic() > deadline:
                raise SizingError(f"the guest did not confirm {plugged // MiB} MiB more memory within "
                                  f"{self.timeout:.0f} s (MemTotal {r.memory_total_bytes // MiB} MiB, "
                                  f"want {want // MiB} MiB)")
            await asyncio.sleep(0.05)

    # --- shrink / undo ---------------------------------------------------------------------

    async def _shrink(self, want: Size) -> None:
        if want.vcpus < self.size.vcpus:
            try:
                n = await devices.set_vcpus(self.vm, max(want.vcpus, self.vm.config.vcpus), self._cpus)
                online = await self._wait_cpus(lambda online: online <= n, f"{n} vCPUs")
                self.size = Size(max(n, online), self.size.memory_mb)
            except Exception as e:
                log.warning("vm %s: could not unplug vCPUs down to %d: %s (keeping %d)",
                            self.vm.name, want.vcpus, e, self.size.vcpus)
        if want.memory_mb < self.size.memory_mb and self.vm.config.memory_hotplug == "virtio-mem":
            mem = devices.VirtioMem(self.vm)
            try:
                await mem.resize(max(0, want.memory_mb - self.vm.config.memory_mb))
                plugged = await mem.wait_plugged(self.timeout)
            except Exception as e:
                plugged = await mem.plugged_bytes()
                log.warning("vm %s: the guest gave back memory down to %d MiB only, not %d: %s",
                            self.vm.name, self.vm.config.memory_mb + plugged // MiB, want.memory_mb, e)
            self.size = Size(self.size.vcpus, self.vm.config.memory_mb + plugged // MiB)
        elif want.memory_mb < self.size.memory_mb:
            log.warning("vm %s: pc-dimm memory is not unplugged: keeping %d MiB (wanted %d MiB)",
                        self.vm.name, self.size.memory_mb, want.memory_mb)

    async def _undo(self, before: Size) -> None:
        try:
            await self._shrink(before)
        except Exception as e:
            log.warning("vm %s: undoing a failed resize: %s", self.vm.name, e)

