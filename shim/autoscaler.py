"""The vCPU controller's loop for one sandbox (autoscale.enabled; docs/sizing.md).

Every `interval_s` it asks the guest for its CPU time (agent System.Info: /proc/stat busy and
idle ms, one file read in the guest), and under the resizer's lock (the one Create and Update
resize under, so the two never race) feeds shim.autoscale's Controller and applies a grow or
shrink of one vCPU through `apply` (VMSandbox's resize: host cgroup limits follow). An explicit
size (Create, Update) calls `declared()`, which makes it the controller's floor and starts the
cool-down. Memory is not scaled: growing it needs no controller (Update does it), and
usage-driven shrinking of guest memory cannot be told apart from a page cache worth keeping.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from .agent import AgentClient
from .autoscale import Bounds, Controller, Policy, Sample
from .ratelimit import LogThrottle
from .resize import VMResizer
from .sizing import Size

log = logging.getLogger(__name__)
_throttle = LogThrottle(log)


def policy_of(cfg: object) -> Policy:
    """The config section (shim.config.AutoscaleConfig) as the controller's Policy."""
    return Policy(**{k: getattr(cfg, k) for k in ("interval_s", "grow_above_pct", "shrink_below_pct",
                                                  "sustain_s", "cooldown_s", "min_vcpus", "max_vcpus")})


class VCPUAutoscaler:
    def __init__(self, name: str, policy: Policy, resizer: VMResizer, agent: AgentClient,
                 apply: Callable[[Size], Awaitable[Size]], *, vm_max_vcpus: int,
                 call_timeout: float = 5.0) -> None:
        self.name = name
        self.policy = policy
        self.resizer = resizer
        self.agent = agent
        self._apply = apply                   # called with resizer.lock held
        self.vm_max_vcpus = vm_max_vcpus
        self.call_timeout = call_timeout
        self.ctl = Controller(policy, Bounds.of(policy, resizer.size.vcpus, vm_max_vcpus))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
            log.info("sandbox %s: autoscale on: %s..%s vCPU(s), grow above %.0f%%, shrink below %.0f%% "
                     "(sustained %.0f s, cool-down %.0f s, every %.1f s)", self.name, self.ctl.bounds.floor,
                     self.ctl.bounds.ceiling, self.policy.grow_above_pct, self.policy.shrink_below_pct,
                     self.policy.sustain_s, self.policy.cooldown_s, self.policy.interval_s)

    async def stop(self) -> None:
        t, self._task = self._task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def declared(self, size: Size) -> None:
        """Create or Update sized the VM (the caller holds resizer.lock): new floor, timers anew."""
        bounds = Bounds.of(self.policy, size.vcpus, self.vm_max_vcpus)
        self.ctl.reset(bounds, time.monotonic())
        log.info("sandbox %s: autoscale: bounds %d..%d vCPU(s) after an explicit size of %s, cooling down "
                 "%.0f s", self.name, bounds.floor, bounds.ceiling, size.describe(), self.policy.cooldown_s)

    async def _sample(self) -> Sample | None:
        try:
            i = await self.agent.info(timeout=self.call_timeout)
        except Exception as e:
            _throttle.warning("autoscale-info", "sandbox %s: autoscale: reading the guest's CPU time: %s",
                              self.name, e)
            return None
        return Sample(time.monotonic(), i.cpu_busy_ms, i.cpu_idle_ms, i.cpus_online, i.uptime_s)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval_s)
            s = await self._sample()
            if s is not None:
                await self.step(s)

    async def step(self, s: Sample) -> None:
        async with self.resizer.lock:
            have = self.resizer.size
            d = self.ctl.observe(s, have.vcpus)
            if d.action == "hold":
                log.debug("sandbox %s: autoscale: %s", self.name, d.describe())
                return
            log.info("sandbox %s: autoscale: %s", self.name, d.describe())
            t = time.monotonic()
            try:
                got = await self._apply(Size(d.vcpus, have.memory_mb))
            except Exception as e:
                log.warning("sandbox %s: autoscale: %s failed after %.2f s: %s (keeping %s)", self.name,
                            d.action, time.monotonic() - t, e, self.resizer.size.describe())
            else:
                verdict = "done" if got.vcpus == d.vcpus else f"the guest kept {got.vcpus}"
                log.info("sandbox %s: autoscale: %s to %d vCPU(s) %s in %.2f s (confirmed by the guest)",
                         self.name, d.action, d.vcpus, verdict, time.monotonic() - t)
            self.ctl.applied(time.monotonic())
