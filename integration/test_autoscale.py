"""The vCPU controller (autoscale.*, docs/sizing.md) through the real containerd 1.6 and ctr,
with short thresholds (grow above 50%: a busy loop on a TCG guest of a loaded host read
70-96%): a container's busy loop on the VM's one vCPU makes the shim add a vCPU,
and when the loop ends it removes it again. Seen three ways: the guest's nproc, QEMU's vCPU
threads (integration/test_vm_sizing.qemu_vcpu_threads), and the shim's decision lines with the
figures behind them.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from integration.test_ctr_run import _log_lines, env, kill_quietly, uid, wait_until  # noqa: F401
from integration.test_vm_sizing import qemu_vcpu_threads

pytestmark = pytest.mark.integration

POLICY = {"enabled": True, "interval_s": 0.5, "grow_above_pct": 50, "shrink_below_pct": 20,
          "sustain_s": 2, "cooldown_s": 3, "max_vcpus": 2}
DECISION = re.compile(r"autoscale: (?P<action>grow|shrink) to (?P<n>\d+) vCPU\(s\): usage (?P<pct>\d+)%, "
                      r"(?P<why>.+)")
DONE = re.compile(r"autoscale: (?P<action>grow|shrink) to (?P<n>\d+) vCPU\(s\) done in (?P<s>[\d.]+) s")


def _nproc(env, id: str, n: int) -> int:  # noqa: F811
    r = env.ctr("task", "exec", "--exec-id", f"np{n}", id, "nproc", check=False, timeout=120)
    assert r.returncode == 0, r
    return int(r.stdout.decode().strip())


def _lines(env, id: str, rx: re.Pattern[str]) -> list[re.Match[str]]:  # noqa: F811
    return [m for ln in _log_lines(env, f"sandbox {id}: autoscale:") if (m := rx.search(ln))]


def test_a_busy_loop_gets_a_vcpu_and_gives_it_back(env):  # noqa: F811
    id = uid("as")
    opts = env.work / f"autoscale-{id}.json"
    opts.write_text(json.dumps({"autoscale": POLICY}))
    env.ctr(*env.run_args("-d", "--runtime-config-path", str(opts)), env.ref, id,
            "sh", "-c", "while [ ! -e /tmp/stop ]; do :; done; exec sleep 3600")
    try:
        env.wait_status(id, "RUNNING")
        t_busy = time.monotonic()
        qemu = env.qemu_pids(id)
        assert len(qemu) == 1, qemu
        assert _log_lines(env, f"sandbox {id}: autoscale on: 1..2 vCPU(s)"), "the controller says its bounds"

        try:
            wait_until(lambda: qemu_vcpu_threads(qemu[0]) == 2, 120, "the controller to add a vCPU")
        except AssertionError:
            print("\n".join(_log_lines(env, f"sandbox {id}: autoscale")[-40:]))
            raise
        grow_s = time.monotonic() - t_busy
        wait_until(lambda: _lines(env, id, DONE), 30, "the grow's done line")
        grow = [m for m in _lines(env, id, DECISION) if m["action"] == "grow"]
        assert len(grow) == 1 and grow[0]["n"] == "2", [m.group(0) for m in grow]
        assert int(grow[0]["pct"]) >= 50 and "above 50% for" in grow[0]["why"], grow[0].group(0)
        assert _nproc(env, id, 1) == 2
        print("\n".join(ln.split("autoscale: ", 1)[-1] for ln in _log_lines(env, f"sandbox {id}: autoscale")[:25]))
        print(f"AUTOSCALE grow: 2 vCPUs {grow_s:.1f} s after the loop started; {grow[0].group(0)}; "
              f"{_lines(env, id, DONE)[0].group(0)}")

        # one loop on two vCPUs is ~50%: at the ceiling and above shrink_below_pct, so it stays
        time.sleep(POLICY["sustain_s"] + POLICY["cooldown_s"] + 1)
        assert qemu_vcpu_threads(qemu[0]) == 2
        assert not [m for m in _lines(env, id, DECISION) if m["action"] == "shrink"]

        r = env.ctr("task", "exec", "--exec-id", "stop", id, "touch", "/tmp/stop", check=False, timeout=120)
        assert r.returncode == 0, r
        t_idle = time.monotonic()
        wait_until(lambda: [m for m in _lines(env, id, DONE) if m["action"] == "shrink"], 120,
                   "the controller to remove the vCPU")
        shrink_s = time.monotonic() - t_idle
        # TCG: parked (offline in the guest, QEMU keeps the device: unplug is unsafe, shim.resize)
        parked = _log_lines(env, "parked (offline in the guest")
        assert qemu_vcpu_threads(qemu[0]) == (2 if parked else 1), parked
        shrink = [m for m in _lines(env, id, DECISION) if m["action"] == "shrink"]
        assert len(shrink) == 1 and shrink[0]["n"] == "1", [m.group(0) for m in shrink]
        assert int(shrink[0]["pct"]) <= 20 and "below 20% for" in shrink[0]["why"], shrink[0].group(0)
        assert _nproc(env, id, 2) == 1
        done = [m for m in _lines(env, id, DONE) if m["action"] == "shrink"][0]
        print(f"AUTOSCALE shrink: 1 vCPU {shrink_s:.1f} s after the loop ended; {shrink[0].group(0)}; "
              f"{done.group(0)}")
        # the container ran through both
        r = env.ctr("task", "exec", "--exec-id", "alive", id, "echo", "alive", check=False, timeout=120)
        assert (r.returncode, r.stdout) == (0, b"alive\n"), r
    finally:
        kill_quietly(env, id)


def test_off_by_default(env):  # noqa: F811
    """No autoscale section: no controller, the VM keeps its size under load."""
    id = uid("noas")
    env.ctr(*env.run_args("-d"), env.ref, id, "sh", "-c", "while :; do :; done")
    try:
        env.wait_status(id, "RUNNING")
        qemu = env.qemu_pids(id)
        time.sleep(4)
        assert qemu_vcpu_threads(qemu[0]) == 1
        assert not _log_lines(env, f"sandbox {id}: autoscale")
    finally:
        kill_quietly(env, id)
