"""What every target promises, and the engines that check it.

A target's harness takes one input (bytes) and either returns — the input was decoded, or
refused with an error of our own tree — or raises: `Finding` when an invariant failed, `Hang`
when the input took longer than the target's time bound, anything else when the code under
test let an unexpected exception out. The runner adds the memory bound: the RSS may grow by
at most the target's `memory_bound_mb` over the run (after a warm-up), sampled as it goes.

Engines: `random_engine` mutates the seed corpus with a seeded RNG (deterministic: the CI
smoke and the fallback when atheris is missing); `fuzz.libfuzzer` runs the same harness
under atheris (libFuzzer, coverage-guided) in a child process per target.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import Input

ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = ROOT / ".cache" / "fuzz"          # corpora, crashes, stats: gitignored (/.cache/)
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Finding(AssertionError):
    """An invariant of the code under test failed for this input."""


class Hang(BaseException):
    """The input ran past its time bound. A BaseException: code under test that catches
    Exception must not swallow it."""


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after `seconds` (a busy loop inside one call; async
    harnesses bound themselves with asyncio timeouts first). Main thread only."""
    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"input still running after {seconds:.1f}s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


Harness = Callable[[bytes], None]


@dataclass(frozen=True)
class Target:
    name: str
    covers: str                                  # one line for the report and the docs
    make: Callable[[], Harness]                  # builds the harness once per process
    seeds: Callable[[], list[bytes]]
    weight: float = 1.0                          # share of `python -m fuzz`'s total (sized so that
                                                 # each target takes minutes of the 10^6 run)
    time_bound_s: float = 2.0                    # per input
    memory_bound_mb: int = 64                    # RSS growth over a run
    smoke_inputs: int = 3000                     # the CI smoke's share (tests/unit/test_fuzz_smoke.py)


class AsyncHarness:
    """A harness whose inputs run as coroutines on one event loop (kept across inputs: a
    loop per input would cost more than most inputs). Each input is bounded in time, and
    must leave no task behind: what it started is cancelled and must end."""

    def __init__(self, time_bound_s: float) -> None:
        self.time_bound_s = time_bound_s
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self.loop_errors: list[str] = []

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        # A task destroyed while pending is our cleanup's business, not the input's.
        if exc is None and "Task was destroyed" in str(context.get("message")):
            return
        self.loop_errors.append(f"{context.get('message')}: {exc!r}")

    async def run(self, inp: Input) -> None:
        raise NotImplementedError

    def __call__(self, data: bytes) -> None:
        self.loop_errors.clear()
        try:
            self.loop.run_until_complete(self._bounded(data))
        finally:
            self._cleanup()
        if self.loop_errors:
            raise Finding(f"unhandled error in a task: {self.loop_errors[0]}")

    async def _bounded(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.time_bound_s):
                await self.run(Input(data))
        except TimeoutError:
            raise Hang(f"input still running after {self.time_bound_s:.1f}s") from None

    def _cleanup(self) -> None:
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            done, left = self.loop.run_until_complete(asyncio.wait(pending, timeout=self.time_bound_s))
            if left:
                raise Hang(f"{len(left)} task(s) ignored cancellation: {sorted(t.get_name() for t in left)}")

    def close(self) -> None:
        self._cleanup()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


@dataclass
class Stats:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    crashes: int = 0
    first_crash: str = ""
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_growth_mb: float = 0.0                  # peak over the RSS after warm-up
    memory_bound_mb: int = 0
    engine: str = "random"
    crash_files: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


class Runner:
    """Runs a target's harness input by input: counts, samples memory, bounds time, records
    crashes (the input goes to .cache/fuzz/crashes/<target>/). `stop_on_crash` for atheris,
    which stops at the first one itself; the random engine keeps going (up to `max_crashes`)."""

    SAMPLE_EVERY = 256

    def __init__(self, target: Target, *, use_alarm: bool = True, save_crashes: bool = True,
                 max_crashes: int = 20, warmup: int = 500) -> None:
        self.target = target
        self.harness = target.make()
        self.use_alarm = use_alarm
        self.save_crashes = save_crashes
        self.max_crashes = max_crashes
        self.warmup = warmup
        self.stats = Stats(target.name, memory_bound_mb=target.memory_bound_mb)
        self._baseline = 0
        self._started = time.monotonic()
        rss = rss_bytes()
        self.stats.rss_start_mb = self.stats.rss_peak_mb = rss / 2**20

    def one(self, data: bytes, *, reraise: bool = False) -> None:
        self.stats.inputs += 1
        try:
            if self.use_alarm:
                with alarm(self.target.time_bound_s * 2 + 1):
                    self.harness(data)
            else:
                self.harness(data)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self._crash(data, exc)
            if reraise:
                raise
        if self.stats.inputs % self.SAMPLE_EVERY == 0 or self.stats.inputs == self.warmup:
            self.sample_memory()

    def sample_memory(self) -> None:
        rss = rss_bytes()
        if self.stats.inputs >= self.warmup and not self._baseline:
            self._baseline = rss
        self.stats.rss_peak_mb = max(self.stats.rss_peak_mb, rss / 2**20)
        if self._baseline:
            self.stats.rss_growth_mb = max(self.stats.rss_growth_mb, (rss - self._baseline) / 2**20)
            if self.stats.rss_growth_mb > self.target.memory_bound_mb:
                raise Finding(f"{self.target.name}: RSS grew {self.stats.rss_growth_mb:.1f} MiB over "
                              f"{self.stats.inputs} inputs (bound {self.target.memory_bound_mb} MiB)")

    def _crash(self, data: bytes, exc: BaseException) -> None:
        self.stats.crashes += 1
        text = "".join(traceback.format_exception(exc))
        if not self.stats.first_crash:
            self.stats.first_crash = text
        if self.save_crashes:
            d = WORK_DIR / "crashes" / self.target.name
            d.mkdir(parents=True, exist_ok=True)
            path = d / hashlib.sha1(data).hexdigest()
            path.write_bytes(data)
            path.with_suffix(".txt").write_text(text)
            self.stats.crash_files.append(str(path))

    def finish(self) -> Stats:
        self.sample_memory()
        self.stats.seconds = time.monotonic() - self._started
        close = getattr(self.harness, "close", None)
        if close is not None:
            close()
        return self.stats


def mutations(rng: random.Random, data: bytes, corpus: list[bytes], limit: int = 4096) -> bytes:
    """1..4 byte-level mutations of `data` (libFuzzer's basic ones: flip, set, insert,
    erase, duplicate, splice with another corpus entry)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        n = len(buf)
        if op == 0 and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            i = rng.randrange(n + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and n > 1:
            i = rng.randrange(n)
            del buf[i:i + rng.randint(1, min(16, n - i))]
        elif op == 4 and n:
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 32))
            buf[j:j] = buf[i:j]
        elif op == 5 and corpus:
            other = rng.choice(corpus)
            cut = rng.randrange(len(buf) + 1)
            buf[cut:] = other[rng.randrange(len(other) + 1):]
        else:
            buf += rng.randbytes(rng.randint(1, 16))
    return bytes(buf[:limit])


def random_engine(runner: Runner, inputs: int, *, seed: int = 0) -> Stats:
    """Feed `inputs` inputs: the seeds first, then mutations of seeds and earlier inputs."""
    rng = random.Random(seed)
    seeds = runner.target.seeds()
    corpus = list(seeds) or [b""]
    for data in seeds[:inputs]:
        runner.one(data)
    for i in range(max(0, inputs - len(seeds))):
        if runner.stats.crashes >= runner.max_crashes:
            break
        data = mutations(rng, rng.choice(corpus), corpus)
        runner.one(data)
        if i % 64 == 0 and len(corpus) < 4096:
            corpus.append(data)            # no coverage here: keep a sample of what was tried
    return runner.finish()
