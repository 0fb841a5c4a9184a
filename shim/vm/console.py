"""Follow the guest's serial console that QEMU writes into a file.

QEMU appends to the file and never blocks on it; we read it by polling (cheap: a stat and a
read of the new bytes). Lines get a host timestamp (seconds since QEMU was exec'd) when we see
them, which is what the boot timeline reports. Only the last `keep` lines stay in memory; the
guest controls this output, so it is bounded, and an over-long line is cut.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

MAX_LINE = 4096


@dataclass(frozen=True)
class ConsoleLine:
    index: int      # 0-based number of the line since boot
    t: float        # host seconds since QEMU exec when we first read it
    text: str


class ConsoleLog:
    def __init__(self, path: Path, t0: float, keep: int = 2000):
        self.path = path
        self.t0 = t0
        self._pos = 0
        self._partial = b""
        self._lines: deque[ConsoleLine] = deque(maxlen=keep)
        self._count = 0

    @property
    def line_count(self) -> int:
        return self._count

    def poll(self) -> int:
        """Read what QEMU appended since the last poll; returns the number of new lines."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read(1 << 20)
        except FileNotFoundError:
            return 0
        if not data:
            return 0
        self._pos += len(data)
        now = time.monotonic() - self.t0
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        if len(self._partial) > MAX_LINE:
            chunks.append(self._partial[:MAX_LINE])
            self._partial = b""
        for raw in chunks:
            text = raw[:MAX_LINE].decode(errors="replace").rstrip("\r")
            self._lines.append(ConsoleLine(self._count, now, text))
            self._count += 1
        return len(chunks)

    def lines(self, after: int = 0) -> list[ConsoleLine]:
        return [ln for ln in self._lines if ln.index >= after]

    def find(self, pattern: str | re.Pattern[str], after: int = 0) -> ConsoleLine | None:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        for ln in self._lines:
            if ln.index >= after and rx.search(ln.text):
                return ln
        return None

    def tail(self, n: int = 20) -> list[str]:
        self.poll()
        out = [ln.text for ln in list(self._lines)[-n:]]
        if self._partial:
            out.append(self._partial.decode(errors="replace"))
        return out[-n:]

    async def wait_for(self, pattern: str | re.Pattern[str], timeout: float, after: int = 0,
                       interval: float = 0.02) -> ConsoleLine:
        """First line at index >= `after` matching `pattern`; TimeoutError with the tail."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            hit = self.find(rx, after)
            if hit is not None:
                return hit
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no console line matching /{rx.pattern}/ within {timeout} s; "
                                   "console tail:\n" + "\n".join(self.tail(15)))
            await asyncio.sleep(interval)
