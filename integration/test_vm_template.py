"""VM templates against real QEMU (TCG here) with the installed guest image (shim/vm/template.py).

One template is built for the module (in a tmpfs dir); clones are restored from it three at a
time, with RAM `copy` (a memfd copy: virtiofs works, a container runs from a virtiofs rootfs)
and RAM `private` (MAP_PRIVATE of the template file: pages shared, virtiofs refused). Measured
figures (restore time, PSS per clone) are printed (`-s` shows them). A corrupt template is
refused, and a state that loads badly fails the restore cleanly. Nothing may be left running.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import pytest_asyncio

from spinbox.shim.agent import Mount
from spinbox.shim.guest import Guest, restore_guest
from spinbox.shim.vm import devices
from spinbox.shim.vm.config import VMConfig, share_dir_path
from spinbox.shim.vm.machine import VMBootError
from spinbox.shim.vm.qemu_args import Resolved
from spinbox.shim.vm.template import (STATE_FILE, CloneRAM, Template, build_template, load_template,
                                      qemu_identity, template_key, template_problem)
from integration.bundles import make_busybox_rootfs, oci_spec
from integration.test_guest_vm import _prerequisites, collect, leftovers

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

N_CLONES = 3
HANG_GUARD_S = 120
TAG = "tplroot"


def pss_mib(pid: int) -> tuple[float, float]:
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, v, *_ = line.split()
            if k == "Rss:":
                rss = int(v)
            elif k == "Pss:":
                pss = int(v)
    return rss / 1024, pss / 1024


class Env:
    def __init__(self, tmp: Path, config: VMConfig, template: Template, key: str, rootfs: Path) -> None:
        self.tmp, self.config, self.template, self.key, self.rootfs = tmp, config, template, key, rootfs
        self.n = 0

    def state_dir(self) -> Path:
        self.n += 1
        return self.tmp / f"clone{self.n}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env():
    _prerequisites()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = Path(tempfile.mkdtemp(prefix="sbtpl-", dir=base))
    try:
        rootfs = tmp / "rootfs"
        make_busybox_rootfs(rootfs)
        for applet in ("od", "date", "tr", "dmesg", "grep", "ls"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        config = VMConfig.from_share_dir(memory_mb=256)
        image = json.loads((share_dir_path() / "image.json").read_text())
        key = template_key(config, Resolved("tcg", "virtio-serial"), qemu_identity(config.qemu_binary),
                           image.get("hash", ""))
        t0 = time.monotonic()
        template = await build_template(config, tmp / "template", key=key)
        du = os.stat(template.ram_file).st_blocks * 512 >> 20
        print(f"\ntemplate built in {time.monotonic() - t0:.2f} s: {template.manifest['state_size']} bytes of "
              f"state, RAM file {du} MiB used of {template.memory_mb}")
        assert sorted(os.listdir(template.dir)) == ["manifest.json", "ram", "state"]
        yield Env(tmp, config, template, key, rootfs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        left = await leftovers(tmp)          # no process still mentions it
        assert not left, left


async def restore_many(env: Env, mode: CloneRAM, n: int = N_CLONES) -> list[Guest]:
    async def one() -> Guest:
        t = time.monotonic()
        g = await restore_guest(env.state_dir(), env.config, env.template, ram=mode, name=f"clone-{mode.value}")
        g.timeline["host_total"] = time.monotonic() - t
        return g
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    guests = [g for g in results if isinstance(g, Guest)]
    errors = [e for e in results if not isinstance(e, Guest)]
    if errors:
        for g in guests:
            await g.stop()
        raise errors[0]
    return guests


def report(mode: CloneRAM, guests: list[Guest]) -> None:
    ready = [g.timeline["ready"] for g in guests]
    loaded = ", ".join(f"{g.timeline['state_loaded']:.3f}" for g in guests)
    print(f"\n{mode.value}: {len(guests)} clones at once: QEMU exec -> agent ping "
          f"min {min(ready):.3f} median {statistics.median(ready):.3f} max {max(ready):.3f} s; "
          f"state loaded at {loaded} s")
    # restore_guest gives each clone host entropy and the host's clock, concurrently, right
    # after the agent answers
    for g in guests:
        assert "entropy_added" in g.timeline and "clock_set" in g.timeline, g.timeline
    print("  ready -> entropy added / clock set: " + ", ".join(
        f"+{g.timeline['entropy_added'] - g.timeline['ready']:.3f}/+{g.timeline['clock_set'] - g.timeline['ready']:.3f} s"
        for g in guests))
    for g in guests:
        assert g.vm.pid is not None
        rss, pss = pss_mib(g.vm.pid)
        print(f"  pid {g.vm.pid}: RSS {rss:.0f} MiB, PSS {pss:.0f} MiB")


async def run_to_exit(guest: Guest, cid: str, args: list[str], *, sysfs: bool = False) -> tuple[str, int]:
    a = guest.agent
    spec = oci_spec(args, readonly_root=True)
    if sysfs:   # the guest's /sys, read-only (the vmgenid driver's directory)
        spec["mounts"].append({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                               "options": ["nosuid", "noexec", "nodev", "ro"]})
    await a.create(cid, spec, rootfs_mounts=[Mount("virtiofs", TAG)],
                   readonly=True, stdout=True, stderr=True)
    out, err = a.open_output(cid, "", 1), a.open_output(cid, "", 2)
    try:
        await a.start(cid)
        o, e = await asyncio.wait_for(asyncio.gather(collect(out), collect(err)), HANG_GUARD_S)
        ex = await asyncio.wait_for(a.wait(cid), HANG_GUARD_S)
    finally:
        await a.delete(cid)
    return (o + e).decode(), ex.exit_status


async def test_copy_clones_run_containers(env):
    guests = await restore_many(env, CloneRAM.COPY)
    try:
        report(CloneRAM.COPY, guests)
        seen = []
        for i, g in enumerate(guests):
            await g.agent.ping()
            t = time.monotonic()
            await devices.add_virtiofs(g.vm, env.rootfs, TAG)
            host_before = time.time()
            out, status = await run_to_exit(g, f"c{i}", ["sh", "-c",
                                            "echo boot_id $(cat /proc/sys/kernel/random/boot_id); "
                                            "echo urandom $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); "
                                            "echo clock $(date +%s); "
                                            "echo vmgenid $(ls /sys/bus/acpi/drivers/vmgenid 2>/dev/null | grep :); "
                                            "echo forks $(dmesg | grep -c 'crng reseeded due to virtual machine fork')"],
                                            sysfs=True)
            host_after = time.time()
            assert status == 0, out
            facts = {k: v for k, _, v in (ln.partition(" ") for ln in out.splitlines())}
            boot_id, rnd, clock = facts["boot_id"], facts["urandom"], facts["clock"]
            print(f"  clone {i}: virtiofs + container {time.monotonic() - t:.2f} s; boot_id {boot_id}; "
                  f"urandom {rnd}; guest clock {clock}, host {host_before:.1f}..{host_after:.1f}; "
                  f"vmgenid {facts.get('vmgenid')!r}, fork reseeds {facts.get('forks')}")
            assert len(rnd) == 32, out
            assert host_before - 2 <= int(clock) <= host_after + 2
            # CONFIG_VMGENID: bound to QEMU's device, and the clone's new generation id made the
            # kernel reseed its CRNG (add_vmfork_randomness logs it)
            assert facts.get("vmgenid", "").startswith("QEMUVGID:"), out
            assert int(facts.get("forks") or 0) >= 1, out
            seen.append((boot_id, rnd))
        assert len({r for _, r in seen}) == len(seen), f"clones read the same /dev/urandom bytes: {seen}"
        assert len({b for b, _ in seen}) == len(seen), f"clones share a boot_id: {seen}"
    finally:
        await asyncio.gather(*(g.stop() for g in guests))
    for g in guests:
        assert not await leftovers(g.vm.paths.state_dir)


async def test_private_clones_share_ram(env):
    guests = await restore_many(env, CloneRAM.PRIVATE)
    try:
        report(CloneRAM.PRIVATE, guests)
        for g in guests:
            await g.agent.ping()
            info = await g.agent.info()
            assert info.uptime_s > 0
        with pytest.raises(devices.DeviceError, match="shared"):
            await devices.add_virtiofs(guests[0].vm, env.rootfs, TAG)
    finally:
        await asyncio.gather(*(g.stop() for g in guests))
    for g in guests:
        assert not await leftovers(g.vm.paths.state_dir)


async def test_bad_templates_refused(env):
    src = env.template.dir
    bad = env.tmp / "bad"
    shutil.copytree(src, bad)
    assert load_template(bad, env.key) is not None
    assert template_problem(bad, "0" * 64)[0] is None
    # one flipped byte in the state file
    with open(bad / STATE_FILE, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    t, why = template_problem(bad, env.key)
    assert t is None and "checksum" in why
    # a truncated RAM file
    shutil.copy(src / STATE_FILE, bad / STATE_FILE)
    os.truncate(bad / "ram", 4096)
    t, why = template_problem(bad, env.key)
    assert t is None and "RAM file" in why
    (bad / "manifest.json").write_text("{not json")
    assert load_template(bad, env.key) is None


async def test_state_that_fails_to_load_fails_cleanly(env):
    """A state file that passes the manifest check but does not load: the restore fails with
    the VM layer's error, quickly, and leaves nothing (the caller boots cold then)."""
    bad = env.tmp / "badload"
    shutil.copytree(env.template.dir, bad)
    with open(bad / STATE_FILE, "r+b") as f:
        f.truncate(os.path.getsize(bad / STATE_FILE) // 2)
    manifest = dict(env.template.manifest)
    t = Template(bad, env.key, manifest)
    d = env.state_dir()
    start = time.monotonic()
    with pytest.raises(VMBootError) as ei:
        await restore_guest(d, env.config, t, ram=CloneRAM.PRIVATE, name="clone-bad")
    print(f"\nbad state refused in {time.monotonic() - start:.2f} s: {str(ei.value).splitlines()[0][:200]}")
    assert time.monotonic() - start < 20
    assert not await leftovers(d)
