#!/usr/bin/env python3
"""Boot the guest kernel under QEMU with a throwaway busybox initramfs, and measure it.

Used by integration/test_kernel_boot.py (functional checks) and, as a script, for the numbers in
kernel/README.md:

    python3 kernel/bootcheck.py boot --machine q35 --runs 5
    python3 kernel/bootcheck.py boot --machine microvm --runs 5
    python3 kernel/bootcheck.py hotplug --runs 3

Only the standard library: this runs before any spinbox code exists in a guest, and the VM layer
proper (QMP client, argv builder, watchdog) lives in spinbox.shim.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
DEFAULT_SHARE_DIR = "/usr/share/spinbox"
INIT_MARKER = "SPINBOX-INIT-OK"
DONE_MARKER = "SPINBOX-INIT-DONE"
VPORT_NAME = "org.spinbox.test"
MiB = 1024 * 1024

# PID 1 of the check. It prints one line per fact so the host can parse them, then either powers
# off or (spinbox.test=hotplug) onlines new vCPUs and reports nproc/MemTotal whenever they change.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
read up _ < /proc/uptime
echo "SPINBOX-INIT-OK uptime=$up"
if mount -t cgroup2 cgroup2 /sys/fs/cgroup; then
    echo "CGROUP2 $(cat /sys/fs/cgroup/cgroup.controllers)"
    echo "+cpu +cpuset +memory +pids +io" > /sys/fs/cgroup/cgroup.subtree_control
    echo "SUBTREE $(cat /sys/fs/cgroup/cgroup.subtree_control)"
fi
for d in /sys/class/virtio-ports/*; do
    [ -e "$d/name" ] || continue
    p=${d##*/}
    [ -c "/dev/$p" ] && kind=chardev || kind=missing
    echo "VPORT $p $(cat $d/name) $kind"
done
[ -e /sys/class/tty/hvc0 ] && echo "HVC hvc0"
echo "FS $(while read a b; do echo -n "${b:-$a} "; done < /proc/filesystems)"
echo "NS $(ls /proc/self/ns | tr '\n' ' ')"
echo "SECCOMP $(grep '^Seccomp:' /proc/self/status)"
echo "NPROC $(nproc)"
echo "MEMTOTAL $(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
# the VM generation id driver (CONFIG_VMGENID): "VMGENID driver <bound ACPI devices>"
if [ -d /sys/bus/acpi/drivers/vmgenid ]; then
    echo "VMGENID driver $(cd /sys/bus/acpi/drivers/vmgenid && ls -d *:* 2>/dev/null | tr '\n' ' ')"
else
    echo "VMGENID none"
fi
case " $(cat /proc/cmdline) " in
*" spinbox.test=mounts "*)
    # every rootfs-sharing path: virtio-blk disks named by their serial (= fs type), virtiofs, 9p
    for d in /sys/block/vd*; do
        fs=$(cat "$d/serial")
        mkdir -p "/mnt/$fs"
        mount -t "$fs" -o ro "/dev/${d##*/}" "/mnt/$fs" && echo "MOUNT $fs $(cat /mnt/$fs/marker)"
    done
    mkdir -p /mnt/virtiofs /mnt/9p
    mount -t virtiofs share /mnt/virtiofs && echo "MOUNT virtiofs $(cat /mnt/virtiofs/marker)"
    mount -t 9p -o trans=virtio,version=9p2000.L,ro share9p /mnt/9p &&
        echo "MOUNT 9p $(cat /mnt/9p/marker)"
    # an overlay on top, as runc would get it: erofs lower, tmpfs upper
    mkdir -p /ovl && mount -t tmpfs tmpfs /ovl && mkdir -p /ovl/u /ovl/w /ovl/m &&
        mount -t overlay overlay -o lowerdir=/mnt/erofs,upperdir=/ovl/u,workdir=/ovl/w /ovl/m &&
        echo changed > /ovl/m/marker && echo "MOUNT overlay $(cat /ovl/m/marker)"
    ;;
*" spinbox.test=hotplug "*)
    last=
    while :; do
        # hot-added vCPUs arrive offline: the guest (vminitd) must online them
        for f in /sys/devices/system/cpu/cpu*/online; do
            read v < "$f"; [ "$v" = 0 ] && echo 1 > "$f"
        done
        while read k v _; do [ "$k" = MemTotal: ] && break; done < /proc/meminfo
        cur="nproc=$(nproc) memtotal_kb=$v"
        if [ "$cur" != "$last" ]; then
            read up _ < /proc/uptime
            echo "STATE $cur uptime=$up"
            last=$cur
        fi
        usleep 20000
    done
    ;;
esac
echo SPINBOX-INIT-DONE
# ACPI power-off ends QEMU on q35; microvm without ACPI only halts, but a reboot ends any
# machine started with -no-reboot
case " $(cat /proc/cmdline) " in
*" spinbox.test.exit=reboot "*) reboot -f ;;
*) poweroff -f ;;
esac
"""


# ---------------------------------------------------------------------------------------------
# initramfs (cpio "newc", written here so the check needs no cpio binary)

@dataclass
class CpioEntry:
    name: str
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def write_newc(entries: Iterable[CpioEntry], path: Path) -> None:
    def pad4(n: int) -> bytes:
        return b"\0" * (-n % 4)

    out = bytearray()
    ino = 1
    for e in [*entries, CpioEntry("TRAILER!!!", 0)]:
        name = e.name.encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += hdr + name + pad4(len(hdr) + len(name)) + e.data + pad4(len(e.data))
        ino += 1
    path.write_bytes(bytes(out))


def is_static_elf(path: Path) -> bool:
    """True for an ELF64 without a PT_INTERP program header (no dynamic loader needed)."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3  # PT_INTERP
               for i in range(phnum))


def find_static_busybox() -> Path | None:
    for cand in ("/bin/busybox", shutil.which("busybox") or ""):
        if cand and Path(cand).is_file() and is_static_elf(Path(cand)):
            return Path(cand)
    return None


def build_initramfs(dest: Path, busybox: Path) -> Path:
    entries = [CpioEntry(d, 0o040755) for d in ("bin", "dev", "mnt", "proc", "sys", "tmp")]
    entries += [
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("bin/busybox", 0o100755, busybox.read_bytes()),
        CpioEntry("init", 0o100755, INIT_SCRIPT.encode()),
    ]
    write_newc(entries, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# QEMU + serial console + QMP

def kernel_cmdline(*extra: str) -> str:
    # quiet: the serial console is slow under TCG; panic=-1 + -no-reboot: a panic ends QEMU
    return " ".join(["console=ttyS0", "quiet", "panic=-1", *extra])


def qemu_argv(kernel: Path, initrd: Path, *, machine: str = "q35", append: str,
              mem: str = "256M,slots=2,maxmem=2G", smp: str = "1,maxcpus=4",
              qmp: Path | None = None, virtio_mem: bool = False,
              disks: dict[str, Path] | None = None, virtiofs_socket: Path | None = None,
              share_9p: Path | None = None, vmgenid: str | None = None) -> list[str]:
    pci = machine.split(",")[0] != "microvm"
    argv = [QEMU, "-machine", machine, "-accel", "tcg", "-cpu", "max",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-m", mem if pci else mem.split(",")[0], "-smp", smp,
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-device", "virtio-serial-pci" if pci else "virtio-serial-device",
            "-chardev", "null,id=port0",
            "-device", f"virtserialport,chardev=port0,name={VPORT_NAME}",
            "-chardev", "null,id=con0", "-device", "virtconsole,chardev=con0"]
    for serial, image in (disks or {}).items():
        argv += ["-drive", f"file={image},if=none,id=d-{serial},format=raw,readonly=on",
                 "-device", f"virtio-blk-pci,drive=d-{serial},serial={serial}"]
    if virtiofs_socket is not None:
        # vhost-user needs guest RAM in shared memory
        size = mem.split(",")[0]
        argv += ["-object", f"memory-backend-memfd,id=ram0,size={size},share=on",
                 "-machine", "memory-backend=ram0",
                 "-chardev", f"socket,id=vfs,path={virtiofs_socket}",
                 "-device", "vhost-user-fs-pci,chardev=vfs,tag=share"]
    if share_9p is not None:
        argv += ["-fsdev", f"local,id=fs9,path={share_9p},security_model=none,readonly=on",
                 "-device", "virtio-9p-pci,fsdev=fs9,mount_tag=share9p"]
    if vmgenid is not None:   # a guid or "auto" (ACPI: q35 or microvm with ACPI)
        argv += ["-device", f"vmgenid,id=vmgenid0,guid={vmgenid}"]
    if virtio_mem:
        argv += ["-object", "memory-backend-ram,id=vmem0,size=1G",
                 "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0"]
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv


@dataclass
class ConsoleLine:
    text: str
    t: float  # seconds since QEMU was started (host monotonic)


@dataclass
class Guest:
    proc: asyncio.subprocess.Process
    t0: float
    lines: list[ConsoleLine] = field(default_factory=list)
    _new: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task | None = None
    qmp_path: Path | None = None
    _qmp: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _read_console(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(ConsoleLine(raw.decode(errors="replace").rstrip("\r\n"),
                                          time.monotonic() - self.t0))
            self._new.set()
        self._new.set()

    async def wait_line(self, pattern: str, timeout: float, start: int = 0) -> ConsoleLine:
        """First console line (from index `start`) matching regex `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.lines):
                if rx.search(self.lines[i].text):
                    return self.lines[i]
                i += 1
            if self.proc.returncode is not None and self._reader and self._reader.done():
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before /{pattern}/; "
                                     f"console:\n{self.console()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no console line /{pattern}/ within {timeout} s; "
                                   f"console:\n{self.console()}")
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    def console(self) -> str:
        return "\n".join(f"[{ln.t:7.3f}] {ln.text}" for ln in self.lines[-80:])

    def facts(self, key: str) -> list[str]:
        """Payloads of the `KEY payload` lines the init printed."""
        return [ln.text[len(key) + 1:] for ln in self.lines if ln.text.startswith(key + " ")]

    async def wait_exit(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def qmp(self, execute: str, **arguments: object) -> object:
        if self._qmp is None:
            assert self.qmp_path is not None, "started without a QMP socket"
            for _ in range(200):
                with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                    self._qmp = await asyncio.open_unix_connection(str(self.qmp_path))
                    break
                await asyncio.sleep(0.025)
            else:
                raise TimeoutError(f"QMP socket {self.qmp_path} never accepted a connection")
            await self._qmp_reply()  # greeting
            await self._qmp_call("qmp_capabilities", {})
        return await self._qmp_call(execute, arguments)

    async def _qmp_call(self, execute: str, arguments: dict) -> object:
        assert self._qmp is not None
        msg = {"execute": execute, **({"arguments": arguments} if arguments else {})}
        self._qmp[1].write(json.dumps(msg).encode() + b"\n")
        await self._qmp[1].drain()
        reply = await self._qmp_reply()
        if "error" in reply:
            raise RuntimeError(f"QMP {execute} {arguments}: {reply['error']}")
        return reply["return"]

    async def _qmp_reply(self) -> dict:
        assert self._qmp is not None
        while True:
            line = await asyncio.wait_for(self._qmp[0].readline(), 30)
            if not line:
                raise ConnectionError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:  # events are not needed here
                return msg

    async def close(self) -> None:
        if self._qmp is not None:
            self._qmp[1].close()
            with contextlib.suppress(Exception):
                await self._qmp[1].wait_closed()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


@contextlib.asynccontextmanager
async def run_guest(argv: list[str], qmp_path: Path | None = None) -> AsyncIterator[Guest]:
    """Start QEMU; the guest is always killed and reaped on the way out."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    guest = Guest(proc, t0, qmp_path=qmp_path)
    guest._reader = asyncio.create_task(guest._read_console())
    try:
        yield guest
    finally:
        await guest.close()


def parse_state(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", text)}


async def hotplug_cpu(guest: Guest) -> tuple[float, int]:
    """device_add the lowest free vCPU slot; returns (seconds until the guest reports it, nproc).

    Lowest first matters: QEMU lists the slots highest-first, and a guest whose second CPU gets
    APIC id 3 stalls under TCG (ours for good, Debian's for ~12 s: the slow onlining in
    docs/host-facts.md §5), while ascending APIC ids online in well under a second."""
    slots = await guest.qmp("query-hotpluggable-cpus")
    free = [s for s in slots if "qom-path" not in s]  # type: ignore[union-attr]
    if not free:
        raise AssertionError(f"no free vCPU slot: {slots}")
    free.sort(key=lambda s: tuple(s["props"].get(k, 0)
                                  for k in ("node-id", "socket-id", "die-id", "core-id",
                                            "thread-id")))
    before = parse_state(guest.facts("STATE")[-1])["nproc"]
    mark = len(guest.lines)
    t = time.monotonic()
    await guest.qmp("device_add", driver=free[0]["type"], id=f"hp-cpu{int(before)}",
                    **free[0]["props"])
    ln = await guest.wait_line(rf"^STATE nproc={int(before) + 1} ", 60, mark)
    return time.monotonic() - t, int(parse_state(ln.text)["nproc"])


async def resize_virtio_mem(guest: Guest, size: int, target_kb: float,
                            timeout: float = 60) -> tuple[float, float]:
    """qom-set the virtio-mem requested size, then wait until the guest's MemTotal is within
    8 MiB of `target_kb`; returns (seconds, MemTotal in kB)."""
    mark = len(guest.lines)
    t = time.monotonic()
    await guest.qmp("qom-set", path="/machine/peripheral/vm0", property="requested-size",
                    value=size)
    i = mark
    while True:
        ln = await guest.wait_line(r"^STATE ", max(0.1, timeout - (time.monotonic() - t)), i)
        i = guest.lines.index(ln) + 1
        now = parse_state(ln.text)["memtotal_kb"]
        if abs(now - target_kb) <= 8 * 1024:
            return time.monotonic() - t, now


# ---------------------------------------------------------------------------------------------
# measurements (script mode)

def share_dir() -> Path:
    return Path(os.environ.get("SPINBOX_SHARE_DIR", DEFAULT_SHARE_DIR))


async def measure_boot(kernel: Path, machine: str, runs: int, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="spinbox-bootcheck-") as tmp:
        initrd = build_initramfs(Path(tmp) / "init.cpio", _busybox())
        walls, guests = [], []
        for i in range(runs):
            argv = qemu_argv(kernel, initrd, machine=machine, append=kernel_cmdline(*extra),
                             smp="1" if machine == "microvm" else "1,maxcpus=4")
            async with run_guest(argv) as g:
                try:
                    ln = await g.wait_line(INIT_MARKER, 30)
                except TimeoutError:
                    print(f"run {i}: HUNG (no marker in 30 s)")
                    continue
                walls.append(ln.t)
                guests.append(parse_state(ln.text)["uptime"])
                await g.wait_line(DONE_MARKER, 30)
                print(f"run {i}: wall {ln.t:.3f} s, guest uptime {guests[-1]:.2f} s, "
                      f"virtio ports seen: {len(g.facts('VPORT'))}")
        if walls:
            print(f"{machine}: wall median {statistics.median(walls):.3f} s "
                  f"(min {min(walls):.3f} max {max(walls):.3f}), guest median "
                  f"{statistics.median(guests):.2f} s, {len(walls)}/{runs} booted")


async def measure_hotplug(kernel: Path, runs: int, memhp: str) -> None:
    with tempfile.TemporaryDirectory(prefix="spinbox-bootcheck-") as tmp:
        initrd = build_initramfs(Path(tmp) / "init.cpio", _busybox())
        for i in range(runs):
            qmp = Path(tmp) / "qmp.sock"
            argv = qemu_argv(kernel, initrd, append=kernel_cmdline(memhp, "spinbox.test=hotplug"),
                             qmp=qmp, virtio_mem=True)
            async with run_guest(argv, qmp) as g:
                await g.wait_line(r"^STATE ", 30)
                cpu_s, n = await hotplug_cpu(g)
                base = parse_state(g.facts("STATE")[-1])["memtotal_kb"]
                up_s, kb_up = await resize_virtio_mem(g, 512 * MiB, base + 512 * 1024)
                try:
                    down_s, kb_down = await resize_virtio_mem(g, 0, base)
                    down = f"shrink to 0: {down_s:.3f} s (MemTotal {kb_down / 1024:.0f} MiB)"
                except TimeoutError:
                    down = "shrink to 0: not settled in 60 s"
                print(f"run {i}: vCPU -> nproc {n} in {cpu_s:.3f} s; virtio-mem +512M in "
                      f"{up_s:.3f} s (MemTotal {kb_up / 1024:.0f} MiB); {down}")
            qmp.unlink(missing_ok=True)


def _busybox() -> Path:
    bb = find_static_busybox()
    if bb is None:
        raise SystemExit("a static busybox is needed (apt-get install busybox-static)")
    return bb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["boot", "hotplug"])
    ap.add_argument("--kernel", type=Path, default=share_dir() / "vmlinux")
    ap.add_argument("--machine", default="q35")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--append", default="", help="extra kernel arguments")
    ap.add_argument("--memhp", default="memhp_default_state=online_movable")
    a = ap.parse_args()
    if a.what == "boot":
        asyncio.run(measure_boot(a.kernel, a.machine, a.runs, a.append.split()))
    else:
        asyncio.run(measure_hotplug(a.kernel, a.runs, a.memhp))


if __name__ == "__main__":
    main()
