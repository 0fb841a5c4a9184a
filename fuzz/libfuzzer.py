"""The coverage-guided engine: a target's harness under atheris (libFuzzer), one child process
per target.

    python -m fuzz --engine atheris [TARGET...] [--inputs N] [--seed S]    # the parent side

The child (`python -m fuzz.libfuzzer TARGET --runs N --seed S --stats FILE`) imports the target
inside `atheris.instrument_imports` over our packages (ttrpc, spinbox, fuzz), so the code under
test reports its edge coverage and libFuzzer keeps the inputs that reach new edges in
.cache/fuzz/corpus/<target>/ (it grows across runs; the target's seeds start it). The same
`Runner` as the random engine counts inputs, samples memory and saves a crash; its stats go to
FILE as JSON when the runs are done or at the first crash (libFuzzer stops there and exits
non-zero). Hangs are libFuzzer's `-timeout` (SIGALRM is libFuzzer's in the child, so the
runner's own alarm is off), memory its `-rss_limit_mb` besides the runner's growth bound.

A process per target: instrumentation is per import, and libFuzzer runs once per process.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import TARGETS
from .driver import ROOT, WORK_DIR, Runner, Stats, Target

INSTRUMENTED = ["ttrpc", "spinbox", "fuzz"]
RSS_LIMIT_MB = 2048
MAX_LEN = 4096                 # as the random engine's mutations


def available() -> bool:
    try:
        import atheris  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def _write_stats(path: str, stats: Stats) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(stats), f)
    os.replace(tmp, path)


def child(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz.libfuzzer")
    ap.add_argument("target")
    ap.add_argument("--runs", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", required=True)
    args = ap.parse_args(argv)
    import atheris
    import importlib
    with atheris.instrument_imports(include=INSTRUMENTED):
        target: Target = importlib.import_module(f"fuzz.{TARGETS[args.target]}").TARGET
    runner = Runner(target, use_alarm=False)
    runner.stats.engine = "atheris"
    corpus = WORK_DIR / "corpus" / target.name
    corpus.mkdir(parents=True, exist_ok=True)
    # libFuzzer's own crash-<sha1> files go here, not into the working directory (a checkout)
    artifacts = WORK_DIR / "atheris-artifacts" / target.name
    artifacts.mkdir(parents=True, exist_ok=True)
    for data in target.seeds():
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)

    def one(data: bytes) -> None:
        try:
            runner.one(data, reraise=True)
        except BaseException:
            _write_stats(args.stats, dataclasses.replace(runner.stats, seconds=_elapsed(runner)))
            # libFuzzer exits the process after this: close the harness now (its temp dirs,
            # sockets), whatever state the failed input left it in
            with contextlib.suppress(BaseException):
                harness_close = getattr(runner.harness, "close", None)
                if harness_close is not None:
                    harness_close()
            raise
        if runner.stats.inputs >= args.runs:
            _write_stats(args.stats, runner.finish())
            sys.stdout.flush()
            os._exit(0)            # libFuzzer would run its exit path; our numbers are written

    atheris.Setup([sys.argv[0], f"-runs={args.runs + 1}", f"-seed={args.seed + 1}", f"-max_len={MAX_LEN}",
                   f"-timeout={int(target.time_bound_s * 2 + 1)}", f"-rss_limit_mb={RSS_LIMIT_MB}",
                   "-print_final_stats=1", f"-artifact_prefix={artifacts}/", str(corpus)], one)
    atheris.Fuzz()
    return 0


def _elapsed(runner: Runner) -> float:
    import time
    return time.monotonic() - runner._started


def run(target: Target, inputs: int, seed: int) -> Stats:
    """Run `target` for `inputs` inputs in a child under atheris; its stats (the child's log,
    libFuzzer's lines included, is .cache/fuzz/atheris-<target>.log)."""
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    log_path = WORK_DIR / f"atheris-{target.name}.log"
    with tempfile.TemporaryDirectory(prefix="spinbox-fuzz-") as d:
        stats_path = str(Path(d) / "stats.json")
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "fuzz.libfuzzer", target.name, "--runs", str(inputs),
                                   "--seed", str(seed), "--stats", stats_path],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
        try:
            with open(stats_path) as f:
                raw: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            raw = {"target": target.name, "crashes": 1, "engine": "atheris",
                   "first_crash": f"the atheris child exited {proc.returncode} without stats: see {log_path}"}
    stats = Stats(**raw)
    if proc.returncode != 0 and not stats.crashes:
        stats.crashes = 1
        stats.first_crash = f"the atheris child exited {proc.returncode}: see {log_path}"
    if stats.crashes:
        stats.first_crash += f"\n(libFuzzer's log: {log_path})"
    return stats


if __name__ == "__main__":
    sys.exit(child())
