"""`spinbox`: the host command-line tool (check, build, debug)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="spinbox", description="spinbox host tool")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="diagnose this host and boot one test VM")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        from spinbox.shim.check import run_check

        return run_check()
    return 2


if __name__ == "__main__":
    sys.exit(main())
