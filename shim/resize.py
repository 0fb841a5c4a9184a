"""Resize a running sandbox VM to a `shim.sizing.Size`, and wait until the guest confirms it.

Growing: vCPUs are hot-plugged in core-id order (`devices.set_vcpus`), then the guest onlines
them (agent OnlineCpus) and must report them online; memory grows by virtio-mem (QEMU's
plugged size is the guest driver's answer), or one pc-dimm, then the guest onlines the blocks
(agent OnlineMemory) and its MemTotal must show the growth. Only then is the size recorded.
A grow that fails part way is undone (best effort) before the error leaves.

Shrinking: hot-plugged vCPUs are unplugged newest first (the guest offlines them for the ACPI
eject) and virtio-mem is asked for less; what the guest does not give back within the timeout
is logged and kept in the recorded size: the size is never claimed smaller than confirmed.

Under TCG vCPUs are parked, not unplugged: QEMU 7.2 corrupts its heap when a vCPU is hot-plugged
again after an unplug (reproduced: `malloc(): unsorted double linked list corrupted`, QEMU
killed by SIGABRT on the re-plug, the sandbox lost). A parked vCPU is offline in the guest (agent
SetOnlineCpus), its QEMU thread halted and outside the host cgroup's CPU quota (which follows
the size); a later grow brings parked vCPUs back online before it hot-plugs new ones.

One resize at a time: `lock` is held by whoever resizes (shim.sandbox.VMSandbox.resize, which
Create, Update and the vCPU controller all go through).

Persisted: every confirmed size is written to the shim's state as a `vmsize` record (the
vCPUs, the plugged memory, the hot-plugged devices by id), so `delete` after a crash reports
what the VM had, and a resizer made again for the same VM (`adopt`) resizes from that size
instead of the boot shape. The record goes when the sandbox stops (`forget`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import counters, releasers
from .agent import AgentClient
from .sizing import MiB, Limits, Size, SizingError, dimm_sizes
from .state import State
from .vm import devices
from .vm.machine import VM

log = logging.getLogger(__name__)
CONFIRM_TIMEOUT_S = 60.0      # TCG guest, 2 shared host cores: onlining 1 GiB takes seconds
UNPLUG_TIMEOUT_S = 30.0       # one vCPU's ACPI eject: the guest offlines it first
RECORD_KIND = "vmsize"


def limits_of(vm: VM) -> Limits:
    c = vm.config
    return Limits(c.effective_max_vcpus, c.memory_mb + c.hotplug_memory_mb, c.machine, c.memory_hotplug)


def base_of(vm: VM) -> Size:
    return Size(vm.config.vcpus, vm.config.memory_mb)


@dataclass(frozen=True)
class SizeRecord:
    """What a `vmsize` record holds: the confirmed size and the devices behind it."""
    vcpus: int
    memory_mb: int
    cpus: tuple[tuple[str, Mapping[str, int]], ...] = ()       # (device id, slot props), oldest first
    dimms: tuple[tuple[str, str, int], ...] = ()               # (device id, backend id, MiB)
    base_total: int | None = None                              # guest MemTotal before any plug

    def to_data(self) -> dict[str, Any]:
        return {"vcpus": self.vcpus, "memory_mb": self.memory_mb,
                "cpus": [{"id": i, "props": dict(p)} for i, p in self.cpus],
                "dimms": [{"id": i, "backend_id": b, "size_mb": m} for i, b, m in self.dimms],
                "base_total": self.base_total}

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> SizeRecord:
        """A record read back (root's own file, still checked: a half-written or hand-edited
        one must fail here by name, not later in QMP)."""
        def num(v: Any, what: str, lo: int = 0) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SizingError(f"vmsize record: {what} must be an integer >= {lo} (got {v!r})")
            return v

        def name(v: Any, what: str) -> str:
            if not isinstance(v, str) or not v or len(v) > 64 or not v.replace("-", "").isalnum():
                raise SizingError(f"vmsize record: {what} must be a device id (got {v!r})")
            return v
        try:
            cpus = tuple((name(c["id"], "cpus[].id"),
                          {str(k): num(x, f"cpus[].props.{k}") for k, x in dict(c["props"]).items()})
                         for c in d.get("cpus") or ())
            dimms = tuple((name(m["id"], "dimms[].id"), name(m["backend_id"], "dimms[].backend_id"),
                           num(m["size_mb"], "dimms[].size_mb", 1)) for m in d.get("dimms") or ())
        except (KeyError, TypeError, ValueError) as e:
            raise SizingError(f"vmsize record: malformed device list ({e})") from None
        bt = d.get("base_total")
        return cls(num(d.get("vcpus"), "vcpus", 1), num(d.get("memory_mb"), "memory_mb", 1), cpus, dimms,
                   None if bt is None else num(bt, "base_total", 1))

    def describe(self) -> str:
        devs = [i for i, _ in self.cpus] + [i for i, _, _ in self.dimms]
        return (f"{self.vcpus} vCPU(s) / {self.memory_mb} MiB"
                + (f" (hot-plugged: {', '.join(devs)})" if devs else " (nothing hot-plugged)"))


@releasers.releaser(RECORD_KIND)
async def release_size_record(r: dict[str, Any]) -> str:
    """Nothing to undo on the host: the hot-plugged devices live in QEMU and go with it (the
    `vm` record's release). What the VM had is said, for the log of a `delete` after a crash."""
    try:
        return f"vm {r.get('key')} was {SizeRecord.from_data(r).describe()}"
    except SizingError as e:
        return f"vm {r.get('key')}: {e}"


@dataclass
class VMResizer:
    vm: VM
    agent: AgentClient
    timeout: float = CONFIRM_TIMEOUT_S
    records: State | None = None              # where each confirmed size is persisted
    owner: str = ""
    size: Size = field(init=False)            # what the guest confirmed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _cpus: list[devices.CPUHandle] = field(default_factory=list)
    _dimms: list[devices.DimmHandle] = field(default_factory=list)
    _base_total: int | None = None            # guest MemTotal with nothing hot-plugged

    def __post_init__(self) -> None:
        self.size = base_of(self.vm)

    # --- persisted size --------------------------------------------------------------------

    def snapshot(self) -> SizeRecord:
        return SizeRecord(self.size.vcpus, self.size.memory_mb,
                          tuple((h.id, dict(h.props)) for h in self._cpus),
                          tuple((h.id, h.backend_id, h.size_mb) for h in self._dimms), self._base_total)

    def _persist(self) -> None:
        if self.records is None:
            return
        try:
            self.records.record(RECORD_KIND, self.vm.name, owner=self.owner, **self.snapshot().to_data())
        except Exception as e:      # the VM's size is still right; only a crash report would miss it
            log.warning("vm %s: persisting its size %s: %s", self.vm.name, self.size.describe(), e)

    async def adopt(self, rec: SizeRecord) -> None:
        """Take over the size a previous resizer of this VM recorded, if QEMU agrees on the
        vCPUs; otherwise the record is refused by name and the resizer starts from QEMU's
        count with no handles (it can grow, not unplug what it does not know)."""
        have = await devices.vcpu_count(self.vm)
        plugged = self.vm.config.vcpus + len(rec.cpus)       # parked ones included
        if have != plugged:
            raise SizingError(f"vm {self.vm.name}: the recorded size has {plugged} vCPU devices, QEMU has {have}")
        self._cpus = [devices.CPUHandle(self.vm, i, props=dict(p)) for i, p in rec.cpus]
        self._dimms = [devices.DimmHandle(self.vm, i, backend_id=b, size_mb=m) for i, b, m in rec.dimms]
        self._base_total = rec.base_total
        self.size = Size(rec.vcpus, rec.memory_mb)

    def forget(self) -> None:
        """The VM is gone: so is its size."""
        if self.records is not None:
            try:
                self.records.forget(RECORD_KIND, self.vm.name)
            except Exception as e:
                log.warning("vm %s: forgetting its size: %s", self.vm.name, e)

    # --- resizing --------------------------------------------------------------------------

    async def resize(self, want: Size) -> Size:
        """Grow to `want` (confirmed by the guest), or shrink as far as the guest lets go.
        Returns the confirmed size. The caller holds `lock`."""
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
            self._persist()
            raise
        if want.vcpus < self.size.vcpus or want.memory_mb < self.size.memory_mb:
            await self._shrink(want)
        if self.size != before:
            counters.RESIZES.observe(before.vcpus, self.size.vcpus, before.memory_mb, self.size.memory_mb)
            self._persist()
            await self._report(before)
        return self.size

    async def _report(self, before: Size) -> None:
        """One line with both sides' figures: QEMU's (query-cpus-fast, virtio-mem's plugged
        size) and the guest's (CPUs online, MemTotal), so a size is never only claimed."""
        try:
            qemu_cpus = await devices.vcpu_count(self.vm)
            plugged = (await devices.VirtioMem(self.vm).plugged_bytes() // MiB
                       if self.vm.config.memory_hotplug == "virtio-mem" and self.vm.config.hotplug_memory_mb
                       else sum(d.size_mb for d in self._dimms))
            info, mem = await self.agent.info(), await self.agent.online_memory()
        except Exception as e:
            log.warning("vm %s: resized %s -> %s; reading the figures back: %s", self.vm.name,
                        before.describe(), self.size.describe(), e)
            return
        log.info("vm %s: resized %s -> %s (QEMU: %d vCPUs, %d MiB plugged; guest: %d CPUs online, "
                 "MemTotal %d MiB)", self.vm.name, before.describe(), self.size.describe(), qemu_cpus,
                 plugged, info.cpus_online, mem.memory_total_bytes // MiB)

    # --- vCPUs -----------------------------------------------------------------------------

    @property
    def parks_vcpus(self) -> bool:
        """Give vCPUs back by offlining them in the guest instead of unplugging (TCG)."""
        accel = getattr(self.vm, "accel", None)
        return getattr(accel, "value", accel) == "tcg"

    async def _set_vcpus(self, n: int) -> None:
        if await devices.vcpu_count(self.vm) < n:
            await devices.set_vcpus(self.vm, n, self._cpus)
        if self.parks_vcpus:        # online exactly n: parked ones first, the new ones after
            await self._wait_cpus(lambda online: online == n, f"{n} vCPUs online", park_to=n)
        else:
            await self._wait_cpus(lambda online: online >= n, f"{n} vCPUs online")
        self.size = Size(n, self.size.memory_mb)

    async def _wait_cpus(self, ok, what: str, park_to: int | None = None) -> int:
        deadline = time.monotonic() + self.timeout
        while True:
            r = (await self.agent.set_online_cpus(park_to) if park_to is not None
                 else await self.agent.online_cpus())
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
            n = max(want.vcpus, self.vm.config.vcpus)
            await (self._park_vcpus(n) if self.parks_vcpus else self._unplug_vcpus(n))
        if want.memory_mb < self.size.memory_mb and self.vm.config.memory_hotplug == "virtio-mem":
            await self._give_back_memory(want.memory_mb)
        elif want.memory_mb < self.size.memory_mb:
            log.warning("vm %s: pc-dimm memory is not unplugged: keeping %d MiB (wanted %d MiB)",
                        self.vm.name, self.size.memory_mb, want.memory_mb)

    async def _unplug_vcpus(self, n: int) -> None:
        """Newest first; a vCPU whose eject the guest does not acknowledge keeps its handle (it
        may still go later: the next resize counts again) and stops the shrink there."""
        why = ""
        t = time.monotonic()
        while len(self._cpus) and self.vm.config.vcpus + len(self._cpus) > n:
            h = self._cpus[-1]
            try:
                await self._eject(h)
            except Exception as e:
                why = str(e)
                break
            self._cpus.pop()
        count = await devices.vcpu_count(self.vm)
        online = await self._wait_cpus(lambda online: online <= count, f"{count} vCPUs")
        log.info("vm %s: vCPUs %d -> %d in %.2f s (QEMU's count, the guest's online CPUs)", self.vm.name,
                 self.size.vcpus, max(count, online), time.monotonic() - t)
        self.size = Size(max(count, online), self.size.memory_mb)
        if self.size.vcpus > n:
            log.warning("vm %s: the guest kept %d vCPUs, not %d: %s", self.vm.name, self.size.vcpus, n,
                        why or "no hot-plugged vCPU left to unplug")

    async def _park_vcpus(self, n: int) -> None:
        """Offline the newest vCPUs in the guest; the size is what the guest then has online."""
        t = time.monotonic()
        why = ""
        try:
            online = await self._wait_cpus(lambda online: online <= n, f"{n} vCPUs online", park_to=n)
        except Exception as e:
            why = str(e)
            online = (await self.agent.info()).cpus_online
        qemu = await devices.vcpu_count(self.vm)
        log.info("vm %s: vCPUs %d -> %d online in %.2f s, %d parked (offline in the guest; QEMU keeps "
                 "them: unplug is unsafe under TCG)", self.vm.name, self.size.vcpus, online,
                 time.monotonic() - t, qemu - online)
        self.size = Size(online, self.size.memory_mb)
        if self.size.vcpus > n:
            log.warning("vm %s: the guest kept %d vCPUs online, not %d: %s", self.vm.name, self.size.vcpus, n, why)

    async def _eject(self, h: devices.CPUHandle) -> None:
        """device_del, then until QEMU no longer lists the vCPU (query-cpus-fast): the guest
        offlined it and ran the ACPI eject. QEMU's count, not the DEVICE_DELETED event, is what
        is waited on: it is the state itself, and a missed event cannot stall the shrink."""
        path = f"/machine/peripheral/{h.id}"
        await self.vm.execute("device_del", {"id": h.id})
        deadline = time.monotonic() + min(self.timeout, UNPLUG_TIMEOUT_S)
        while any(c.get("qom-path") == path for c in await self.vm.execute("query-cpus-fast")):
            if time.monotonic() > deadline:
                raise SizingError(f"the guest did not release vCPU {h.id} within "
                                  f"{min(self.timeout, UNPLUG_TIMEOUT_S):.0f} s (no ACPI eject)")
            await asyncio.sleep(0.05)
        h.detached = True

    async def _give_back_memory(self, mb: int) -> None:
        """virtio-mem asked for less; QEMU's plugged size says what the guest unplugged (it can
        only offline blocks that hold no unmovable pages), MemTotal must follow."""
        base_mb = self.vm.config.memory_mb
        mem = devices.VirtioMem(self.vm)
        why = ""
        t = time.monotonic()
        try:
            await mem.resize(max(0, mb - base_mb))
            plugged = await mem.wait_plugged(self.timeout)
        except Exception as e:
            why = str(e)
            plugged = await mem.plugged_bytes()
        unplugged_s = time.monotonic() - t
        self.size = Size(self.size.vcpus, base_mb + plugged // MiB)
        if self.size.memory_mb > mb:
            log.warning("vm %s: the guest gave back memory down to %d MiB only, not %d MiB: %s",
                        self.vm.name, self.size.memory_mb, mb, why)
        assert self._base_total is not None
        want_total = self._base_total + plugged
        deadline = time.monotonic() + self.timeout
        while (total := (await self.agent.online_memory()).memory_total_bytes) > want_total:
            if time.monotonic() > deadline:
                log.warning("vm %s: QEMU has %d MiB plugged but the guest's MemTotal is still %d MiB "
                            "over its base", self.vm.name, plugged // MiB, (total - self._base_total) // MiB)
                break
            await asyncio.sleep(0.05)
        log.info("vm %s: virtio-mem down to %d MiB plugged in %.2f s, the guest's MemTotal followed in %.2f s",
                 self.vm.name, plugged // MiB, unplugged_s, time.monotonic() - t)

    async def _undo(self, before: Size) -> None:
        try:
            await self._shrink(before)
        except Exception as e:
            log.warning("vm %s: undoing a failed resize: %s", self.vm.name, e)

