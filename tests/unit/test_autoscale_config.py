"""The autoscale config section: off by default, every bad value refused naming its key."""
from __future__ import annotations

import pytest

from spinbox.shim import config as c


def test_off_by_default_with_the_documented_defaults():
    a = c.from_dict({}).autoscale
    assert (a.enabled, a.interval_s, a.grow_above_pct, a.shrink_below_pct, a.sustain_s, a.cooldown_s,
            a.min_vcpus, a.max_vcpus) == (False, 5.0, 80.0, 30.0, 30.0, 60.0, 1, None)


@pytest.mark.parametrize("data, message", [
    ({"autoscale": {"enabled": "yes"}}, "autoscale.enabled: must be true or false"),
    ({"autoscale": {"interval_s": 0.1}}, "autoscale.interval_s: must be >= 0.2"),
    ({"autoscale": {"grow_above_pct": 101}}, "autoscale.grow_above_pct: must be <= 100"),
    ({"autoscale": {"grow_above_pct": 50, "shrink_below_pct": 50}},
     "autoscale.shrink_below_pct: must be below grow_above_pct (50) (got 50)"),
    ({"autoscale": {"min_vcpus": 3, "max_vcpus": 2}}, "autoscale.max_vcpus: must be >= min_vcpus (3) (got 2)"),
    ({"autoscale": {"max_vcpus": 5}}, "autoscale.max_vcpus: must be <= cpu_hotplug.max_vcpus (4) (got 5)"),
    ({"autoscale": {"min_vcpus": 5}}, "autoscale.min_vcpus: must be <= cpu_hotplug.max_vcpus (4) (got 5)"),
    ({"autoscale": {"enabled": True}, "runtime": {"machine": "microvm"}},
     "autoscale.enabled: the VM cannot change its vCPUs (cpu_hotplug.max_vcpus = vcpus = 1, runtime.machine microvm)"),
    ({"autoscale": {"enabled": True}, "cpu_hotplug": {"vcpus": 2, "max_vcpus": 2}},
     "autoscale.enabled: the VM cannot change its vCPUs"),
    ({"autoscale": {"step": 2}}, "autoscale.step: unknown key"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(c.ConfigError) as ei:
        c.from_dict(data)
    assert message in str(ei.value)


def test_a_disabled_controller_may_keep_settings_a_microvm_could_not_use():
    cfg = c.from_dict({"runtime": {"machine": "microvm"}, "autoscale": {"enabled": False}})
    assert not cfg.autoscale.enabled
