"""The guest's CPU time for the vCPU controller: vminitd reads /proc/stat, the shim's agent
client bounds what it gets back (System.Info)."""
from __future__ import annotations

import os

import pytest

from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import system_pb2 as sypb
from spinbox.shim.agent import AgentProtocolError
from spinbox.vminitd import system
from tests.unit.test_shim_agent import Y, connect, guest  # noqa: F401

STAT = """cpu  100 5 20 900 30 1 2 3 0 0
cpu0 100 5 20 900 30 1 2 3 0 0
intr 12345
"""


def test_busy_and_idle_from_the_aggregate_line():
    tick_ms = 1000 // os.sysconf("SC_CLK_TCK")
    # busy = user 100 + nice 5 + system 20 + irq 1 + softirq 2 + steal 3; idle = 900 + iowait 30
    assert system.cpu_times_ms(STAT) == (131 * tick_ms, 930 * tick_ms)


def test_an_old_kernel_line_without_steal_and_no_line_at_all():
    tick_ms = 1000 // os.sysconf("SC_CLK_TCK")
    assert system.cpu_times_ms("cpu 1 2 3 4\n") == (6 * tick_ms, 4 * tick_ms)
    assert system.cpu_times_ms("intr 1\n") == (0, 0)


def test_this_hosts_counters_move_forward():
    a = system.cpu_times_ms()
    sum(range(2_000_000))
    b = system.cpu_times_ms()
    assert b[0] >= a[0] > 0 and b[1] >= a[1]


@pytest.mark.parametrize("busy,idle,ok", [(5, 7, True), (1 << 60, 0, False), (0, 1 << 60, False)])
async def test_the_client_bounds_the_guests_figures(guest, busy, idle, ok):  # noqa: F811
    async def info(req, ctx):
        return sypb.InfoResponse(kernel="6.1", cpus_online=1, cpus_present=1, memory_total_bytes=2,
                                 memory_available_bytes=1, uptime_s=1.0, cpu_busy_ms=busy, cpu_idle_ms=idle)
    guest.unary(Y, "Info", info, cpb.Empty)
    agent = await connect(guest)
    try:
        if ok:
            i = await agent.info()
            assert (i.cpu_busy_ms, i.cpu_idle_ms) == (busy, idle)
        else:
            with pytest.raises(AgentProtocolError, match="cpu time"):
                await agent.info()
    finally:
        await agent.close()
