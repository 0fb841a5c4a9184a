"""Rate limits for what the guest can make the host do: a token bucket, and log lines by key.

The guest decides how often it raises an event or sends something odd; each of those may cost
the host an event to containerd or a log line. `TokenBucket` bounds the rate of a kind of work
(`burst` at once, then `rate` per second); `LogThrottle` bounds the log lines of each message
key the same way and says how many similar lines it held back, on the next line of that key
that goes out (so a flood leaves a trace with its size, not a log full of it).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` per second. `take()` spends one if there is
    one; `wait_s()` says how long until there is."""

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_s(self) -> float:
        self._refill()
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate


class LogThrottle:
    """Log lines caused by guest input, at most `burst` per key and then one per `interval`
    seconds; the next line of a key that goes out ends with "(N similar messages suppressed)".
    Keys are the caller's fixed strings (never guest data); at most `max_keys` are tracked."""

    def __init__(self, logger: logging.Logger, *, burst: int = 5, interval: float = 10.0,
                 clock: Clock = time.monotonic, max_keys: int = 256) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._keys: OrderedDict[str, tuple[TokenBucket, int]] = OrderedDict()
        self.suppressed = 0          # all keys, since the start (for tests and stats)

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` under `key` unless over its budget; True if it went out."""
        entry = self._keys.get(key)
        if entry is None:
            if len(self._keys) >= self._max_keys:
                self._keys.popitem(last=False)
            entry = (TokenBucket(1.0 / self.interval, self.burst, clock=self._clock), 0)
        bucket, held = entry
        if not bucket.take():
            self._keys[key] = (bucket, held + 1)
            self.suppressed += 1
            return False
        self._keys[key] = (bucket, 0)
        if held:
            msg += " (%d similar messages suppressed)"
            args = (*args, held)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)
