"""shim.autoscale: the vCPU controller's decisions, as a table of sample sequences."""
from __future__ import annotations

import pytest

from spinbox.shim.autoscale import Bounds, Controller, Policy, Sample

P = Policy(interval_s=1, grow_above_pct=80, shrink_below_pct=30, sustain_s=2, cooldown_s=5,
           min_vcpus=1, max_vcpus=3)


def feed(ctl: Controller, vcpus: int, pcts: list[float | None], *, start: float = 0.0,
         online: int | None = None) -> list[tuple[str, int, str]]:
    """One sample a second at the given busy percentage (None: a sample that repeats the last
    counters); returns each decision (action, vcpus, why)."""
    busy = idle = 0
    ctl.observe(Sample(start, busy, idle, online or vcpus), vcpus)        # baseline
    out = []
    for i, pct in enumerate(pcts, 1):
        if pct is not None:
            total = 1000 * vcpus
            busy += int(total * pct / 100)
            idle += total - int(total * pct / 100)
        d = ctl.observe(Sample(start + i, busy, idle, online or vcpus), vcpus)
        out.append((d.action, d.vcpus, d.why))
    return out


CASES = [
    # (name, bounds, vcpus, usage per second, expected (action, vcpus) per sample)
    ("sustained pressure grows by one", Bounds(1, 3), 1, [95, 95, 95],
     [("hold", 1), ("hold", 1), ("grow", 2)]),
    ("a spike shorter than sustain_s does nothing", Bounds(1, 3), 1, [95, 95, 50, 95, 95],
     [("hold", 1), ("hold", 1), ("hold", 1), ("hold", 1), ("hold", 1)]),
    ("sustained idle shrinks by one", Bounds(1, 3), 2, [5, 5, 5],
     [("hold", 2), ("hold", 2), ("shrink", 1)]),
    ("idle at the floor holds", Bounds(2, 3), 2, [5, 5, 5, 5],
     [("hold", 2)] * 4),
    ("pressure at the ceiling holds", Bounds(1, 2), 2, [99, 99, 99],
     [("hold", 2)] * 3),
    ("between the thresholds holds and resets the timers", Bounds(1, 3), 1, [95, 95, 60, 95, 95],
     [("hold", 1)] * 5),
    ("25% on 4 vCPUs: on 3 it is 33%, so one goes", Bounds(1, 4), 4, [25, 25, 25, 25],
     [("hold", 4), ("hold", 4), ("shrink", 3), ("shrink", 3)]),
    ("below the floor (an Update raised it): grow to it at once", Bounds(3, 3), 2, [50],
     [("grow", 3)]),
    ("above the ceiling: shrink to it at once", Bounds(1, 2), 3, [50],
     [("shrink", 2)]),
]


@pytest.mark.parametrize("name,bounds,vcpus,pcts,want", CASES, ids=[c[0] for c in CASES])
def test_decisions(name, bounds, vcpus, pcts, want):
    got = feed(Controller(P, bounds), vcpus, pcts)
    assert [(a, n) for a, n, _ in got] == want, got


def test_projected_usage_blocks_a_shrink_from_two_at_45_percent():
    # 2 vCPUs at 45% = 0.9 CPUs busy: on 1 vCPU that is 90%, over grow_above_pct -> flapping
    p = Policy(sustain_s=1, cooldown_s=0, grow_above_pct=80, shrink_below_pct=50)
    got = feed(Controller(p, Bounds(1, 2)), 2, [45, 45, 45])
    assert [a for a, _, _ in got] == ["hold"] * 3
    assert "would be 90%" in got[-1][2]


def test_cooldown_after_applied_blocks_decisions_then_lets_them_through():
    ctl = Controller(P, Bounds(1, 3))
    feed(ctl, 1, [95, 95, 95])
    ctl.applied(3.0)                         # grown to 2 at t=3: quiet until t=8
    got = feed(ctl, 2, [95] * 6, start=3.0)  # t = 4..9
    actions = [(a, n) for a, n, _ in got]
    assert actions[:4] == [("hold", 2)] * 4, got
    assert all("cooling down" in why for _, _, why in got[:4]), got
    assert actions[5] == ("grow", 3), got


def test_reset_by_an_update_forgets_pressure_and_cools_down():
    ctl = Controller(P, Bounds(1, 3))
    feed(ctl, 1, [95, 95])                   # pressure for 1 s of 2
    ctl.reset(Bounds(1, 3), now=2.0)
    got = feed(ctl, 1, [95, 95, 95], start=2.0)
    assert [a for a, _, _ in got] == ["hold"] * 3
    assert "cooling down" in got[-1][2]


def test_every_decision_carries_its_figures():
    ctl = Controller(P, Bounds(1, 3))
    feed(ctl, 1, [95, 95])
    d = ctl.observe(Sample(3, 2850, 150, 1), 1)
    assert d.action == "grow" and d.usage_pct == pytest.approx(95.0)
    assert d.describe() == "grow to 2 vCPU(s): usage 95%, above 80% for 2.0 s"


@pytest.mark.parametrize("prev,cur,online,why", [
    ((0, 1000, 1000), (1, 900, 1100), 1, "went backwards"),
    ((0, 1000, 1000), (1, 5000, 1000), 1, "not believed"),     # 4 s of CPU in 1 s on 1 CPU
    ((0, 1000, 1000), (0, 2000, 1000), 1, "no time passed"),
    ((0, 1000, 1000), (1, 1000, 1000), 1, "no CPU time counted"),
])
def test_hostile_or_broken_counters_give_no_decision(prev, cur, online, why):
    ctl = Controller(P, Bounds(1, 3))
    ctl.observe(Sample(*prev, online), 1)
    d = ctl.observe(Sample(*cur, online), 1)
    assert d.action == "hold" and d.usage_pct is None and why in d.why, d


def test_the_guests_uptime_is_the_time_base_when_it_is_given():
    ctl = Controller(P, Bounds(1, 3))
    ctl.observe(Sample(10.0, 0, 0, 1, uptime_s=100.0), 1)
    # the answers arrived 0.2 s apart on the host, the guest read its counters 1 s apart
    d = ctl.observe(Sample(10.2, 900, 100, 1, uptime_s=101.0), 1)
    assert d.usage_pct == pytest.approx(90.0), d
    d = ctl.observe(Sample(10.4, 1900, 100, 1, uptime_s=101.2), 1)       # 1 s of CPU in 0.2 s
    assert d.usage_pct is None and "not believed" in d.why, d
    d = ctl.observe(Sample(10.6, 2000, 100, 1, uptime_s=50.0), 1)
    assert d.usage_pct is None and "uptime went from" in d.why, d


def test_a_cpu_count_the_shim_did_not_confirm_gives_no_decision():
    ctl = Controller(P, Bounds(1, 3))
    got = feed(ctl, 1, [95, 95, 95, 95], online=2)
    assert [a for a, _, _ in got] == ["hold"] * 4
    assert "guest reports 2 CPU(s) online, the VM has 1" in got[-1][2]


@pytest.mark.parametrize("policy,declared,vm_max,want", [
    (Policy(min_vcpus=1, max_vcpus=None), 1, 4, Bounds(1, 4)),
    (Policy(min_vcpus=1, max_vcpus=2), 1, 4, Bounds(1, 2)),
    (Policy(min_vcpus=2, max_vcpus=3), 1, 4, Bounds(2, 3)),
    (Policy(min_vcpus=1, max_vcpus=2), 3, 4, Bounds(3, 3)),      # declared beats the policy's max
    (Policy(min_vcpus=1, max_vcpus=8), 1, 4, Bounds(1, 4)),      # never past the VM's ceiling
])
def test_bounds(policy, declared, vm_max, want):
    assert Bounds.of(policy, declared, vm_max) == want
