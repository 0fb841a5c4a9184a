"""`containerd-shim-spinbox-v1`: the entry point containerd executes (see manager.py, daemon.py).

Exit codes: 0 success; 1 a failure containerd shows (its message is the output); 2 bad argv.
"""
from __future__ import annotations

import os
import sys

from spinbox.shim.manager import ShimError, parse_args

__all__ = ["main"]


def _read_stdin() -> bytes:
    """All of stdin (containerd: /dev/null, a pipe with options, or BootstrapParams)."""
    try:
        if os.isatty(0):
            return b""
        return sys.stdin.buffer.read(10 << 20)
    except (OSError, ValueError, AttributeError):
        return b""


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(args_list)
    except ShimError as e:
        print(f"containerd-shim-spinbox-v1: {e}", file=sys.stderr)
        return 2
    from spinbox.shim import manager

    if args.version:
        sys.stdout.write(manager.version_text())
        return 0
    try:
        if args.info:
            sys.stdout.buffer.write(manager.runtime_info(_read_stdin()))
            return 0
        if args.action == "start":
            out = manager.start(args, _read_stdin())
            sys.stdout.buffer.write(out)
            sys.stdout.flush()
            return 0
        if args.action == "delete":
            outcome = manager.delete(args)
            for w in outcome.warnings:     # containerd logs delete's stderr as warnings
                print(f"spinbox delete {args.namespace}/{args.id}: {w}", file=sys.stderr)
            sys.stdout.buffer.write(manager.delete_response(outcome))
            sys.stdout.flush()
            return 0
        if args.action == "serve":
            from spinbox.shim import daemon

            return daemon.serve(args)
    except ShimError as e:
        print(f"spinbox: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # unexpected: still one line containerd can show, not a traceback
        print(f"spinbox: {args.action or 'shim'} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not args.action:
        print("containerd-shim-spinbox-v1: missing action (start, delete) or -v / -info; this "
              "binary is run by containerd (runtime io.containerd.spinbox.v1)", file=sys.stderr)
    else:
        print(f"containerd-shim-spinbox-v1: unknown action {args.action!r} (start, delete)",
              file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
