"""shim.autoscaler.policy_of: every key of the config section reaches the controller's Policy."""
from __future__ import annotations

import dataclasses

from spinbox.shim import config as c
from spinbox.shim.autoscale import Policy
from spinbox.shim.autoscaler import policy_of


def test_every_tuning_key_reaches_the_policy():
    cfg = c.from_dict({"autoscale": {"enabled": True, "interval_s": 0.5, "grow_above_pct": 70,
                                     "shrink_below_pct": 20, "sustain_s": 2, "cooldown_s": 3,
                                     "min_vcpus": 2, "max_vcpus": 3}})
    assert policy_of(cfg.autoscale) == Policy(0.5, 70.0, 20.0, 2.0, 3.0, 2, 3)
    # the section has exactly the policy's keys plus `enabled`
    assert {f.name for f in dataclasses.fields(c.AutoscaleConfig)} == \
        {f.name for f in dataclasses.fields(Policy)} | {"enabled"}
