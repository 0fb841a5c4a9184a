"""CI smoke of the fuzz targets (fuzz/, docs/fuzzing.md): each runs its `smoke_inputs` seeded
inputs (a few thousand; fewer for the slow ones); any crash, hang or memory growth past the
target's bound fails. The detector tests break one rule in the code under test and check that
the target's invariants notice."""
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
        stats = random_engine(runner, target.smoke_inputs, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.inputs == target.smoke_inputs
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


def _finds(target_name: str, inputs: int) -> str:
    """The first crash of a short run of the target (its text), or ''."""
    runner = Runner(load(target_name), use_alarm=False, save_crashes=False, max_crashes=1)
    stats = random_engine(runner, inputs, seed=1)
    return stats.first_crash


def test_events_harness_detects_a_follower_that_publishes_bad_statuses(monkeypatch):
    from spinbox.shim import exits
    from spinbox.shim.process import ExitInfo
    monkeypatch.setattr(exits, "guest_exit", lambda pid, status, at_ns: ExitInfo(pid, 256, at_ns))
    assert "exit status 256 published" in _finds("events", 300)


def test_stdio_harness_detects_a_receiver_without_its_window_check(monkeypatch):
    import ttrpc.flow
    monkeypatch.setattr(ttrpc.flow.ReceiveWindow, "received", lambda self, n: None)
    assert "Finding" in _finds("stdio", 300)


def test_vminitd_harness_detects_an_error_outside_the_status_tree(monkeypatch):
    from spinbox.vminitd.agent import Agent

    def state(self, id, exec_id=""):
        raise KeyError(id)
    monkeypatch.setattr(Agent, "state", state)
    assert "KeyError escaped as a non-status error" in _finds("vminitd", 300)


def test_vminitd_confinement_refuses_writes_outside_the_temp_dir(tmp_path):
    from fuzz import vminitd
    confined = vminitd._confined()
    confined.root = str(tmp_path)
    confined.violations.clear()
    try:
        (tmp_path / "inside").mkdir()
        with pytest.raises(PermissionError):
            (tmp_path.parent / "outside-of-the-fuzz-root").mkdir()
    finally:
        confined.root = None
    assert not (tmp_path.parent / "outside-of-the-fuzz-root").exists()
    assert confined.violations == [f"os.mkdir {str(tmp_path.parent / 'outside-of-the-fuzz-root')!r}"]


def test_the_atheris_engine_runs_a_target_in_a_child():
    """`--engine atheris`: the same harness, coverage-guided, in a child process that reports
    the runner's numbers back."""
    from fuzz import libfuzzer
    if not libfuzzer.available():
        pytest.skip("atheris is not installed (dev extra)")
    stats = libfuzzer.run(load("stdio"), 300, seed=1)
    assert stats.crashes == 0, stats.first_crash
    assert stats.engine == "atheris" and stats.inputs == 300 and stats.seconds > 0
