"""`spinbox monitor` end to end: two sandboxes (real ctr, a private containerd, QEMU under
TCG), the monitor started on a free port over that containerd's spinbox state dir, scraped over
HTTP, and `ctr task metrics` showing the VM mapping of Stats.

Proven: both sandboxes are there with their own figures (vCPUs >= 1, memory > 0, a start time,
guest memory used, agent calls, inits started), the hot-plugged size of the one sized by
`--cpus 2 --memory-limit`, exec output counted in stdio bytes, a shim that stops answering
(SIGSTOPped) is `up 0` with a failure counted while the scrape stays within its bound and the
other sandbox is still reported, and `ctr task metrics` of the sized sandbox reports the VM's
memory (512 MiB: base 256 + 256 plugged) as memory.usage_limit, not the container's 256 MiB.
Nothing is left afterwards (the ctr suite's leak check, whose environment this reuses).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

# the ctr suite's session environment (private containerd, busybox, its leak check at the end)
from integration.test_ctr_run import SHIM_BIN_DIR, Env, env, kill_quietly, uid, wait_until  # noqa: F401

pytestmark = pytest.mark.integration

MiB = 1 << 20
SHIM_TIMEOUT_S = 2.0
SPINBOX = SHIM_BIN_DIR / "spinbox"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Monitor:
    def __init__(self, state_dir: Path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [str(SPINBOX), "monitor", "--listen", f"127.0.0.1:{self.port}", "--state-dir", str(state_dir),
             "--shim-timeout", str(SHIM_TIMEOUT_S)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_serving(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"monitor exited: {self.proc.stderr.read()!r}"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(up, 30, "the monitor to listen")

    def scrape(self) -> tuple[dict[tuple[str, frozenset], float], float]:
        t = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        took = time.monotonic() - t
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out, took

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def value(m: dict, name: str, sandbox: str, ns: str, **labels: str) -> float:
    key = (name, frozenset({"namespace": ns, "sandbox": sandbox, **labels}.items()))
    assert key in m, f"{name}{{sandbox={sandbox}, {labels}}} missing; have: " + \
        ", ".join(sorted({k[0] for k in m}))
    return m[key]


def one(m: dict, name: str, sandbox: str) -> float:
    """The one sample of `name` for the sandbox, whatever its other labels (the start kind)."""
    found = [v for (n, labels), v in m.items() if n == name and ("sandbox", sandbox) in labels]
    assert len(found) == 1, f"{name} of {sandbox}: {found}"
    return found[0]


def ctr_metrics(e: Env, id: str) -> dict[str, int]:
    out = e.ctr("task", "metrics", id).stdout.decode()
    return {k: int(v) for k, v in re.findall(r"^(\S+)\s+(\d+)\s*$", out, re.M)}


def test_monitor_reports_each_sandbox_and_stats_map_the_vm(env):  # noqa: F811
    a, b = uid("mon-a"), uid("mon-b")
    ns = env.c.namespace
    mon = Monitor(env.state_dir)
    stopped: list[int] = []
    try:
        env.ctr(*env.run_args("-d"), env.ref, a, "sleep", "1000")
        env.ctr(*env.run_args("-d", "--cpus", "2", "--memory-limit", str(256 * MiB)), env.ref, b, "sleep", "1000")
        env.wait_status(a, "RUNNING")
        env.wait_status(b, "RUNNING")
        r = env.ctr("task", "exec", "--exec-id", "e-out", a, "echo", "monitored")
        assert r.stdout == b"monitored\n"
        mon.wait_serving()

        m, took = mon.scrape()
        for sb in (a, b):
            assert value(m, "spinbox_shim_up", sb, ns) == 1
            assert value(m, "spinbox_shim_scrape_failures_total", sb, ns) == 0
            assert value(m, "spinbox_sandbox_vcpus", sb, ns) >= 1
            assert value(m, "spinbox_sandbox_memory_bytes", sb, ns) > 0
            assert one(m, "spinbox_sandbox_start_seconds", sb) > 0
            assert value(m, "spinbox_sandbox_guest_up", sb, ns) == 1
            assert 0 < value(m, "spinbox_sandbox_guest_memory_used_bytes", sb, ns) \
                < value(m, "spinbox_sandbox_guest_memory_total_bytes", sb, ns)
            assert value(m, "spinbox_sandbox_vm_rss_bytes", sb, ns) > 16 * MiB
            assert value(m, "spinbox_sandbox_vm_cpu_seconds_total", sb, ns, mode="user") > 0
            assert value(m, "spinbox_sandbox_guest_cpu_seconds_total", sb, ns, mode="busy") > 0
            assert value(m, "spinbox_sandbox_tasks_started_total", sb, ns) == 1
            assert value(m, "spinbox_sandbox_containers", sb, ns) == 1
            assert value(m, "spinbox_sandbox_agent_calls_total", sb, ns, method="Create") >= 1
            assert value(m, "spinbox_sandbox_agent_call_seconds_count", sb, ns, method="Create") >= 1
            assert value(m, "spinbox_sandbox_lost", sb, ns) == 0
        # the sized sandbox: 2 vCPUs and 256 + 256 MiB, the plugged part shown as such
        assert value(m, "spinbox_sandbox_vcpus", b, ns) == 2
        assert value(m, "spinbox_sandbox_hotplugged_vcpus", b, ns) == 1
        assert value(m, "spinbox_sandbox_memory_bytes", b, ns) == 512 * MiB
        assert value(m, "spinbox_sandbox_hotplugged_memory_bytes", b, ns) == 256 * MiB
        assert value(m, "spinbox_sandbox_hotplugged_vcpus", a, ns) == 0
        # the exec: one exec started, its 10 bytes of output counted
        assert value(m, "spinbox_sandbox_execs_started_total", a, ns) == 1
        assert value(m, "spinbox_sandbox_stdio_bytes_total", a, ns, direction="out") >= len(b"monitored\n")
        assert value(m, "spinbox_sandbox_execs_started_total", b, ns) == 0
        print(f"scrape of 2 sandboxes: {took:.2f} s; start {one(m, 'spinbox_sandbox_start_seconds', a):.2f} s"
              f" / {one(m, 'spinbox_sandbox_start_seconds', b):.2f} s; "
              f"Info {value(m, 'spinbox_sandbox_agent_call_seconds_sum', a, ns, method='Info'):.4f} s")

        # ctr task metrics: the sandbox's own task reports the VM
        cm = ctr_metrics(env, b)
        assert cm["memory.usage_limit"] == 512 * MiB, cm       # the VM's memory, not the container's 256
        assert 0 < cm["memory.usage"] < 512 * MiB, cm          # the guest's used memory
        assert cm["cpu.usage_usec"] > 0 and cm["pids.current"] >= 1, cm    # the guest's busy time
        ca = ctr_metrics(env, a)
        assert ca["memory.usage_limit"] == int(value(m, "spinbox_sandbox_memory_bytes", a, ns)), ca

        # a shim that stops answering: up 0 and a failure, within the bound; the other still there
        [shim_b] = env.shim_pids(b)
        os.kill(shim_b, signal.SIGSTOP)
        stopped.append(shim_b)
        m, took = mon.scrape()
        assert took < SHIM_TIMEOUT_S + 3, f"the scrape took {took:.1f} s with a stopped shim"
        print(f"scrape with a stopped shim: {took:.2f} s (bound {SHIM_TIMEOUT_S:g} s)")
        assert value(m, "spinbox_shim_up", b, ns) == 0
        assert value(m, "spinbox_shim_scrape_failures_total", b, ns) == 1
        assert value(m, "spinbox_shim_up", a, ns) == 1
        assert value(m, "spinbox_sandbox_vcpus", a, ns) >= 1
        os.kill(shim_b, signal.SIGCONT)
        stopped.remove(shim_b)
        m, _ = mon.scrape()
        assert value(m, "spinbox_shim_up", b, ns) == 1
        assert value(m, "spinbox_shim_scrape_failures_total", b, ns) == 1
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        mon.stop()
        for id in (a, b):
            kill_quietly(env, id)
    # gone sandboxes leave the scrape
    mon2 = Monitor(env.state_dir)
    try:
        mon2.wait_serving()
        wait_until(lambda: not any(k[0] == "spinbox_shim_up" for k in mon2.scrape()[0]), 30,
                   "the deleted sandboxes to leave the scrape")
    finally:
        mon2.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
