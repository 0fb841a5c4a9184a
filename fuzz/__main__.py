"""`python -m fuzz [TARGET...] [--inputs N] [--seed S] [--engine random|atheris]`: every target
(or those named), the total split by the targets' weights (FUZZ_INPUTS, default 10**6), one
after another; prints inputs, inputs/s, crashes and memory per target. Exit status 1 on a crash.

Engines: `random` (the default, deterministic: CI) runs in this process; `atheris` runs each
target coverage-guided in a child process (fuzz/libfuzzer.py)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import TARGETS, libfuzzer
from .driver import Runner, Target, random_engine


def load(name: str) -> Target:
    target: Target = importlib.import_module(f"fuzz.{TARGETS[name]}").TARGET
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz")
    ap.add_argument("targets", nargs="*", help=f"some of {list(TARGETS)} (default: all)")
    ap.add_argument("--inputs", type=int, default=int(os.environ.get("FUZZ_INPUTS", 10**6)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", choices=("random", "atheris"), default="random")
    args = ap.parse_args(argv)
    if args.engine == "atheris" and not libfuzzer.available():
        ap.error("--engine atheris: atheris is not installed (pip install -e '.[dev]'); "
                 "the default engine needs nothing")
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {list(TARGETS)}")
    targets = [load(n) for n in names]
    total_weight = sum(t.weight for t in targets)
    print(f"engine {args.engine}, seed {args.seed}")
    print(f"{'target':<16}{'inputs':>10}{'seconds':>9}{'inputs/s':>10}{'crashes':>8}"
          f"{'peak RSS MiB':>13}{'growth MiB':>11}{'bound':>7}")
    crashed = False
    for t in targets:
        n = max(1, round(args.inputs * t.weight / total_weight))
        if args.engine == "atheris":
            s = libfuzzer.run(t, n, args.seed)
        else:
            s = random_engine(Runner(t), n, seed=args.seed)
        print(f"{t.name:<16}{s.inputs:>10}{s.seconds:>9.1f}{s.per_second:>10.0f}{s.crashes:>8}"
              f"{s.rss_peak_mb:>13.1f}{s.rss_growth_mb:>11.1f}{s.memory_bound_mb:>7}", flush=True)
        if s.crashes:
            crashed = True
            print(s.first_crash, file=sys.stderr)
            print("crash inputs: " + " ".join(s.crash_files), file=sys.stderr)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
