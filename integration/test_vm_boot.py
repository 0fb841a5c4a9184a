"""The host VM layer (spinbox.shim.vm) against real QEMU under TCG with the project's guest kernel
and a throwaway busybox initramfs (built here) whose /init:

- prints `TEST-INIT up`, then (unless `spinbox.test=sleep`) `TEST-READY`;
- echoes every byte on the `spinbox.agent` virtio-serial port, reopening it after a host
  disconnect (the port opens once; reads return EOF while the host is away);
- onlines hot-added vCPUs and prints `STATE nproc=N memtotal_kb=M` whenever that changes;
- mounts the virtiofs tag `testshare` once a virtiofs device shows up and prints
  `SHARE <content of hello.txt>`; prints `NET <interfaces>` / `BLK <serials>` when they change.

Every test checks that no QEMU / virtiofsd process and no file of the VM is left behind.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from spinbox.shim.vm import accel as accel_mod
from spinbox.shim.vm import devices
from spinbox.shim.vm.config import VMConfig, VMTimeouts, share_dir_path
from spinbox.shim.vm.machine import VM, VMBootError, VMState, kill_from_state

pytestmark = pytest.mark.integration

MiB = 1024 * 1024

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "TEST-INIT up"
case " $(cat /proc/cmdline) " in *" spinbox.test=sleep "*) while :; do sleep 1000; done ;; esac
port=
for d in /sys/class/virtio-ports/*; do
    [ "$(cat $d/name 2>/dev/null)" = spinbox.agent ] && port=/dev/${d##*/}
done
echo "TEST-READY port=$port"
(
    while :; do
        exec 3<>"$port" && cat <&3 >&3
        exec 3<&-
        usleep 20000
    done
) &
(
    mkdir -p /mnt/share
    while :; do
        if ls /sys/bus/virtio/drivers/virtiofs/ 2>/dev/null | grep -q virtio; then
            mount -t virtiofs testshare /mnt/share && break
        fi
        usleep 50000
    done
    echo "SHARE $(cat /mnt/share/hello.txt)"
) &
last=
while :; do
    for f in /sys/devices/system/cpu/cpu*/online; do
        [ -e "$f" ] || continue; read v < "$f"; [ "$v" = 0 ] && echo 1 > "$f"
    done
    while read k v _; do [ "$k" = MemTotal: ] && break; done < /proc/meminfo
    net=$(ls /sys/class/net | tr '\n' ' ')
    blk=$(cat /sys/block/vd*/serial 2>/dev/null | tr '\n' ' ')
    cur="nproc=$(nproc) memtotal_kb=$v"
    if [ "$cur" != "$last" ]; then echo "STATE $cur"; last=$cur; fi
    if [ "$net" != "$lastnet" ]; then echo "NET $net"; lastnet=$net; fi
    if [ "$blk" != "$lastblk" ]; then echo "BLK $blk"; lastblk=$blk; fi
    usleep 50000
done
"""


def _newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", (0, 0))], 1):
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += hdr + nb + b"\0" * (-(len(hdr) + len(nb)) % 4) + data + b"\0" * (-len(data) % 4)
    return bytes(out)


def _static_busybox() -> Path | None:
    p = Path("/bin/busybox")
    if p.is_file() and b"ld-linux" not in p.read_bytes()[:4096]:
        return p
    return None


@pytest.fixture(scope="module")
def guest_files():
    if os.geteuid() != 0:
        pytest.skip("needs root (virtiofsd, TAP)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    kernel = share_dir_path() / "vmlinux"
    if not kernel.is_file():
        pytest.skip(f"no guest kernel at {kernel} (task build:kernel; or set SPINBOX_SHARE_DIR)")
    bb = _static_busybox()
    if bb is None:
        pytest.skip("no static /bin/busybox (apt-get install busybox-static)")
    d = Path(tempfile.mkdtemp(prefix="sbvm-img-"))
    try:
        initrd = d / "init.cpio"
        initrd.write_bytes(_newc([(n, 0o040755, b"", (0, 0)) for n in ("bin", "dev", "proc", "sys", "mnt")] + [
            ("dev/console", 0o020600, b"", (5, 1)),
            ("bin/busybox", 0o100755, bb.read_bytes(), (0, 0)),
            ("init", 0o100755, INIT.encode(), (0, 0)),
        ]))
        yield kernel, initrd
    finally:
        shutil.rmtree(d)


def _config(guest_files, **kw) -> VMConfig:
    kernel, initrd = guest_files
    kw.setdefault("ready_marker", r"^TEST-READY")
    kw.setdefault("timeouts", VMTimeouts(boot_s=60))
    return VMConfig(kernel=kernel, initrd=initrd, cmdline_extra=kw.pop("cmdline_extra", ["rdinit=/init"]),
                    **kw)


def _our_processes(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path("/proc", pid, "cmdline").read_bytes()
            stat = Path("/proc", pid, "stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(pid + ": " + cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture
def state_dir():
    # short: unix socket paths are limited to 107 bytes
    base = Path(tempfile.mkdtemp(prefix="sbvm-"))
    d = base / "vm"
    try:
        yield d
    finally:
        leftovers = sorted(p.name for p in d.iterdir()) if d.exists() else []
        procs = _our_processes(str(base))
        shutil.rmtree(base, ignore_errors=True)
        assert not procs, f"processes left behind: {procs}"
        assert not leftovers, f"files left in the VM state dir: {leftovers}"


async def _echo_probe(sock_path: Path) -> None:
    r, w = await asyncio.open_unix_connection(str(sock_path))
    try:
        w.write(b"ping\n")
        await w.drain()
        line = await asyncio.wait_for(r.readline(), 0.5)
        if line != b"ping\n":
            raise ConnectionError(f"probe got {line!r}")
    finally:
        w.close()
        await w.wait_closed()


async def _sync_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Wait until the guest's echo loop serves this connection. After a host disconnect the
    guest reopens the port; bytes written during that gap may be lost (a virtio-serial fact, see
    docs/host-facts.md §2), so send numbered tokens until one comes back — echoes are in order, so
    everything before it is drained and the stream is in step."""
    for i in range(200):
        token = f"sync-{i}\n".encode()
        w.write(token)
        await w.drain()
        try:
            while await asyncio.wait_for(r.readline(), 0.25) != token:
                pass
            return
        except asyncio.TimeoutError:
            continue
    raise AssertionError("the guest's echo loop never answered on a new connection")


async def _roundtrip(sock_path: Path, payload: bytes) -> bytes:
    r, w = await asyncio.open_unix_connection(str(sock_path))
    try:
        await _sync_echo(r, w)
        w.write(payload)
        await w.drain()
        return await asyncio.wait_for(r.readexactly(len(payload)), 30)
    finally:
        w.close()
        await w.wait_closed()


async def test_accel_auto_picks_tcg_on_pvm_host():
    if not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("not a nested-PVM host")
    choice = accel_mod.select_accel("auto")
    assert choice.value == "tcg"
    assert "PVM" in choice.reason
    assert accel_mod.select_transport("auto").value == ("vsock" if Path("/dev/vhost-vsock").exists()
                                                        else "virtio-serial")


async def test_boot_to_ready_with_probe_timeline_and_channel(guest_files, state_dir):
    vm = VM(_config(guest_files), state_dir, name="t-boot")
    try:
        timeline = await vm.start(probe=lambda: _echo_probe(vm.paths.agent_socket))
        assert vm.state is VMState.RUNNING
        assert vm.accel is not None and vm.transport is not None
        for key in ("qemu_exec", "qmp_ready", "first_console", "probe_ok", "ready"):
            assert key in timeline, timeline
        assert timeline["qmp_ready"] <= timeline["probe_ok"] <= timeline["ready"]
        assert (await vm.execute("query-status"))["status"] == "running"
        print("BOOT TIMELINE", {k: round(v, 3) for k, v in timeline.items()})

        payload = os.urandom(64 * 1024)
        assert await _roundtrip(vm.paths.agent_socket, payload) == payload
        # the host disconnected; the guest reopens the port: a new connection works again
        payload2 = os.urandom(4096)
        assert await _roundtrip(vm.paths.agent_socket, payload2) == payload2
        pid = vm.pid
    finally:
        await vm.stop()
    assert vm.state is VMState.STOPPED
    assert vm.exit is not None and vm.exit.expected and not vm.died.is_set()
    assert vm.exit.returncode == 0  # QMP quit ended it, not the SIGKILL fallback
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    await vm.stop()  # idempotent
    assert vm.state is VMState.STOPPED


async def test_marker_readiness_without_probe(guest_files, state_dir):
    # microvm hangs early in a fraction of TCG boots with no output at all: the VM layer retries
    cfg = _config(guest_files, machine="microvm",
                  timeouts=VMTimeouts(boot_s=60, first_output_s=8, boot_attempts=5))
    async with VM(cfg, state_dir, name="t-micro") as vm:
        assert "ready_marker" in vm.timeline
        assert vm.console is not None and vm.console.find(r"^TEST-READY port=/dev/vport") is not None


async def test_boot_watchdog_kills_guest_that_never_gets_ready(guest_files, state_dir):
    cfg = _config(guest_files, cmdline_extra=["rdinit=/init", "spinbox.test=sleep"],
                  timeouts=VMTimeouts(boot_s=8))
    vm = VM(cfg, state_dir, name="t-hang")
    with pytest.raises(VMBootError) as info:
        await vm.start()
    err = info.value
    assert err.timed_out
    assert "TEST-INIT up" in str(err)           # the console tail explains where it hung
    assert "boot watchdog" in str(err)
    assert vm.state is VMState.FAILED
    assert not vm.alive
    await vm.stop()  # still fine after a failed start


async def test_qemu_killed_externally_is_detected(guest_files, state_dir):
    vm = VM(_config(guest_files), state_dir, name="t-kill")
    try:
        await vm.start()
        seen: list[int] = []
        vm.add_exit_callback(lambda ex: seen.append(ex.returncode))
        os.kill(vm.pid, signal.SIGKILL)
        ex = await asyncio.wait_for(vm.wait_died(), 10)
        assert ex.returncode == -signal.SIGKILL and not ex.expected
        assert "SIGKILL" in ex.reason
        assert seen == [-signal.SIGKILL]
        assert vm.state is VMState.FAILED
    finally:
        await vm.stop()
    assert vm.state is VMState.FAILED


async def test_kill_from_state_cleans_up_after_a_crashed_shim(guest_files, state_dir, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("x")
    vm = VM(_config(guest_files, max_vcpus=2), state_dir, name="t-crash")
    try:
        await vm.start()
        fs = await devices.add_virtiofs(vm, share, "testshare")
        vfs_pid = fs.proc.pid
        # what `shim delete` would do with only the state dir in hand
        done = kill_from_state(state_dir)
        assert f"killed qemu pid {vm.pid}" in done
        assert f"killed helper virtiofsd-testshare pid {vfs_pid}" in done
        ex = await asyncio.wait_for(vm.wait_died(), 10)
        assert ex.returncode == -signal.SIGKILL
        assert not (state_dir / "vm.json").exists()
        assert kill_from_state(state_dir) == []  # idempotent
    finally:
        await vm.stop()


async def test_vcpu_hotplug_and_virtio_mem_seen_by_guest(guest_files, state_dir):
    cfg = _config(guest_files, vcpus=1, max_vcpus=2, memory_mb=256, max_memory_mb=768)
    vm = VM(cfg, state_dir, name="t-hotplug")
    try:
        await vm.start()
        con = vm.console
        first = await con.wait_for(r"^STATE nproc=1 ", 30)
        base_kb = int(first.text.split("memtotal_kb=")[1])

        mark = con.line_count
        cpu = await devices.add_vcpu(vm)
        assert cpu.props.get("core-id") == 1 or cpu.props.get("socket-id") == 1
        assert await devices.vcpu_count(vm) == 2
        await con.wait_for(r"^STATE nproc=2 ", 60, after=mark)

        mem = devices.VirtioMem(vm)
        assert await mem.plugged_bytes() == 0
        mark = con.line_count
        requested = await mem.resize(256)
        assert requested == 256 * MiB
        assert await mem.wait_plugged(60) == 256 * MiB
        # the guest onlines the new memory block by block: MemTotal reaches +256 MiB exactly
        await con.wait_for(rf"^STATE nproc=2 memtotal_kb={base_kb + 256 * 1024}$", 60, after=mark)
    finally:
        await vm.stop()


async def test_virtiofs_share_attached_at_runtime(guest_files, state_dir, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    token = os.urandom(8).hex()
    (share / "hello.txt").write_text(token)
    vm = VM(_config(guest_files), state_dir, name="t-vfs")
    try:
        await vm.start()
        fs = await devices.add_virtiofs(vm, share, "testshare")
        assert fs.proc is not None and fs.proc.returncode is None
        await vm.console.wait_for(rf"^SHARE {token}$", 60)
    finally:
        await vm.stop()
    assert fs.proc.returncode is not None


def _open_tap(name: str) -> int:
    TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


async def test_tap_nic_and_disk_hotplug_and_detach(guest_files, state_dir, tmp_path):
    if not Path("/dev/net/tun").exists():
        pytest.skip("no /dev/net/tun")
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * MiB)
    tap_name = f"sbt{os.getpid() % 100000}"
    tap_fd = _open_tap(tap_name)  # not persistent: it goes away with the last fd
    vm = VM(_config(guest_files), state_dir, name="t-nic")
    try:
        await vm.start()
        con = vm.console
        mark = con.line_count
        nic = await devices.add_tap_nic(vm, tap_fd, "02:00:00:aa:bb:01")
        await con.wait_for(r"^NET .*eth0", 60, after=mark)
        mark = con.line_count
        disk = await devices.add_disk(vm, img, serial="sbtestdisk")
        await con.wait_for(r"^BLK .*sbtestdisk", 60, after=mark)
        mark = con.line_count
        await disk.detach(timeout=30)  # the guest acknowledges the PCIe unplug
        await con.wait_for(r"^BLK\s*$", 60, after=mark)
        await nic.detach(timeout=30)
        assert nic.port not in vm.used_ports
    finally:
        await vm.stop()
        os.close(tap_fd)
    assert not Path("/sys/class/net", tap_name).exists()


async def test_cancelled_start_leaves_nothing(guest_files, state_dir):
    vm = VM(_config(guest_files, cmdline_extra=["rdinit=/init", "spinbox.test=sleep"]), state_dir, name="t-cancel")
    task = asyncio.create_task(vm.start())
    while "qmp_ready" not in vm.timeline:
        await asyncio.sleep(0.01)
    pid = vm.pid
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vm.state is VMState.FAILED and not vm.alive
    assert vm.exit is not None and vm.exit.returncode == -signal.SIGKILL
    assert not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()
