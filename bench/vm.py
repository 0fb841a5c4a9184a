"""Benchmark section "vm": boot the default guest (share dir kernel + image) N times, then
restore it N times from a VM template of the same shape.

Reports boot-to-ready (QEMU exec → vminitd answers a ping over the agent channel) min/median/
max, the per-stage timeline medians, guest memory used after boot (MemTotal - MemAvailable via
System.Info), the host RSS of one idle VM's QEMU process (from /proc), and the time to run one
container (`uname -a`, rootfs = read-only bind of the guest's root) create → exit in the guest.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

N_BOOTS = 5
IDLE_SETTLE_S = 3.0   # let the guest go idle before reading QEMU's RSS


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _one_boot(i: int, measure_idle: bool) -> dict:
    from spinbox.shim.agent import Mount
    from spinbox.shim.check import _check_spec
    from spinbox.shim.guest import boot_guest
    from spinbox.shim.vm.config import VMConfig

    state = Path(tempfile.mkdtemp(prefix="sbbench-", dir="/tmp"))
    guest = None
    try:
        config = VMConfig.from_share_dir()
        guest = await boot_guest(state / "vm", config, name=f"bench-{i}")
        res: dict = {"timeline": dict(guest.timeline), "config": config,
                     "accel": guest.vm.accel.value if guest.vm.accel else "?",
                     "transport": guest.vm.transport.value if guest.vm.transport else "?"}
        info = await guest.agent.info()
        res["guest_used"] = info.memory_used_bytes
        res["guest_total"] = info.memory_total_bytes
        if measure_idle:
            await asyncio.sleep(IDLE_SETTLE_S)
            res["qemu_rss_kb"] = _rss_kb(guest.vm.pid)
        t = time.monotonic()
        cid = "bench"
        await guest.agent.create(cid, _check_spec(), rootfs_mounts=[Mount("bind", "/", "", ("bind", "ro"))],
                                 readonly=True, stdout=True)
        out = guest.agent.open_output(cid, "", 1)
        await guest.agent.start(cid)
        async for _ in out:
            pass
        ex = await guest.agent.wait(cid)
        await guest.agent.delete(cid)
        if ex.exit_status != 0:
            raise RuntimeError(f"container exited {ex.exit_status}")
        res["container_s"] = time.monotonic() - t
        return res
    finally:
        if guest is not None:
            await guest.stop()
        shutil.rmtree(state, ignore_errors=True)


async def _restores(n: int) -> tuple[float, list[dict], int]:
    """Build a template of the default shape (in a temp dir), then restore it n times, one
    after another: (build s, timelines, QEMU RSS of an idle clone in KiB)."""
    from spinbox.shim.guest import restore_guest
    from spinbox.shim.templates import TemplateCache
    from spinbox.shim.vm.config import VMConfig, image_from_share_dir

    root = Path(tempfile.mkdtemp(prefix="sbbt-", dir="/tmp"))
    try:
        config = VMConfig.from_share_dir()
        t0 = time.monotonic()
        template = await TemplateCache(root / "t").build(config, str(image_from_share_dir().manifest.get("hash", "")))
        build_s = time.monotonic() - t0
        out, rss = [], 0
        for i in range(n):
            guest = await restore_guest(root / f"c{i}", config, template, name=f"bench-clone-{i}")
            try:
                out.append(dict(guest.timeline))
                if i == 0:
                    await asyncio.sleep(IDLE_SETTLE_S)
                    rss = _rss_kb(guest.vm.pid)
            finally:
                await guest.stop()
        return build_s, out, rss
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _run(n: int) -> list[dict]:
    return [await _one_boot(i, measure_idle=(i == 0)) for i in range(n)]


def _mmm(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def section_vm() -> tuple[str, list[str], list[str]]:
    from spinbox.shim.vm.config import image_from_share_dir

    if os.geteuid() != 0:
        raise RuntimeError("skipped: needs root (QEMU, runc in the guest)")
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("skipped: qemu-system-x86_64 not installed")
    image = image_from_share_dir()   # names the missing kernel / image
    runs = asyncio.run(_run(N_BOOTS))
    build_s, clones, clone_rss = asyncio.run(_restores(N_BOOTS))
    first = runs[0]
    cfg = first["config"]
    ready = [r["timeline"]["ready"] for r in runs]
    keys = [k for k in first["timeline"] if k != "qemu_exec" and all(k in r["timeline"] for r in runs)]
    host_keys = [k for k in keys if not k.startswith("guest_")]
    guest_keys = [k for k in keys if k.startswith("guest_")]
    rows = [
        "| measure | value |", "|---|---|",
        f"| boot to ready (QEMU exec → agent ping answered), min / median / max of {len(runs)} | "
        f"{_mmm(ready)} s |",
        *(f"| stage `{k}` (host s since exec), median | {statistics.median(r['timeline'][k] for r in runs):.2f} s |"
          for k in host_keys),
        *(f"| stage `{k}` (guest uptime), median | {statistics.median(r['timeline'][k] for r in runs):.2f} s |"
          for k in guest_keys),
        f"| **from a VM template**: QEMU exec → agent ping answered, min / median / max of {len(clones)} | "
        f"{_mmm([c['ready'] for c in clones])} s |",
        *(f"| template stage `{k}` (host s since exec), median | {statistics.median(c[k] for c in clones):.2f} s |"
          for k in clones[0] if k != "qemu_exec" and all(k in c for c in clones) and not k.startswith("guest_")),
        f"| building the template (cold boot + save), once | {build_s:.2f} s |",
        f"| host RSS of one idle clone (QEMU process, {IDLE_SETTLE_S:.0f} s after ready) | {clone_rss / 1024:.0f} MiB |",
        f"| guest memory used after boot (MemTotal − MemAvailable), median | "
        f"{statistics.median(r['guest_used'] for r in runs) / 2**20:.1f} MiB of "
        f"{first['guest_total'] / 2**20:.0f} MiB |",
        f"| host RSS of one idle VM (QEMU process, {IDLE_SETTLE_S:.0f} s after ready) | "
        f"{first['qemu_rss_kb'] / 1024:.0f} MiB |",
        f"| one container in the guest (`uname -a`: create → start → output → exit → delete), "
        f"min / median / max | {_mmm([r['container_s'] for r in runs])} s |",
    ]
    notes = [f"Guest: {cfg.machine}, {cfg.vcpus} vCPU, {cfg.memory_mb} MiB, accel {first['accel']}, "
             f"transport {first['transport']}; kernel {image.kernel}, image hash "
             f"{str(image.manifest.get('hash', '?'))[:12]}. Boots run one after another.",
             "`guest_*` stages are the guest's own uptime from console marks (spinbox-init / vminitd);"
             " the other stages are host seconds since QEMU was exec'd."]
    return (f"Guest VM boot ({first['accel'].upper()})", rows, notes)


SECTIONS = {"vm": section_vm}

if __name__ == "__main__":
    title, rows, notes = section_vm()
    print(f"## {title}\n")
    print("\n".join(rows))
    print("\n" + "\n".join(notes))
