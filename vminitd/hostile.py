"""A hostile agent, for the host's tests: vminitd misbehaving on purpose.

With `spinbox.hostile=<mode>[,<mode>...]` on the kernel command line (the host puts it there
only when its config says so: `guest.kernel_cmdline_extra`, which a test sets), vminitd serves
the agent API as usual and also does what a guest taken over by its workload could do to the
host through the agent channel. The host's integration tests (integration/test_hostile_guest.py)
check that the shim stays bounded and keeps serving while it happens.

| mode | what the guest does |
|---|---|
| `oom-flood` | after each Create, OOM events for that container and for ids that do not exist, as fast as the agent can publish them, for FLOOD_S seconds (the event ring overflows: gaps) |
| `event-lies` | after each Start, exits that are lies: for ids that do not exist, for the container with a wrong pid, with the largest pid, for an exec that does not exist; and every real event sent again as a replay (an older sequence number) with `gap` set |
| `reply-lies` | Pids answers more processes than the host accepts |
| `output-overrun` | a container's stdout stream sends 8 MiB beyond the host's window, then a chunk at offset 0 |
| `qmp-flood` | after each Start, for FLOOD_S seconds, writes ACPI CPU hot-plug OST status registers from a thread (/dev/port, or iopl + `out`: what root in the guest can do): each write makes QEMU send an ACPI_DEVICE_OST event on the shim's QMP connection, with no throttle in QEMU |

Why this can live in the image: root in the guest can do all of it anyway (replace this file,
load a module, write the channel); the mode only makes it reproducible. It reaches the host only
through the channels every guest has. Unknown mode names are logged and ignored.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import mmap
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import events_pb2 as epb
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb

log = logging.getLogger(__name__)

PARAM = "spinbox.hostile"
MODES = ("oom-flood", "event-lies", "reply-lies", "output-overrun", "qmp-flood")
FLOOD_S = 20.0              # how long one container's OOM flood lasts
FLOOD_BATCH = 256           # events published between two yields to the loop
PID_LIES = 70000            # more than the host's limit on a Pids answer
UINT32_MAX = (1 << 32) - 1
OVERRUN_BYTES = 8 << 20
# q35's ACPI CPU hot-plug block (QEMU hw/acpi/cpu.c on ICH9): selector (4 bytes at +0), command
# (1 byte at +5), command data (4 bytes at +8); command 2 = "OST status": each data write sends
# the event ACPI_DEVICE_OST to every QMP monitor
CPU_HOTPLUG_BASE = 0x0CD8
OST_STATUS_CMD = 2


class PortIO:
    """Byte writes to I/O ports, as root in the guest can: /dev/port (one `outb` per byte at
    successive ports), or else iopl(3) and `out` from a few bytes of code in an executable
    page (a kernel without /dev/port)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open("/dev/port", os.O_WRONLY)
            return
        except OSError:
            pass
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.iopl(3) != 0:
            raise OSError(ctypes.get_errno(), "no /dev/port, and iopl(3) failed")
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        # outb(value=edi, port=esi): mov eax,edi; mov edx,esi; out dx,al; ret
        self._page.write(bytes([0x89, 0xF8, 0x89, 0xF2, 0xEE, 0xC3]))
        self._outb = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32)(
            ctypes.addressof(ctypes.c_char.from_buffer(self._page)))

    def outb(self, value: int, port: int) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, bytes([value]), port)
        else:
            self._outb(value, port)


def qmp_flood(seconds: float) -> int:
    """ACPI_DEVICE_OST events as fast as the vCPU writes them; returns how many were sent."""
    io = PortIO()
    io.outb(0, CPU_HOTPLUG_BASE)                 # CPU 0 (a 1-byte write of the selector)
    io.outb(OST_STATUS_CMD, CPU_HOTPLUG_BASE + 5)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(1000):
            io.outb(0x80, CPU_HOTPLUG_BASE + 8)
        n += 1000
        time.sleep(0)
    return n


def modes(cmdline: dict[str, str]) -> frozenset[str]:
    words = {w for w in cmdline.get(PARAM, "").split(",") if w}
    for w in sorted(words - set(MODES)):
        log.warning("%s: unknown mode %r ignored", PARAM, w)
    return frozenset(words & set(MODES))


class _Delegate:
    """Everything not overridden goes to the real servicer."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class HostileContainers(_Delegate):
    def __init__(self, inner: Any, agent: Any, active: frozenset[str]) -> None:
        super().__init__(inner)
        self._agent = agent
        self._modes = active
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def Start(self, req: cpb.StartRequest) -> cpb.StartResponse:
        r = await self._inner.Start(req)
        # The flood starts once the container runs: flooding from Create on makes the guest's
        # (TCG) vCPU too busy to answer its own Start within containerd's deadline on a busy
        # host, and then nothing of the host's behaviour under the flood gets measured.
        if "oom-flood" in self._modes and not req.exec_id:
            self._spawn(self._oom_flood(req.id))
        if "event-lies" in self._modes and not req.exec_id:
            self._event_lies(req.id, r.pid)
        if "qmp-flood" in self._modes and not req.exec_id:
            threading.Thread(target=self._qmp_flood, name="hostile-qmp", daemon=True).start()
        return r

    @staticmethod
    def _qmp_flood() -> None:
        try:
            log.info("hostile: %d ACPI OST writes in %.0fs", qmp_flood(FLOOD_S), FLOOD_S)
        except Exception as e:      # a kernel without iopl, say: the test sees no event then
            log.warning("hostile: qmp flood failed: %r", e)

    async def Pids(self, req: cpb.PidsRequest) -> cpb.PidsResponse:
        r = await self._inner.Pids(req)
        if "reply-lies" in self._modes:
            r.processes.extend(cpb.ProcessInfo(pid=1000 + i) for i in range(PID_LIES))
        return r

    async def _oom_flood(self, id: str) -> None:
        events = self._agent.events
        end = time.monotonic() + FLOOD_S
        n = 0
        while time.monotonic() < end:
            for i in range(FLOOD_BATCH):
                events.publish("oom", id=id if i % 2 else f"ghost-{n % 1000}")
                n += 1
            await asyncio.sleep(0)
        log.info("hostile: published %d OOM events in %.0fs", n, FLOOD_S)

    def _event_lies(self, id: str, pid: int) -> None:
        publish = self._agent.events.publish
        now = time.time_ns()
        publish("exit", id="ghost", exec_id="", pid=1, exit_status=0, exited_at_ns=now)
        publish("exit", id=id, exec_id="", pid=pid + 1000, exit_status=9, exited_at_ns=now)
        publish("exit", id=id, exec_id="", pid=UINT32_MAX, exit_status=UINT32_MAX, exited_at_ns=-1)
        publish("exit", id=id, exec_id="no-such-exec", pid=pid, exit_status=3, exited_at_ns=now)
        publish("oom", id="ghost")
        log.info("hostile: published lies about %s (pid %d)", id, pid)


class HostileEvents(_Delegate):
    def __init__(self, inner: Any, active: frozenset[str]) -> None:
        super().__init__(inner)
        self._modes = active

    async def Subscribe(self, req: epb.SubscribeRequest) -> AsyncIterator[epb.Event]:
        async for msg in self._inner.Subscribe(req):
            yield msg
            if "event-lies" in self._modes and msg.seq > 1:
                replay = epb.Event()
                replay.CopyFrom(msg)
                replay.seq = msg.seq - 1
                replay.gap = True
                yield replay


class HostileStdio(_Delegate):
    def __init__(self, inner: Any, active: frozenset[str]) -> None:
        super().__init__(inner)
        self._modes = active

    async def Output(self, requests: AsyncIterator[spb.OutputClient],
                     send: Callable[[Any], Awaitable[None]]) -> None:
        first = await anext(requests, None)

        async def again() -> AsyncIterator[spb.OutputClient]:
            if first is not None:
                yield first
            async for m in requests:
                yield m

        if ("output-overrun" not in self._modes or first is None or first.WhichOneof("msg") != "open"
                or first.open.exec_id or first.open.fd != spb.STDOUT):
            await self._inner.Output(again(), send)
            return
        o = first.open
        chunk = b"x" * (1 << 20)
        off = o.offset
        try:
            while off < o.offset + o.window + OVERRUN_BYTES:
                await send(spb.OutputServer(offset=off, data=chunk))
                off += len(chunk)
            await send(spb.OutputServer(offset=0, data=b"again from the start"))
            log.info("hostile: sent %d bytes into a window of %d", off - o.offset, o.window)
            async for _ in requests:
                pass
        except Exception as e:       # the host ended the stream: what it should do
            log.info("hostile: output stream ended by the host after %d bytes: %r", off - o.offset, e)


def wrap(impls: dict[str, Any], agent: Any, active: frozenset[str]) -> dict[str, Any]:
    """The servicers of `impls` with the `active` modes' misbehaviour on top."""
    if not active:
        return impls
    log.warning("hostile agent modes on: %s", ",".join(sorted(active)))
    out = dict(impls)
    out["Containers"] = HostileContainers(impls["Containers"], agent, active)
    out["Events"] = HostileEvents(impls["Events"], active)
    out["Stdio"] = HostileStdio(impls["Stdio"], active)
    return out
