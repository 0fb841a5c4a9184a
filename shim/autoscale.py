"""When to add or remove a vCPU from guest CPU usage: pure logic, no I/O (docs/sizing.md).

    ctl = Controller(policy, Bounds(floor, ceiling))
    d = ctl.observe(sample, vcpus)        # a Decision: grow / shrink / hold, with its figures
    ctl.applied(now, confirmed_vcpus)     # after a resize: the cool-down starts
    ctl.reset(bounds, now)                # an explicit Update: new bounds, timers start over

Usage is the guest's busy share of all its online CPUs between two samples (/proc/stat ticks,
reported by the agent's Info). A vCPU is added when usage stayed above `grow_above_pct` for
`sustain_s`, removed when it stayed below `shrink_below_pct` for `sustain_s` *and* the same
work on one vCPU fewer would still be under `grow_above_pct` (so a shrink never causes the
next grow). After any change nothing is decided for `cooldown_s`. One vCPU per step.

Samples come from the guest: counters that go backwards, jump beyond what the CPUs could have
done, or a count of CPUs the shim did not confirm, give no decision (`hold`, with why).
"""
from __future__ import annotations

from dataclasses import dataclass

# /proc/stat can count a tick or two more than wall time (rounding at each CPU); beyond this
# share of the interval a sample is not believed.
_SLACK = 1.25


@dataclass(frozen=True)
class Policy:
    interval_s: float = 5.0
    grow_above_pct: float = 80.0
    shrink_below_pct: float = 30.0
    sustain_s: float = 30.0
    cooldown_s: float = 60.0
    min_vcpus: int = 1
    max_vcpus: int | None = None      # None: the VM's ceiling (cpu_hotplug.max_vcpus)


@dataclass(frozen=True)
class Bounds:
    """vCPUs the controller may choose between: `floor` is what the workload declared (its
    size at create or its last Update, at least `min_vcpus`), `ceiling` the policy's max_vcpus
    clipped to the VM's hot-plug ceiling."""
    floor: int
    ceiling: int

    @classmethod
    def of(cls, policy: Policy, declared_vcpus: int, vm_max_vcpus: int) -> Bounds:
        ceiling = min(policy.max_vcpus or vm_max_vcpus, vm_max_vcpus)
        floor = min(max(declared_vcpus, policy.min_vcpus), vm_max_vcpus)
        return cls(floor, max(floor, ceiling))


@dataclass(frozen=True)
class Sample:
    """One reading of the guest: monotonic host time of the answer, cumulative busy and idle
    CPU time over all its CPUs (ms), how many CPUs it says are online, and its uptime when it
    read them (the time base of the plausibility check: the host's time of the answers jitters
    with the guest's scheduling and the host's load, by more than a short interval)."""
    at: float
    busy_ms: int
    idle_ms: int
    online: int
    uptime_s: float | None = None


@dataclass(frozen=True)
class Decision:
    action: str             # "grow", "shrink", "hold"
    vcpus: int              # the vCPU count wanted (the current one for hold)
    usage_pct: float | None
    why: str

    def describe(self) -> str:
        pct = f"{self.usage_pct:.0f}%" if self.usage_pct is not None else "n/a"
        return f"{self.action} to {self.vcpus} vCPU(s): usage {pct}, {self.why}"


class Controller:
    def __init__(self, policy: Policy, bounds: Bounds) -> None:
        self.policy = policy
        self.bounds = bounds
        self._last: Sample | None = None
        self._above_since: float | None = None
        self._below_since: float | None = None
        self._quiet_until = float("-inf")

    def reset(self, bounds: Bounds, now: float) -> None:
        """An explicit size (Create, Update) wins: new bounds, the pressure seen so far is
        forgotten and the cool-down starts, so the controller never undoes an Update at once."""
        self.bounds = bounds
        self._above_since = self._below_since = None
        self._quiet_until = now + self.policy.cooldown_s

    def applied(self, now: float) -> None:
        """The controller's own resize was done (or failed): cool down, measure afresh."""
        self._above_since = self._below_since = None
        self._quiet_until = now + self.policy.cooldown_s
        self._last = None

    def _hold(self, vcpus: int, pct: float | None, why: str) -> Decision:
        return Decision("hold", vcpus, pct, why)

    def usage(self, s: Sample) -> tuple[float | None, str]:
        """Busy share since the previous sample, or None and why there is no figure."""
        prev, self._last = self._last, s
        if prev is None:
            return None, "first sample"
        dt = s.at - prev.at
        busy, idle = s.busy_ms - prev.busy_ms, s.idle_ms - prev.idle_ms
        if dt <= 0:
            return None, "no time passed"
        if busy < 0 or idle < 0:
            return None, f"guest counters went backwards (busy {busy:+d} ms, idle {idle:+d} ms)"
        span = dt
        if s.uptime_s is not None and prev.uptime_s is not None:
            span = s.uptime_s - prev.uptime_s
            if span <= 0:
                return None, f"guest uptime went from {prev.uptime_s:.2f} s to {s.uptime_s:.2f} s"
        possible = span * 1000 * max(s.online, prev.online) * _SLACK + 20     # + a tick or two
        if busy + idle > possible:
            return None, (f"guest counted {busy + idle} ms of CPU time in {span:.2f} s on "
                          f"{s.online} CPU(s): not believed")
        if busy + idle == 0:
            return None, "no CPU time counted"
        return 100.0 * busy / (busy + idle), ""

    def observe(self, s: Sample, vcpus: int) -> Decision:
        """`vcpus`: the count the shim confirmed (the resizer's)."""
        p, b = self.policy, self.bounds
        pct, why = self.usage(s)
        if s.online != vcpus:
            self._above_since = self._below_since = None
            self._last = None
            return self._hold(vcpus, pct, f"guest reports {s.online} CPU(s) online, the VM has {vcpus}")
        if pct is None:
            return self._hold(vcpus, None, why)
        if vcpus < b.floor:
            return Decision("grow", b.floor, pct, f"below the floor {b.floor}")
        if vcpus > b.ceiling:
            return Decision("shrink", b.ceiling, pct, f"above the ceiling {b.ceiling}")
        if pct > p.grow_above_pct:
            self._below_since = None
            self._above_since = s.at if self._above_since is None else self._above_since
        elif pct < p.shrink_below_pct:
            self._above_since = None
            self._below_since = s.at if self._below_since is None else self._below_since
        else:
            self._above_since = self._below_since = None
            return self._hold(vcpus, pct, f"within {p.shrink_below_pct:.0f}..{p.grow_above_pct:.0f}%")
        if s.at < self._quiet_until:
            return self._hold(vcpus, pct, f"cooling down ({self._quiet_until - s.at:.1f} s left)")
        if self._above_since is not None:
            held = s.at - self._above_since
            if held < p.sustain_s:
                return self._hold(vcpus, pct, f"above {p.grow_above_pct:.0f}% for {held:.1f} s "
                                              f"of {p.sustain_s:.0f} s")
            if vcpus >= b.ceiling:
                return self._hold(vcpus, pct, f"above {p.grow_above_pct:.0f}% for {held:.1f} s, "
                                              f"at the ceiling {b.ceiling}")
            return Decision("grow", vcpus + 1, pct, f"above {p.grow_above_pct:.0f}% for {held:.1f} s")
        assert self._below_since is not None
        held = s.at - self._below_since
        if held < p.sustain_s:
            return self._hold(vcpus, pct, f"below {p.shrink_below_pct:.0f}% for {held:.1f} s "
                                          f"of {p.sustain_s:.0f} s")
        if vcpus <= b.floor:
            return self._hold(vcpus, pct, f"below {p.shrink_below_pct:.0f}% for {held:.1f} s, "
                                          f"at the floor {b.floor}")
        projected = pct * vcpus / (vcpus - 1)
        if projected >= p.grow_above_pct:
            return self._hold(vcpus, pct, f"on {vcpus - 1} vCPU(s) usage would be {projected:.0f}%, "
                                          f"over {p.grow_above_pct:.0f}%")
        return Decision("shrink", vcpus - 1, pct, f"below {p.shrink_below_pct:.0f}% for {held:.1f} s")
