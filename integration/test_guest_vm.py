"""The whole guest path: QEMU (TCG here) + our kernel + the guest image + vminitd, driven from the
host through `spinbox.shim.agent.AgentClient` over the VM's virtio-serial channel.

One VM is booted for the module (boots are slow under TCG). The containers' rootfs is a
busybox-static tree on the host, shared into the guest with virtiofs (virtiofsd + a
vhost-user-fs-pci device hot-plugged over QMP by shim/vm/devices.py) and mounted by vminitd per
container (`Rootfs.mounts = [virtiofs <tag>]`). The 50 MB stdout test reads a random file from
that share and compares sha256 on the host.

A separate test SIGKILLs a guest's QEMU and checks it is noticed and nothing is left behind.
KVM / vsock tests are marked and skipped here with the reason.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import pytest_asyncio

from spinbox.api import contract
from spinbox.shim.agent import AgentClient, AgentUnavailable, Mount
from spinbox.shim.check import _check_spec
from spinbox.shim.guest import Guest, agent_address, boot_guest
from spinbox.shim.vm import accel as accel_mod
from spinbox.shim.vm import devices
from spinbox.shim.vm.config import VMConfig, share_dir_path
from integration.bundles import make_busybox_rootfs, oci_process, oci_spec

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

TAG = "ctrroot"
BIG = 50 * 1024 * 1024
HANG_GUARD_S = 120   # only so a broken guest fails the test instead of hanging it


def _skip_or_fail(msg: str) -> None:
    if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
        pytest.fail(msg + " (SPINBOX_REQUIRE_INTEGRATION is set)", pytrace=False)
    pytest.skip(msg)


def _prerequisites() -> None:
    if os.geteuid() != 0:
        _skip_or_fail("needs root (QEMU, virtiofsd)")
    if shutil.which("qemu-system-x86_64") is None:
        _skip_or_fail("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    share = share_dir_path()
    if not (share / "vmlinux").is_file():
        _skip_or_fail(f"no guest kernel {share / 'vmlinux'}: run `task build:kernel`")
    if not (share / "image.json").is_file():
        _skip_or_fail(f"no guest image manifest {share / 'image.json'}: run `task build:initrd`")
    if not os.path.exists("/bin/busybox"):
        _skip_or_fail("no /bin/busybox (apt-get install busybox-static)")
    if not os.path.exists(VMConfig.__dataclass_fields__["virtiofsd_binary"].default):
        _skip_or_fail("no /usr/lib/qemu/virtiofsd (qemu-system-common)")


def spec(args: list[str], terminal: bool = False) -> dict:
    return oci_spec(args, terminal, readonly_root=True, tmp_mount=True)


proc = oci_process


def make_rootfs(d: Path) -> str:
    """A busybox-static tree plus a 50 MB random file; returns the file's sha256."""
    make_busybox_rootfs(d, extra_dirs=("data",))
    h = hashlib.sha256()
    with open(d / "data" / "big.bin", "wb") as f:
        left = BIG
        while left:
            block = os.urandom(min(left, 1 << 20))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


class Env:
    def __init__(self, guest: Guest, big_sha: str, root: Path) -> None:
        self.guest = guest
        self.agent: AgentClient = guest.agent
        self.big_sha = big_sha
        self.root = root
        self._n = 0

    def new_id(self, what: str) -> str:
        self._n += 1
        return f"{what}-{self._n}"

    async def create(self, args: list[str], *, terminal: bool = False, stdin: bool = False,
                     stdout: bool = True, stderr: bool = True, id: str | None = None) -> str:
        cid = id or self.new_id("c")
        await self.agent.create(cid, spec(args, terminal), rootfs_mounts=[Mount("virtiofs", TAG)],
                                readonly=True, terminal=terminal, stdin=stdin, stdout=stdout,
                                stderr=stderr and not terminal)
        return cid


async def collect(stream) -> bytes:
    buf = bytearray()
    async for chunk in stream:
        buf += chunk
    return bytes(buf)


async def leftovers(state_dir: Path) -> list[str]:
    """QEMU / virtiofsd processes that mention state_dir, and the state dir itself."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(state_dir) in cmd:
            out.append(f"process {pid}: {cmd[:200]}")
    if state_dir.exists():
        out.append(f"state dir {state_dir} still has {sorted(os.listdir(state_dir))}")
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env():
    _prerequisites()
    tmp = Path(tempfile.mkdtemp(prefix="sbgvm-"))
    state_dir = tmp / "vm"
    guest = None
    try:
        big_sha = make_rootfs(tmp / "rootfs")
        guest = await boot_guest(state_dir, VMConfig.from_share_dir(memory_mb=256), name="test-guest-vm")
        print(f"\nboot: {guest.boot_seconds:.2f} s; timeline: "
              + " ".join(f"{k}={v:.2f}" for k, v in guest.timeline.items()))
        await devices.add_virtiofs(guest.vm, tmp / "rootfs", TAG)
        yield Env(guest, big_sha, tmp / "rootfs")
    finally:
        if guest is not None:
            await guest.stop()
        left = await leftovers(state_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, left


async def run_to_exit(env: Env, args: list[str], **kw) -> tuple[bytes, bytes, int]:
    cid = await env.create(args, **kw)
    out = env.agent.open_output(cid, "", 1)
    err = env.agent.open_output(cid, "", 2)
    try:
        await env.agent.start(cid)
        o, e = await asyncio.wait_for(asyncio.gather(collect(out), collect(err)), HANG_GUARD_S)
        ex = await asyncio.wait_for(env.agent.wait(cid), HANG_GUARD_S)
    finally:
        await env.agent.delete(cid)
    return o, e, ex.exit_status


async def test_stdout_and_stderr(env):
    o, e, status = await run_to_exit(env, ["sh", "-c", "echo to-out; echo to-err >&2"])
    assert (o, e, status) == (b"to-out\n", b"to-err\n", 0)


async def test_exit_code(env):
    o, e, status = await run_to_exit(env, ["sh", "-c", "exit 7"])
    assert status == 7


async def test_sigkill_is_137(env):
    cid = await env.create(["sleep", "1000"], stdout=False, stderr=False)
    try:
        await env.agent.start(cid)
        assert (await env.agent.state(cid)).status_name == "running"
        await env.agent.kill(cid, "", signal.SIGKILL)
        ex = await asyncio.wait_for(env.agent.wait(cid), HANG_GUARD_S)
        assert ex.exit_status == 137
        assert (await env.agent.state(cid)).status_name == "stopped"
    finally:
        await env.agent.delete(cid)


async def test_exec_beside_and_sigterm_is_143(env):
    cid = await env.create(["sleep", "1000"], stdout=False, stderr=False)
    try:
        await env.agent.start(cid)
        # an exec that prints and exits
        await env.agent.exec(cid, "hello", proc(["sh", "-c", "echo from-exec; exit 3"]), stdout=True)
        out = env.agent.open_output(cid, "hello", 1)
        await env.agent.start(cid, "hello")
        assert await asyncio.wait_for(collect(out), HANG_GUARD_S) == b"from-exec\n"
        assert (await env.agent.wait(cid, "hello")).exit_status == 3
        await env.agent.delete(cid, "hello")
        # an exec killed by SIGTERM
        await env.agent.exec(cid, "sleeper", proc(["sleep", "1000"]))
        pid = await env.agent.start(cid, "sleeper")
        pids = await env.agent.pids(cid)
        assert pid in [p.pid for p in pids] and any(p.exec_id == "sleeper" for p in pids)
        await env.agent.kill(cid, "sleeper", signal.SIGTERM)
        assert (await asyncio.wait_for(env.agent.wait(cid, "sleeper"), HANG_GUARD_S)).exit_status == 143
        await env.agent.delete(cid, "sleeper")
        # the container's init is untouched
        assert (await env.agent.state(cid)).status_name == "running"
        await env.agent.kill(cid, "", signal.SIGKILL)
        await env.agent.wait(cid)
    finally:
        await env.agent.delete(cid)


async def test_stdin_to_eof(env):
    data = os.urandom(300_000)
    cid = await env.create(["sh", "-c", "cat; echo done >&2"], stdin=True)
    out = env.agent.open_output(cid, "", 1)
    err = env.agent.open_output(cid, "", 2)
    inp = env.agent.open_input(cid)
    try:
        await env.agent.start(cid)
        reader = asyncio.ensure_future(asyncio.gather(collect(out), collect(err)))
        for i in range(0, len(data), 70_000):
            await inp.write(data[i:i + 70_000])
        await asyncio.wait_for(inp.close(), HANG_GUARD_S)
        o, e = await asyncio.wait_for(reader, HANG_GUARD_S)
        assert hashlib.sha256(o).hexdigest() == hashlib.sha256(data).hexdigest() and len(o) == len(data)
        assert e == b"done\n"
        assert (await env.agent.wait(cid)).exit_status == 0
    finally:
        await env.agent.delete(cid)


async def test_tty(env):
    cid = await env.create(["sh", "-c", "tty; stty size; read line; echo got:$line"], terminal=True, stdin=True)
    out = env.agent.open_output(cid, "", 1)
    inp = env.agent.open_input(cid)
    try:
        await env.agent.start(cid)
        await env.agent.resize_pty(cid, "", 100, 40)
        reader = asyncio.ensure_future(collect(out))
        await inp.write(b"hello\n")
        await asyncio.wait_for(inp.close(), HANG_GUARD_S)
        o = await asyncio.wait_for(reader, HANG_GUARD_S)
        text = o.decode(errors="replace")
        assert "/dev/pts/" in text, text
        assert "got:hello\r\n" in text, text           # the pty's ONLCR: a real terminal
        assert (await env.agent.wait(cid)).exit_status == 0
    finally:
        await env.agent.delete(cid)


async def test_50mb_stdout_intact(env):
    cid = await env.create(["cat", "/data/big.bin"], stderr=False)
    out = env.agent.open_output(cid, "", 1)
    try:
        await env.agent.start(cid)
        h = hashlib.sha256()
        n = 0
        t = time.monotonic()
        async for chunk in out:
            h.update(chunk)
            n += len(chunk)
        dt = time.monotonic() - t
        print(f"\n50 MB stdout: {n / dt / 1e6:.1f} MB/s")
        assert n == BIG
        assert h.hexdigest() == env.big_sha
        assert (await asyncio.wait_for(env.agent.wait(cid), HANG_GUARD_S)).exit_status == 0
    finally:
        await env.agent.delete(cid)


async def test_pause_resume_really_stops(env):
    cid = await env.create(["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"], stderr=False)
    out = env.agent.open_output(cid, "", 1)
    got = bytearray()

    async def pump():
        async for chunk in out:
            got.extend(chunk)
    reader = asyncio.ensure_future(pump())
    try:
        await env.agent.start(cid)
        while got.count(b"\n") < 5:
            await asyncio.sleep(0.1)
        await env.agent.pause(cid)
        assert (await env.agent.state(cid)).status_name == "paused"
        await asyncio.sleep(1.0)            # let bytes already in flight arrive
        frozen = bytes(got)
        await asyncio.sleep(2.0)            # 40 iterations' worth of time
        assert bytes(got) == frozen, "output kept coming while paused"
        await env.agent.resume(cid)
        assert (await env.agent.state(cid)).status_name == "running"
        deadline = time.monotonic() + HANG_GUARD_S
        while len(got) == len(frozen) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(got) > len(frozen), "no output after resume"
        # the counter continued where it stopped: nothing was lost or repeated
        lines = bytes(got).split(b"\n")[:-1]
        assert [int(x) for x in lines] == list(range(1, len(lines) + 1))
        await env.agent.kill(cid, "", signal.SIGKILL)
        await env.agent.wait(cid)
    finally:
        await env.agent.delete(cid)
        reader.cancel()


async def test_stats(env):
    cid = await env.create(["sh", "-c", "i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; sleep 1000"],
                           stdout=False, stderr=False)
    try:
        await env.agent.start(cid)
        await asyncio.sleep(1.0)
        st = await env.agent.stats(cid)
        assert st.cpu_usage_ns > 0
        assert st.memory_usage_bytes > 0
        assert st.pids_current >= 1
        assert json.loads(st.raw)  # the runc stats document came along
        await env.agent.kill(cid, "", signal.SIGKILL)
        await env.agent.wait(cid)
    finally:
        await env.agent.delete(cid)


async def test_guest_reports_the_host_version(env):
    """The guest image has no package metadata: its version comes from the file the image build
    wrote, the same as the host's."""
    v = await env.agent.version()
    assert v.agent_version == contract.version() != "unknown"
    assert v.api == "spinbox.agent.v1"


async def test_guest_survives_channel_reconnect(env):
    """Close the ttrpc connection to the chardev socket mid-stream and connect a new client (as
    a restarted host would): the running container's output resumes at the offset the host
    holds, nothing lost or repeated; events resume after the last seq seen."""
    n = 400
    cid = await env.create(["sh", "-c", f"i=0; while [ $i -lt {n} ]; do i=$((i+1)); echo line$i; sleep 0.01; done"],
                           stderr=False)
    address = agent_address(env.guest.vm)
    events: list = []

    async def follow(agent: AgentClient, after: int) -> None:
        async for ev in agent.events(after_seq=after):
            events.append(ev)
    follower = asyncio.ensure_future(follow(env.agent, 0))
    try:
        await env.agent.start(cid)
        got = bytearray()
        reconnects = 0
        out = env.agent.open_output(cid, "", 1)
        while True:
            chunk = await out.read()
            if chunk is None:
                break
            got += chunk
            if reconnects < 2 and got.count(b"\n") > 50 * (reconnects + 1):
                reconnects += 1
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
                next_id = env.agent.next_stream_id
                await env.agent.close()
                env.agent = env.guest.agent = await AgentClient.wait_ready(
                    address, timeout=HANG_GUARD_S, first_stream_id=next_id)
                follower = asyncio.ensure_future(follow(env.agent, events[-1].seq if events else 0))
                out = env.agent.open_output(cid, "", 1, offset=len(got))
        assert reconnects == 2
        assert got == b"".join(b"line%d\n" % i for i in range(1, n + 1))
        assert (await asyncio.wait_for(env.agent.wait(cid), HANG_GUARD_S)).exit_status == 0
        deadline = time.monotonic() + HANG_GUARD_S
        while not any(e.kind == "exit" and e.id == cid for e in events) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert any(e.kind == "exit" and e.id == cid and e.exit_status == 0 for e in events)
        seqs = [e.seq for e in events]
        assert seqs == sorted(set(seqs)), "events repeated or out of order across the reconnect"
        assert seqs[-1] > 0
    finally:
        follower.cancel()
        await env.agent.delete(cid)


async def test_qemu_sigkill_is_detected_and_cleaned_up():
    _prerequisites()
    tmp = Path(tempfile.mkdtemp(prefix="sbgvk-"))
    state_dir = tmp / "vm"
    (tmp / "share").mkdir()
    guest = None
    try:
        guest = await boot_guest(state_dir, VMConfig.from_share_dir(memory_mb=256), name="test-guest-kill")
        await devices.add_virtiofs(guest.vm, tmp / "share", "killshare")
        assert await leftovers(state_dir), "expected QEMU and virtiofsd to be running"
        t0 = time.monotonic()
        os.kill(guest.vm.pid, signal.SIGKILL)
        ex = await asyncio.wait_for(guest.vm.wait_died(), HANG_GUARD_S)
        deadline = time.monotonic() + HANG_GUARD_S
        while guest.agent.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not guest.agent.connected
        print(f"\nQEMU SIGKILL noticed after {time.monotonic() - t0:.2f} s ({ex.reason})")
        assert "SIGKILL" in ex.reason
        with pytest.raises(AgentUnavailable):
            await guest.agent.ping(timeout=5)
        await guest.stop()
        assert await leftovers(state_dir) == []
    finally:
        if guest is not None:
            await guest.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.vsock
async def test_vsock_transport_boot():
    _prerequisites()
    usable, why = accel_mod.vsock_status()
    if not usable:
        pytest.skip(f"vsock transport not testable here: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="sbgvs-"))
    guest = None
    try:
        guest = await boot_guest(tmp / "vm", VMConfig.from_share_dir(transport="vsock"), name="test-guest-vsock")
        assert guest.vm.transport.value == "vsock"
        assert (await guest.agent.info()).pid1
    finally:
        if guest is not None:
            await guest.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.kvm
async def test_kvm_boot():
    _prerequisites()
    usable, why = accel_mod.kvm_status()
    if not usable:
        pytest.skip(f"KVM not usable here: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="sbgkv-"))
    guest = None
    try:
        guest = await boot_guest(tmp / "vm", VMConfig.from_share_dir(accel="kvm"), name="test-guest-kvm")
        assert guest.vm.accel.value == "kvm"
        assert (await guest.agent.info()).pid1
    finally:
        if guest is not None:
            await guest.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- spinbox check

def _spinbox_cli() -> list[str]:
    import sys
    return [sys.executable, "-m", "spinbox.shim.cli"]


async def test_crun_runs_the_containers_when_the_host_names_it():
    """runtime.oci_runtime reaches vminitd on the kernel command line: the agent reports crun
    and a container runs under it."""
    _prerequisites()
    tmp = Path(tempfile.mkdtemp(prefix="sbcrun-"))
    guest = None
    try:
        guest = await boot_guest(tmp / "vm", VMConfig.from_share_dir(
            memory_mb=256, cmdline_extra=["spinbox.oci_runtime=crun"]), name="test-crun")
        assert (await guest.agent.version()).runtime == "crun"
        cid = "crun-1"
        await guest.agent.create(cid, _check_spec(), rootfs_mounts=[Mount("bind", "/", "", ("bind", "ro"))],
                                 readonly=True, stdout=True, stderr=True)
        try:
            out = guest.agent.open_output(cid, "", 1)
            await guest.agent.start(cid)
            text = await asyncio.wait_for(collect(out), HANG_GUARD_S)
            assert (await asyncio.wait_for(guest.agent.wait(cid), HANG_GUARD_S)).exit_status == 0
            assert text.startswith(b"Linux ")
        finally:
            await guest.agent.delete(cid)
    finally:
        if guest is not None:
            await guest.stop()
        left = await leftovers(tmp / "vm")
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, left


async def test_spinbox_check_passes():
    _prerequisites()
    if shutil.which("containerd") is None:
        _skip_or_fail("containerd not installed (spinbox check requires it)")
    p = await asyncio.to_thread(subprocess.run, [*_spinbox_cli(), "check"], capture_output=True, text=True, timeout=HANG_GUARD_S * 2)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    for what in ("qemu", "kvm", "vsock", "kernel", "image", "runc in image", "virtiofsd", "containerd",
                 "boot", "agent", "container"):
        assert f"] {what}: " in out, (what, out)
    assert "[FAIL]" not in out, out
    assert "timeline (s since QEMU exec" in out and "probe_ok=" in out, out
    assert "`uname -a` in a runc container in the guest" in out and "Linux spinbox-check" in out, out
    assert "spinbox check: OK" in out, out


async def test_spinbox_check_names_what_is_missing(tmp_path):
    p = await asyncio.to_thread(subprocess.run, [*_spinbox_cli(), "check"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SPINBOX_SHARE_DIR": str(tmp_path)})
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"no guest kernel at {tmp_path / 'vmlinux'}" in p.stdout, p.stdout
    assert "image.json" in p.stdout, p.stdout
    assert "spinbox check: FAILED" in p.stdout, p.stdout
