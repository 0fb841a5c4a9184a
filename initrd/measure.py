#!/usr/bin/env python3
"""Boot-time / memory measurement of the guest image layouts under QEMU TCG q35.

    python initrd/measure.py --kernel K --share-dir DIR [--runs 3] [--mode bench|selftest]

Boots the image described by DIR/image.json with `spinbox.<mode>=1` and reports, per boot,
host wall time and guest uptime at each `spinbox-init:` line, plus the guest's
MemTotal - MemAvailable after Python imported vminitd's dependencies. Not a test: numbers only.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

STAMP = re.compile(r"spinbox-init: (.*?) t=([0-9.]+)")
MEM = re.compile(r"mem_used_mb=(\d+)")


def qemu_argv(kernel: Path, share: Path, manifest: dict, extra_cmdline: str, sock: Path) -> list[str]:
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-cpu", "max", "-m", "512",
            "-smp", "1", "-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
            "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(share / manifest["initrd"]),
            "-append", f"console=ttyS0 panic=-1 quiet {manifest['cmdline']} {extra_cmdline}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=spinbox.agent"]
    if manifest.get("root_disk"):
        argv += ["-drive", f"file={share / manifest['root_disk']},if=none,id=spinbox-root,"
                           "format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=spinbox-root,serial=spinbox-root"]
    return argv


def boot_once(argv: list[str], timeout: float = 120) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace")
    stamps: dict[str, tuple[float, float]] = {}
    lines = []
    mem = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            m = STAMP.search(line)
            if m:
                stamps[m.group(1)] = (time.monotonic() - t0, float(m.group(2)))
            m = MEM.search(line)
            if m:
                mem = int(m.group(1))
            if time.monotonic() - t0 > timeout:
                break
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"stamps": stamps, "mem_used_mb": mem, "wall_total": time.monotonic() - t0,
            "console": lines}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", type=Path, required=True)
    ap.add_argument("--share-dir", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mode", default="bench")
    ap.add_argument("--show-console", action="store_true")
    args = ap.parse_args()
    manifest = json.loads((args.share_dir / "image.json").read_text())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            r = boot_once(qemu_argv(args.kernel, args.share_dir, manifest,
                                    f"spinbox.{args.mode}=1", Path(tmp) / f"agent{i}.sock"))
            if args.show_console:
                print("\n".join(r["console"]))
            results.append(r)
            print(f"run {i}: mem_used_mb={r['mem_used_mb']} " + "  ".join(
                f"{k}: wall {w:.2f} guest {g:.2f}" for k, (w, g) in r["stamps"].items()), flush=True)
    for key in results[0]["stamps"]:
        walls = [r["stamps"][key][0] for r in results if key in r["stamps"]]
        guests = [r["stamps"][key][1] for r in results if key in r["stamps"]]
        print(f"{key:32s} wall min/med/max {min(walls):.2f}/{statistics.median(walls):.2f}/"
              f"{max(walls):.2f}  guest {min(guests):.2f}/{statistics.median(guests):.2f}/{max(guests):.2f}")
    mems = [r["mem_used_mb"] for r in results if r["mem_used_mb"] is not None]
    if mems:
        print(f"mem_used_mb min/med/max {min(mems)}/{statistics.median(mems)}/{max(mems)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
