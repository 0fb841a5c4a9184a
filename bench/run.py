"""`task bench`: run the benchmark sections and write docs/benchmarks.md.

Each section is a function returning (title, markdown table rows, notes). A section that cannot
run on this host (missing kernel, not root) is reported as skipped with the reason instead of
silently vanishing. Speed and memory targets live here, never in timed tests.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
Section = tuple[str, list[str], list[str]]


def _py(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def section_ttrpc() -> Section:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        p = _py("-m", "ttrpc.bench", "--json", f.name)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
        r = json.load(open(f.name))
    u, c, s = r["unary_sequential"], r["unary_concurrent"], r["stream_download"]
    rows = [
        "| measure | value |", "|---|---|",
        f"| unary round trip p50 | {u['p50_us']:.0f} µs |",
        f"| unary round trip p99 | {u['p99_us']:.0f} µs |",
        f"| unary sequential | {u['calls_per_s']} calls/s ({u['calls']} calls) |",
        f"| unary, {c['in_flight']} in flight | {c['calls_per_s']} calls/s |",
        f"| streaming throughput (credit flow control, {s['message_bytes'] // 1024} KiB messages,"
        f" {s['window_bytes'] // 1024} KiB window) | {s['mb_per_s']:.0f} MB/s |",
    ]
    return ("TTRPC over a unix socket (server in a child process)", rows,
            ["Go's ttrpc is not run here: Debian ships ttrpc 1.1 (unary only); interop, not speed, "
             "is tested against it in integration/test_go_interop.py."])


SECTIONS: dict[str, Callable[[], Section]] = {"ttrpc": section_ttrpc}


def _optional_sections() -> None:
    # Sections that need the guest or containerd register themselves when their module exists.
    for mod in ("bench.vm", "bench.containerd", "bench.network", "bench.many"):
        try:
            m = __import__(mod, fromlist=["SECTIONS"])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        SECTIONS.update(m.SECTIONS)


def main() -> int:
    _optional_sections()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    a = ap.parse_args()
    names = a.only or list(SECTIONS)
    host = (f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"kernel {platform.release()}")
    out = ["# Benchmarks", "",
           f"Written by `task bench` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
           f"Host: {host}. Numbers from one run; this host runs guests under TCG (no usable KVM).", ""]
    failed = 0
    for name in names:
        print(f"bench: {name} ...", flush=True)
        try:
            title, rows, notes = SECTIONS[name]()
        except Exception as e:  # one failed section must not hide the others
            failed += 1
            out += [f"## {name}", "", f"Not measured: {type(e).__name__}: {e}", ""]
            print(f"bench: {name} failed: {e}", file=sys.stderr)
            continue
        out += [f"## {title}", "", *rows, ""]
        for note in notes:          # one paragraph each (markdown would merge adjacent lines)
            out += [note, ""]
        print("\n".join(rows))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(out).rstrip() + "\n")
    print(f"bench: wrote {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
