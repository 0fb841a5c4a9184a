"""Minimal logging to stderr (the console as PID 1); the logging module costs import time."""
from __future__ import annotations

import sys
import time

verbose = False


def log(msg: str) -> None:
    sys.stderr.write(f"vminitd: {msg}\n")
    sys.stderr.flush()


def debug(msg: str) -> None:
    if verbose:
        sys.stderr.write(f"vminitd[{time.monotonic():.3f}]: {msg}\n")
        sys.stderr.flush()
