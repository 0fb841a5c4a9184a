"""vminitd's log output: stderr (the VM's console, as PID 1), one line per record.

Every module logs to `logging.getLogger(__name__)`; `setup()` (called once by main) puts the
`spinbox.vminitd` loggers on stderr as `vminitd: <message>`: the host's boot watcher reads that
form off the console (`vminitd: ready in ...`). Debug records (`--verbose`) carry the monotonic
clock instead, `vminitd[12.345]: <message>`, which lines up with the kernel's boot timestamps.
asyncio imports `logging` anyway, so this costs the guest's start nothing.

Other libraries' loggers (ttrpc, asyncio) are left to Python's default: warnings and errors
only, as they were before.
"""
from __future__ import annotations

import logging
import sys
import time

ROOT = "spinbox.vminitd"


class ConsoleFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno <= logging.DEBUG:
            return f"vminitd[{time.monotonic():.3f}]: {record.message}"
        return f"vminitd: {record.message}"


_handler: logging.Handler | None = None


def setup(verbose: bool = False) -> None:
    """Console output for the `spinbox.vminitd` loggers (again: only the level changes)."""
    global _handler
    logger = logging.getLogger(ROOT)
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(ConsoleFormatter())
        logger.addHandler(_handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
