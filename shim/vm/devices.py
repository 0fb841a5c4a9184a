"""Hot-attach devices to a running VM over QMP, each with a handle that detaches it again.

"Never claim success the guest did not confirm": these functions return what QEMU reports
(a vCPU device exists, virtio-mem's plugged `size`), nothing more. That the guest onlined a CPU
or its MemTotal grew is for the agent to confirm. virtio-mem is the one case where QEMU itself
knows the guest's answer: its `size` property only grows as the guest driver plugs blocks,
which `VirtioMem.wait_plugged()` waits for.

Every helper process (virtiofsd) belongs to the VM: it is persisted in vm.json and killed on
stop() or by kill_from_state().

q35's root bus cannot hot-plug PCI devices: each one goes into a free `pcie-root-port` that
the VM was booted with (`config.pci_hotplug_ports`).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, cast

from . import confine, logsink
from .machine import VM, VMError
from .paths import check_tag
from .qemu_args import HOTPLUG_PORT_PREFIX, VIRTIO_MEM_ID

log = logging.getLogger(__name__)
MiB = 1024 * 1024
_ids = itertools.count(1)


class DeviceError(VMError):
    pass


def _next_id(prefix: str) -> str:
    return f"{prefix}{next(_ids)}"


def _take_port(vm: VM) -> str | None:
    """A free pcie-root-port for a PCI device (None on microvm, where there is no PCI)."""
    if vm.config.machine == "microvm":
        raise DeviceError("microvm has no PCI hot-plug")
    for i in range(vm.config.pci_hotplug_ports):
        port = f"{HOTPLUG_PORT_PREFIX}{i}"
        if port not in vm.used_ports:
            vm.used_ports.add(port)
            return port
    raise DeviceError(f"no free PCIe hot-plug port (config pci_hotplug_ports={vm.config.pci_hotplug_ports})")


async def device_del(vm: VM, dev_id: str, timeout: float = 10.0) -> None:
    """device_del and wait for DEVICE_DELETED: the guest has released the device (for PCI it
    must acknowledge the unplug), so a backend may be removed only after this."""
    with vm.qmp.listener("DEVICE_DELETED") as events:
        await vm.execute("device_del", {"id": dev_id})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceError(f"device {dev_id}: no DEVICE_DELETED within {timeout} s "
                                  "(the guest did not release it)")
            try:
                ev = cast("Mapping[str, Any]", await asyncio.wait_for(events.get(), left))
            except asyncio.TimeoutError:
                continue          # the deadline check above names it
            if ev.get("data", {}).get("device") == dev_id:
                return


@dataclass
class Handle:
    vm: VM
    id: str
    port: str | None = None
    detached: bool = False

    async def detach(self, timeout: float = 10.0) -> None:
        """Unplug the device, then remove its backend. A guest that never acknowledges the
        unplug must not keep the backend's host resources: they are cut off anyway
        (`_abandon_backend`) and the error is raised. The device and its port stay taken: the
        guest may still hold them."""
        if self.detached:
            return
        try:
            await device_del(self.vm, self.id, timeout)
        except BaseException:
            await self._abandon_backend()
            raise
        self.detached = True
        if self.port:
            self.vm.used_ports.discard(self.port)
        await self._release_backend()

    async def _release_backend(self) -> None:
        pass

    async def _abandon_backend(self) -> None:
        """The guest did not release the device: take away what it reaches on the host."""


# ---------------------------------------------------------------------------------------------
# vCPUs

@dataclass
class CPUHandle(Handle):
    props: dict[str, Any] = field(default_factory=dict)


async def vcpu_count(vm: VM) -> int:
    """vCPUs QEMU has (not: the guest has online)."""
    return len(await vm.execute("query-cpus-fast"))


async def add_vcpu(vm: VM) -> CPUHandle:
    """device_add the lowest free vCPU slot. Lowest first: QEMU lists slots highest-first, and a
    guest whose next CPU gets a non-consecutive APIC id stalls onlining it under TCG
    (kernel/bootcheck.py)."""
    slots = await vm.execute("query-hotpluggable-cpus")
    free = [s for s in slots if "qom-path" not in s]
    if not free:
        raise DeviceError(f"no free vCPU slot (max_vcpus={vm.config.effective_max_vcpus})")
    order = ("node-id", "socket-id", "die-id", "cluster-id", "core-id", "thread-id")
    free.sort(key=lambda s: tuple(s["props"].get(k, 0) for k in order))
    slot = free[0]
    dev_id = _next_id("cpu")
    await vm.execute("device_add", {"driver": slot["type"], "id": dev_id, **slot["props"]})
    return CPUHandle(vm, dev_id, props=dict(slot["props"]))


async def set_vcpus(vm: VM, target: int, added: list[CPUHandle] | None = None) -> int:
    """Grow to `target` vCPUs (hot-plugged handles are appended to `added`), or shrink by
    unplugging handles from `added` newest first. Returns QEMU's count afterwards."""
    if not 1 <= target <= vm.config.effective_max_vcpus:
        raise DeviceError(f"vCPU target {target} outside 1..{vm.config.effective_max_vcpus}")
    added = added if added is not None else []
    count = await vcpu_count(vm)
    while count < target:
        added.append(await add_vcpu(vm))
        count += 1
    while count > target and added:
        await added.pop().detach()
        count -= 1
    return await vcpu_count(vm)


# ---------------------------------------------------------------------------------------------
# memory

class VirtioMem:
    """The virtio-mem device the VM booted with (requested-size 0); resize by qom-set."""

    def __init__(self, vm: VM):
        if vm.config.hotplug_memory_mb == 0 or vm.config.memory_hotplug != "virtio-mem":
            raise DeviceError("VM has no virtio-mem device (memory_hotplug virtio-mem and max_memory_mb > memory_mb)")
        self.vm = vm
        self.path = f"/machine/peripheral/{VIRTIO_MEM_ID}"

    @property
    def max_mb(self) -> int:
        return self.vm.config.hotplug_memory_mb

    async def _get(self, prop: str) -> int:
        return int(await self.vm.execute("qom-get", {"path": self.path, "property": prop}))

    async def block_size(self) -> int:
        return await self._get("block-size")

    async def plugged_bytes(self) -> int:
        """What the guest driver has plugged (QEMU's `size`): the guest's confirmation."""
        return await self._get("size")

    async def requested_bytes(self) -> int:
        return await self._get("requested-size")

    async def resize(self, extra_mb: int) -> int:
        """Ask for `extra_mb` MiB on top of boot memory (rounded up to the block size). Returns
        the requested size in bytes; see wait_plugged() for the guest's answer."""
        if not 0 <= extra_mb <= self.max_mb:
            raise DeviceError(f"virtio-mem size {extra_mb} MiB outside 0..{self.max_mb} MiB")
        bs = await self.block_size()
        size = -(-extra_mb * MiB // bs) * bs
        await self.vm.execute("qom-set", {"path": self.path, "property": "requested-size", "value": size})
        return size

    async def wait_plugged(self, timeout: float = 30.0, interval: float = 0.05) -> int:
        """Wait until the plugged size equals the requested size; returns plugged bytes.
        TimeoutError (with both numbers) if the guest does not get there."""
        deadline = time.monotonic() + timeout
        while True:
            req, plugged = await self.requested_bytes(), await self.plugged_bytes()
            if req == plugged:
                return plugged
            if time.monotonic() >= deadline:
                raise TimeoutError(f"virtio-mem: guest plugged {plugged // MiB} MiB of {req // MiB} MiB "
                                   f"requested within {timeout} s")
            await asyncio.sleep(interval)


@dataclass
class DimmHandle(Handle):
    backend_id: str = ""
    size_mb: int = 0

    async def _release_backend(self) -> None:
        await self.vm.execute("object-del", {"id": self.backend_id})


async def add_dimm(vm: VM, size_mb: int) -> DimmHandle:
    """pc-dimm fallback for guests without virtio-mem (needs a free slot and maxmem room)."""
    if size_mb <= 0 or size_mb % 128:
        raise DeviceError(f"pc-dimm size must be a positive multiple of 128 MiB (got {size_mb})")
    dev_id = _next_id("dimm")
    backend_id = dev_id + "-mem"
    backend = {"qom-type": "memory-backend-memfd" if vm.config.memory_backend == "memfd" else "memory-backend-ram",
               "id": backend_id, "size": size_mb * MiB}
    if vm.config.memory_backend == "memfd":
        backend["share"] = True  # vhost-user devices must be able to map all guest RAM
    await vm.execute("object-add", backend)
    try:
        await vm.execute("device_add", {"driver": "pc-dimm", "id": dev_id, "memdev": backend_id})
    except BaseException:
        with contextlib.suppress(Exception):
            await vm.execute("object-del", {"id": backend_id})
        raise
    return DimmHandle(vm, dev_id, backend_id=backend_id, size_mb=size_mb)


# ---------------------------------------------------------------------------------------------
# virtiofs

@dataclass
class VirtioFSHandle(Handle):
    tag: str = ""
    source: Path = Path()
    chardev_id: str = ""
    proc: asyncio.subprocess.Process | None = None
    output: logsink.ChildOutput | None = None    # its log, bounded (it logs what the guest provokes)

    async def _release_backend(self) -> None:
        with contextlib.suppress(Exception):
            await self.vm.execute("chardev-remove", {"id": self.chardev_id})
        await self.stop_daemon()

    async def _abandon_backend(self) -> None:
        # virtiofsd holds the shared tree (a deleted container's rootfs, its bind sources):
        # killed now, so the guest loses access and the tree can be unmounted.
        log.warning("virtiofs %s: the guest did not release the device; killing its virtiofsd", self.tag)
        await self.stop_daemon(grace=0)

    async def stop_daemon(self, grace: float = 2.0) -> None:
        """virtiofsd exits by itself once QEMU disconnects; kill it if it does not."""
        p = self.proc
        if p is None:
            if self.output is not None:
                self.output.close()
            return
        if p.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(p.wait(), grace)
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            await p.wait()
        if self.output is not None:
            self.output.close()
        self.vm.unregister_helper(f"virtiofsd-{self.tag}")
        log_path = self.vm.paths.virtiofsd_log(self.tag)
        for f in (self.vm.paths.virtiofs_socket(self.tag), log_path, logsink.rotated(log_path)):
            f.unlink(missing_ok=True)


_SO_ACCEPTCON = 0x10000     # /proc/net/unix "Flags": the socket is listening


async def send_fd(vm: VM, fd: int, fdname: str) -> None:
    """Give QEMU a copy of `fd` under `fdname` (QMP getfd); the caller closes its own."""
    async with vm.fd_lock:  # QEMU binds the fd to the next getfd on this monitor
        vm.qmp.send_fd_scm(fd)
        await vm.execute("getfd", {"fdname": fdname})


async def send_connection(vm: VM, path: str | os.PathLike[str], fdname: str) -> None:
    """Connect to the unix socket at `path` and give QEMU the connection as `fdname`."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.setblocking(False)
        await asyncio.get_running_loop().sock_connect(conn, os.fspath(path))
        await send_fd(vm, conn.fileno(), fdname)
    finally:
        conn.close()


def unix_socket_listening(path: str | os.PathLike[str], proc_net_unix: str = "/proc/net/unix") -> bool:
    """Whether a unix socket bound at `path` is listening in this network namespace, read from
    /proc/net/unix (`Num RefCount Protocol Flags Type St Inode Path`) without connecting."""
    want = os.fspath(path)
    try:
        with open(proc_net_unix) as f:
            next(f, None)                        # header
            for line in f:
                fields = line.split(None, 7)
                if len(fields) == 8 and fields[7].rstrip("\n") == want:
                    if int(fields[3], 16) & _SO_ACCEPTCON:
                        return True
    except OSError:
        return False
    return False


async def add_virtiofs(vm: VM, source: str | os.PathLike[str], tag: str, *, cache: str = "auto",
                       xattr: bool = False, start_timeout: float = 5.0) -> VirtioFSHandle:
    """Start a virtiofsd for `source` and hot-plug a vhost-user-fs device with `tag`.
    The guest mounts it with `mount -t virtiofs <tag> <dir>`. virtiofsd has no read-only mode:
    share a read-only bind mount for that."""
    check_tag(tag)
    if vm.config.memory_backend != "memfd":
        raise DeviceError("virtiofs needs guest RAM shared with virtiofsd: set memory_backend memfd")
    src = Path(source)
    if not src.is_dir():
        raise DeviceError(f"virtiofs source is not a directory: {src}")
    if cache not in ("auto", "always", "none"):
        raise DeviceError(f"virtiofs cache must be auto, always or none (got {cache!r})")
    sock = vm.paths.virtiofs_socket(tag)
    if sock.exists():
        raise DeviceError(f"virtiofs tag {tag!r} already attached ({sock} exists)")
    port = _take_port(vm)
    handle = VirtioFSHandle(vm, f"vfs-{tag}", port=port, tag=tag, source=src, chardev_id=f"vfs-{tag}-chr")
    try:
        argv = [vm.config.virtiofsd_binary, f"--socket-path={sock}", "-o", f"source={src}",
                "-o", f"cache={cache}", "-o", "xattr" if xattr else "no_xattr"]
        if vm.config.virtiofsd_hardening:
            argv += confine.virtiofsd_hardening_args()
        handle.output = logsink.ChildOutput(vm.paths.virtiofsd_log(tag), logsink.VIRTIOFSD_LOG_MAX_BYTES)
        try:
            handle.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=handle.output.child_fd,
                stderr=asyncio.subprocess.STDOUT, process_group=0)
        finally:
            handle.output.started()
        vm.register_helper(f"virtiofsd-{tag}", handle.proc.pid, str(sock))
        vm.add_cleanup(f"virtiofsd {tag}", handle.stop_daemon)
        # The socket file exists from bind() on, before virtiofsd listens: wait for listen(),
        # or chardev-add can fail with "Connection refused" under load. A probe connection is
        # no test: virtiofsd serves the first frontend that connects, and exits when it leaves.
        deadline = time.monotonic() + start_timeout
        while not unix_socket_listening(sock):
            if handle.proc.returncode is not None or time.monotonic() > deadline:
                if handle.proc.returncode is not None:
                    await handle.output.wait_eof(0.5)
                out_tail = "\n".join(handle.output.tail(20))[-2000:]
                raise DeviceError(f"virtiofsd for {tag!r} is not listening on {sock} "
                                  f"(exit status {handle.proc.returncode}): {out_tail}")
            await asyncio.sleep(0.005)
        # the shim connects and hands QEMU the connection: a jailed QEMU reaches no host path
        # (shim/vm/jail.py), and virtiofsd's root-owned socket needs no opening up for it
        fdname = f"{handle.chardev_id}-fd"
        await send_connection(vm, sock, fdname)
        await vm.execute("chardev-add", {"id": handle.chardev_id, "backend": {
            "type": "socket", "data": {"addr": {"type": "fd", "data": {"str": fdname}}, "server": False}}})
        await vm.execute("device_add", {"driver": "vhost-user-fs-pci", "id": handle.id, "bus": port,
                                        "chardev": handle.chardev_id, "tag": tag})
    except BaseException:
        vm.used_ports.discard(port or "")
        with contextlib.suppress(Exception):
            await vm.execute("chardev-remove", {"id": handle.chardev_id})
        await handle.stop_daemon(grace=0)
        raise
    return handle


# ---------------------------------------------------------------------------------------------
# TAP NIC

@dataclass
class NICHandle(Handle):
    netdev_id: str = ""
    mac: str = ""

    async def _release_backend(self) -> None:
        await self.vm.execute("netdev_del", {"id": self.netdev_id})


def _check_mac(mac: str) -> str:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise DeviceError(f"bad MAC address {mac!r}")
    if int(parts[0], 16) & 1:
        raise DeviceError(f"MAC address {mac!r} is multicast")
    return mac.lower()


async def add_tap_nic(vm: VM, tap_fd: int, mac: str, *, vhost: bool | None = None) -> NICHandle:
    """Hand an open TAP fd (opened in the sandbox netns) to QEMU over SCM_RIGHTS and hot-plug a
    virtio-net on it. The caller keeps and closes its own copy of the fd. `vhost` None: on
    where /dev/vhost-net can be opened (QEMU opens it itself), off elsewhere (docs/host-facts.md §2:
    this host has none, and vhost=on would make netdev_add fail)."""
    mac = _check_mac(mac)
    if vhost is None:
        from .accel import vhost_net_status
        vhost = vhost_net_status()[0]
    dev_id = _next_id("nic")
    fdname, netdev_id = f"{dev_id}-fd", f"{dev_id}-net"
    port = _take_port(vm)
    try:
        await send_fd(vm, tap_fd, fdname)
        netdev: dict[str, Any] = {"type": "tap", "id": netdev_id, "fd": fdname, "vhost": vhost}
        if vhost and vm.qemu_uid is not None:
            # a jailed QEMU cannot open /dev/vhost-net itself: the shim opens it for it
            vfd = os.open("/dev/vhost-net", os.O_RDWR | os.O_CLOEXEC)
            try:
                await send_fd(vm, vfd, f"{dev_id}-vhost")
            finally:
                os.close(vfd)
            netdev["vhostfd"] = f"{dev_id}-vhost"
        try:
            await vm.execute("netdev_add", netdev)
        except BaseException:
            with contextlib.suppress(Exception):
                await vm.execute("closefd", {"fdname": fdname})
            raise
        try:
            await vm.execute("device_add", {"driver": "virtio-net-pci", "id": dev_id, "bus": port,
                                            "netdev": netdev_id, "mac": mac, "romfile": ""})
        except BaseException:
            with contextlib.suppress(Exception):
                await vm.execute("netdev_del", {"id": netdev_id})
            raise
    except BaseException:
        vm.used_ports.discard(port or "")
        raise
    return NICHandle(vm, dev_id, port=port, netdev_id=netdev_id, mac=mac)


# ---------------------------------------------------------------------------------------------
# virtio-blk disk

@dataclass
class DiskHandle(Handle):
    node_name: str = ""
    serial: str = ""
    fdset: int | None = None      # a jailed QEMU's image fd

    async def _release_backend(self) -> None:
        await self.vm.execute("blockdev-del", {"node-name": self.node_name})
        if self.fdset is not None:
            await self.vm.execute("remove-fd", {"fdset-id": self.fdset})


async def add_disk(vm: VM, path: str | os.PathLike[str], *, readonly: bool = True, fmt: str = "raw",
                   serial: str | None = None) -> DiskHandle:
    """Hot-plug an image file as a virtio-blk disk; the guest finds it by `serial`
    (/sys/block/vdX/serial), not by its vdX name."""
    p = Path(path)
    if not p.is_file():
        raise DeviceError(f"disk image not found: {p}")
    if fmt not in ("raw", "qcow2"):
        raise DeviceError(f"disk format must be raw or qcow2 (got {fmt!r})")
    dev_id = _next_id("disk")
    serial = serial or dev_id
    if not serial.replace("-", "").replace("_", "").isalnum() or len(serial) > 20:
        raise DeviceError(f"disk serial must be <= 20 characters [A-Za-z0-9_-] (got {serial!r})")
    node = f"{dev_id}-node"
    port = _take_port(vm)
    fdset: int | None = None
    try:
        filename = str(p)
        if vm.qemu_uid is not None:
            # a jailed QEMU opens no host path: the image goes in as an fd set (/dev/fdset/N)
            fd = os.open(p, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
            try:
                async with vm.fd_lock:
                    vm.qmp.send_fd_scm(fd)
                    fdset = int((await vm.execute("add-fd", {}))["fdset-id"])
            finally:
                os.close(fd)
            filename = f"/dev/fdset/{fdset}"
        await vm.execute("blockdev-add", {"driver": fmt, "node-name": node, "read-only": readonly,
                                          "file": {"driver": "file", "filename": filename, "read-only": readonly}})
        try:
            await vm.execute("device_add", {"driver": "virtio-blk-pci", "id": dev_id, "bus": port,
                                            "drive": node, "serial": serial})
        except BaseException:
            with contextlib.suppress(Exception):
                await vm.execute("blockdev-del", {"node-name": node})
            raise
    except BaseException:
        vm.used_ports.discard(port or "")
        if fdset is not None:
            with contextlib.suppress(Exception):
                await vm.execute("remove-fd", {"fdset-id": fdset})
        raise
    return DiskHandle(vm, dev_id, port=port, node_name=node, serial=serial, fdset=fdset)
