"""CI smoke of the fuzz targets (fuzz/, docs/fuzzing.md): each runs a few thousand seeded
inputs; any crash, hang or memory growth past the target's bound fails."""
from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # fuzz/ is not an installed package

from fuzz import TARGETS
from fuzz.__main__ import load
from fuzz.driver import Finding, Runner, random_engine


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_survives_a_short_run(name):
    target = load(name)
    runner = Runner(target, use_alarm=False, save_crashes=False, warmup=200)
    tracemalloc.start()
    try:
        stats = random_engine(runner, 3000, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.inputs == 3000
    assert stats.crashes == 0, stats.first_crash
    assert peak < target.memory_bound_mb * 2**20, f"{name}: traced peak {peak / 2**20:.1f} MiB"


def test_frames_harness_detects_a_broken_decoder(monkeypatch):
    """The invariants can fail: a decoder that drops the last event is caught."""
    from fuzz import frames
    real = frames.FrameDecoder.feed
    monkeypatch.setattr(frames.FrameDecoder, "feed", lambda self, d: real(self, d)[:-1])
    harness = frames.FramesHarness()
    with pytest.raises(Finding):
        for data in frames.seeds():
            harness(data)
    harness.close()
