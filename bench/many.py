"""Benchmark section "many": N idle sandboxes alive at once (default 20; `SPINBOX_BENCH_SANDBOXES`
or `task bench -- --only many` with the variable set, e.g. 100), spinbox beside runc.

For each runtime, on one private containerd: start N `sleep` containers one after another
(`ctr run -d`), then with all of them alive read each sandbox's proportional set size (PSS,
/proc/<pid>/smaps_rollup: pages shared between sandboxes — the Python and QEMU binaries and
libraries — are divided among them) over the shim daemon and everything under it (QEMU,
virtiofsd), exec `true` in every one of them, and remove them all. The PSS is also read when
10 are alive (the issue's figure). The host's MemAvailable before and with all N alive gives
the cost per sandbox as the kernel sees it.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from bench.containerd import RUNTIMES, Bench, _children, _cmdline

SETTLE_S = 3.0


def _n() -> int:
    n = int(os.environ.get("SPINBOX_BENCH_SANDBOXES", "20"))
    if not 1 <= n <= 1000:
        raise ValueError(f"SPINBOX_BENCH_SANDBOXES={n}: must be 1..1000")
    return n


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _mem_available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def _kind(pid: int) -> str:
    name = os.path.basename((_cmdline(pid) or [b""])[0]).decode(errors="replace")
    return "qemu" if name.startswith("qemu-system") else "virtiofsd" if "virtiofsd" in name else "shim"


def _sandbox_pss(b: Bench, ids: list[str]) -> list[dict[str, int]]:
    """PSS (KiB) of each sandbox by process kind: its shim daemon (the one whose argv names the
    id) and all processes under it (QEMU, virtiofsd and its sandboxed child)."""
    shims = b.c.shim_pids()
    out = []
    for id in ids:
        kinds: dict[str, int] = {}
        for p in shims:
            if id.encode() in _cmdline(p):
                for q in _tree(p):
                    kinds[_kind(q)] = kinds.get(_kind(q), 0) + _pss_kb(q)
        out.append(kinds)
    return out


def _wait_running(b: Bench, ids: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        lines = b.ctr("task", "ls").stdout.decode().splitlines()
        running = {ln.split()[0] for ln in lines[1:] if "RUNNING" in ln}
        if set(ids) <= running:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not running after {timeout} s: {sorted(set(ids) - running)}")
        time.sleep(0.2)


def _one_runtime(b: Bench, rt: str, n: int) -> dict:
    ids: list[str] = []
    res: dict = {"start": [], "exec": [], "exec_ok": 0}
    avail0 = _mem_available_kb()
    try:
        for i in range(n):
            id = f"m-{rt}-{i}"
            t = time.monotonic()
            b.ctr(*b.run_args(rt, "-d"), b.ref, id, "sleep", "3600")
            ids.append(id)
            _wait_running(b, [id])
            res["start"].append(time.monotonic() - t)
            if len(ids) == min(10, n):
                time.sleep(SETTLE_S)
                res["pss10"] = _sandbox_pss(b, ids)
        time.sleep(SETTLE_S)
        res["pss"] = _sandbox_pss(b, ids)
        res["avail_drop_kb"] = avail0 - _mem_available_kb()
        for id in ids:
            t = time.monotonic()
            p = b.ctr("task", "exec", "--exec-id", "x", id, "true", check=False)
            res["exec"].append(time.monotonic() - t)
            res["exec_ok"] += p.returncode == 0
    finally:
        for id in ids:
            b.ctr("task", "kill", "-s", "SIGKILL", id, check=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            out = b.ctr("task", "ls").stdout.decode()
            if not any(id in out and "RUNNING" in ln for ln in out.splitlines() for id in ids):
                break
            time.sleep(0.2)
        for id in ids:
            b.ctr("task", "delete", id, check=False)
            b.ctr("containers", "delete", id, check=False)
    return res


def _mmm(values: list[float], unit: str, fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values))) + f" {unit}"


def section_many():
    n = _n()
    b = Bench()
    try:
        b.ctr(*b.run_args("spinbox", "--rm"), b.ref, "m-warmup", "true")   # template built
        results = {rt: _one_runtime(b, rt, n) for rt in RUNTIMES}
    finally:
        b.close()
    s, r = results["spinbox"], results["runc"]
    mib = [sum(k.values()) / 1024 for k in s["pss"]]
    mib10 = [sum(k.values()) / 1024 for k in s["pss10"]]
    rmib = [sum(k.values()) / 1024 for k in r["pss"]]
    part = {kind: statistics.median(k.get(kind, 0) / 1024 for k in s["pss10"])
            for kind in ("shim", "qemu", "virtiofsd")}
    rows = [
        "| measure | spinbox | runc |", "|---|---|---|",
        f"| sandboxes alive at once (`sleep` in each) | {n} | {n} |",
        f"| start of each, one after another (`ctr run -d` → RUNNING), min / median / max | "
        f"{_mmm(s['start'], 's')} | {_mmm(r['start'], 's')} |",
        f"| PSS per sandbox with {min(10, n)} alive (shim + QEMU + virtiofsd), min / median / max | "
        f"{_mmm(mib10, 'MiB', '{:.1f}')} | – |",
        f"| of which, median: shim daemon / QEMU / virtiofsd | {part['shim']:.1f} / {part['qemu']:.1f} / "
        f"{part['virtiofsd']:.1f} MiB | – |",
        f"| PSS per sandbox with {n} alive, min / median / max | {_mmm(mib, 'MiB', '{:.1f}')} | "
        f"{_mmm(rmib, 'MiB', '{:.1f}')} (shim) |",
        f"| host MemAvailable drop with {n} alive, per sandbox | {s['avail_drop_kb'] / 1024 / n:.1f} MiB | "
        f"{r['avail_drop_kb'] / 1024 / n:.1f} MiB |",
        f"| `ctr task exec true` in each of the {n}, answered | {s['exec_ok']} of {n} | {r['exec_ok']} of {n} |",
        f"| that exec with {n} alive, min / median / max | {_mmm(s['exec'], 's', '{:.3f}')} | "
        f"{_mmm(r['exec'], 's', '{:.3f}')} |",
    ]
    notes = ["Both runtimes on one private containerd in the same run, one after the other; spinbox's "
             "sandboxes start from the VM template. PSS counts a page shared by k processes as 1/k "
             "of a page in each, so the Python interpreter, QEMU's binary and libraries are divided "
             "among the sandboxes; each clone's guest RAM is its own (a memfd copy of the template's "
             "touched pages, see docs/architecture.md). N is `SPINBOX_BENCH_SANDBOXES` (default 20); "
             "`SPINBOX_BENCH_SANDBOXES=100 task bench -- --only many` runs 100."]
    return (f"many: {n} idle sandboxes alive at once, spinbox vs runc", rows, notes)


SECTIONS = {"many": section_many}
