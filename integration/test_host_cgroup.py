"""The host cgroup of a sandbox (shim/vm/hostcgroup.py), through the real containerd and ctr:
QEMU and virtiofsd are in `<parent>/spinbox-<sandbox>`, its limits are the ones derived from
the VM's size (after `ctr run --cpus 2` grew it), it is gone after the task is deleted, and
after a SIGKILLed shim its `delete` removes it too. Also what `ctr task ls` shows as the pid
(the guest's pid: docs/security.md, "Host cgroup and task pids")."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from integration.test_ctr_run import _alive, _cmdline, env, kill_quietly, uid, wait_until  # noqa: F401
from spinbox.shim.vm import hostcgroup as hc

pytestmark = pytest.mark.integration


def _layout() -> hc.Layout:
    layout = hc.detect()
    if isinstance(layout, str):
        pytest.skip(f"no usable host cgroups here: {layout}")
    return layout


def _dirs(layout: hc.Layout, id: str) -> tuple[Path, ...]:
    return layout.dirs(f"{hc.DEFAULT_PARENT.strip('/')}/spinbox-{id}")


def _procs(d: Path) -> list[int]:
    return [int(x) for x in (d / "cgroup.procs").read_text().split()]


def _limits(layout: hc.Layout, dirs: tuple[Path, ...]) -> dict[str, str]:
    return {name: (dirs[i] / name).read_text().strip() for i, name, _ in
            hc.limit_files(layout.version, hc.limits_for(1, 256))}


def test_qemu_and_virtiofsd_are_in_the_sandbox_cgroup_with_its_limits(env):  # noqa: F811
    layout = _layout()
    id = uid("cg")
    env.ctr(*env.run_args("-d", "--cpus", "2"), env.ref, id, "sleep", "1000")
    dirs = _dirs(layout, id)
    try:
        env.wait_status(id, "RUNNING")
        qemu = env.qemu_pids(id)
        assert len(qemu) == 1, qemu
        for d in dirs:
            members = _procs(d)
            names = {os.path.basename(_cmdline(p).split(b"\0")[0]) for p in members}
            assert qemu[0] in members, (d, members)
            assert b"virtiofsd" in names, (d, names)          # the rootfs share
        cg_line = Path(f"/proc/{qemu[0]}/cgroup").read_text()
        assert f"/spinbox/spinbox-{id}" in cg_line, cg_line
        # the VM grew to 2 vCPUs after the restore: the limits followed
        want = {name: value for _, name, value in hc.limit_files(layout.version, hc.limits_for(2, 256))}
        assert _limits(layout, dirs) == want
        # the pid containerd shows is the guest's (sleep is PID 1 of its container: a small pid)
        rows = [r.split() for r in env.ctr("task", "ls").stdout.decode().splitlines()[1:]]
        pid = int(next(r for r in rows if r[0] == id)[1])
        assert pid != qemu[0] and pid not in _procs(dirs[0])
        print("CTR_TASK_LS_PID", pid, "QEMU", qemu[0])
        usage = "memory.max_usage_in_bytes" if layout.version == 1 else "memory.peak"
        with_peak = dirs[0] / usage
        if with_peak.exists():
            print("CGROUP_MEMORY_PEAK_MIB", int(with_peak.read_text()) >> 20, "LIMIT_MIB",
                  hc.limits_for(2, 256).memory_bytes >> 20)
    finally:
        kill_quietly(env, id)
    wait_until(lambda: not any(d.exists() for d in dirs), 60, lambda: f"{dirs} to be removed")


def test_a_killed_shims_cgroup_is_removed_by_delete(env):  # noqa: F811
    layout = _layout()
    id = uid("cgk")
    env.ctr(*env.run_args("-d"), env.ref, id, "sleep", "1000")
    dirs = _dirs(layout, id)
    try:
        env.wait_status(id, "RUNNING")
        shim, qemu = env.shim_pids(id), env.qemu_pids(id)
        assert len(shim) == 1 and len(qemu) == 1, (shim, qemu)
        assert all(qemu[0] in _procs(d) for d in dirs)
        os.kill(shim[0], signal.SIGKILL)
        wait_until(lambda: env.tasks().get(id) in (None, "STOPPED"), 60, "the task to stop")
        r = env.ctr("task", "delete", id, check=False)
        assert r.returncode == 0 or b"not found" in r.stderr, r
        env.ctr("containers", "delete", id)
        wait_until(lambda: not _alive(qemu[0]) and not any(d.exists() for d in dirs), 30,
                   lambda: f"QEMU killed and {dirs} removed")
    finally:
        if id in env.tasks():
            kill_quietly(env, id)
