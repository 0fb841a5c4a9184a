"""`Input`: typed values read off the fuzzer's bytes, so a mutation of the bytes is a mutation
of the structure built from them (libFuzzer's FuzzedDataProvider idea, written for our needs
and usable without atheris). Reading past the end yields zeros: every input is valid."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Input:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return max(0, len(self._data) - self._pos)

    def byte(self) -> int:
        if self._pos >= len(self._data):
            return 0
        b = self._data[self._pos]
        self._pos += 1
        return b

    def uint(self, nbytes: int) -> int:
        """An unsigned integer of `nbytes` bytes (little end first)."""
        value = 0
        for i in range(nbytes):
            value |= self.byte() << (8 * i)
        return value

    def below(self, n: int) -> int:
        """0..n-1 (n >= 1)."""
        if n <= 1:
            return 0
        return self.uint(1 if n <= 256 else 2 if n <= 65536 else 4) % n

    def chance(self, of: int) -> bool:
        """True about once in `of` inputs (0 bytes left: False)."""
        return self.remaining > 0 and self.below(of) == 0

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def take(self, n: int) -> bytes:
        """Up to `n` bytes (fewer at the end of the input)."""
        out = self._data[self._pos:self._pos + max(0, n)]
        self._pos += len(out)
        return out

    def blob(self, limit: int = 64) -> bytes:
        """A length-prefixed byte string of at most `limit` bytes."""
        return self.take(self.below(limit + 1))

    def rest(self) -> bytes:
        out = self._data[self._pos:]
        self._pos = len(self._data)
        return out
