"""Follow the guest's serial console, which QEMU writes into a socket the shim reads.

What arrives is `feed()` here (by the VM's `FdReader`, shim/vm/logsink.py): it goes into the
bounded console file (`RotatingFile`) and into lines with a host timestamp (seconds since QEMU
was exec'd) when we see them, which is what the boot timeline reports. Only the last `keep`
lines stay in memory; the guest controls this output, so it is bounded, an over-long line is
cut, and a chunk of many short lines costs only the last `keep` of them in Python objects.
`poll()` reads what is already in the socket before a look, so a look is up to date.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .logsink import RotatingFile

MAX_LINE = 4096


@dataclass(frozen=True)
class ConsoleLine:
    index: int      # 0-based number of the line since boot
    t: float        # host seconds since QEMU exec when we first read it
    text: str


class ConsoleLog:
    def __init__(self, t0: float, keep: int = 2000, *, file: RotatingFile | None = None,
                 pull: Callable[[], None] | None = None):
        self.t0 = t0
        self.keep = keep
        self.file = file
        self.pull = pull            # reads what is waiting in the socket now (into feed)
        self._partial = b""
        self._lines: deque[ConsoleLine] = deque(maxlen=keep)
        self._count = 0

    @property
    def line_count(self) -> int:
        return self._count

    def feed(self, data: bytes) -> int:
        """Console output as it arrived; returns the number of new lines."""
        if not data:
            return 0
        if self.file is not None:
            self.file.write(data)
        now = time.monotonic() - self.t0
        total = data.count(b"\n")
        # only the last `keep` lines can stay: split off no more than those
        chunks = (self._partial + data).rsplit(b"\n", self.keep)
        self._partial = chunks.pop()
        skipped = total - len(chunks)
        if skipped > 0:
            chunks.pop(0)           # the older lines, in one piece
            self._count += skipped + 1
        if len(self._partial) > MAX_LINE:
            chunks.append(self._partial[:MAX_LINE])
            self._partial = b""
            total += 1
        for raw in chunks:
            text = raw[:MAX_LINE].decode(errors="replace").rstrip("\r")
            self._lines.append(ConsoleLine(self._count, now, text))
            self._count += 1
        return total

    def poll(self) -> int:
        """Take in what QEMU wrote that we have not read yet; returns the number of new lines."""
        before = self._count
        if self.pull is not None:
            self.pull()
        return self._count - before

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
