"""The test-only hostile agent (vminitd/hostile.py): off unless asked, and it does what it says."""
from __future__ import annotations

import asyncio

from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import events_pb2 as epb
from spinbox.vminitd import hostile
from spinbox.vminitd.events import EventLog
from spinbox.vminitd.main import _hostile_wrap


def test_modes_come_only_from_the_command_line_and_unknown_ones_are_ignored(caplog):
    assert _hostile_wrap({"spinbox.oci_runtime": "runc"}) is None
    assert hostile.modes({"spinbox.hostile": "oom-flood,bogus,reply-lies"}) == {"oom-flood", "reply-lies"}
    assert "bogus" in caplog.text
    impls = {"Containers": object(), "Events": object(), "Stdio": object()}
    assert hostile.wrap(impls, None, frozenset()) is impls


class _Containers:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Pids(self, req):
        return cpb.PidsResponse(processes=[cpb.ProcessInfo(pid=7)])

    async def Start(self, req):
        return cpb.StartResponse(pid=42)

    async def Kill(self, req):          # not overridden: delegated
        self.calls.append("Kill")
        return cpb.Empty()


class _Agent:
    def __init__(self) -> None:
        self.events = EventLog()


async def test_the_wrapped_servicers_lie_and_delegate_the_rest():
    agent = _Agent()
    inner = _Containers()
    c = hostile.HostileContainers(inner, agent, frozenset({"reply-lies", "event-lies"}))
    r = await c.Pids(cpb.PidsRequest(id="a"))
    assert len(r.processes) == 1 + hostile.PID_LIES
    await c.Start(cpb.StartRequest(id="a"))
    evs, _ = agent.events.since(0)
    assert {(e.kind, e.fields.get("id")) for e in evs} >= {("exit", "ghost"), ("exit", "a"), ("oom", "ghost")}
    assert any(e.fields.get("pid") == hostile.UINT32_MAX for e in evs)
    await c.Kill(cpb.KillRequest(id="a"))
    assert inner.calls == ["Kill"]


async def test_event_lies_replay_each_event_with_an_older_seq():
    class _Events:
        async def Subscribe(self, req):
            for seq in (1, 2, 3):
                yield epb.Event(seq=seq, oom=epb.OomEvent(id="a"))

    got = [m async for m in hostile.HostileEvents(_Events(), frozenset({"event-lies"})).Subscribe(None)]
    assert [(m.seq, m.gap) for m in got] == [(1, False), (2, False), (1, True), (3, False), (2, True)]


async def test_an_oom_flood_publishes_for_the_container_and_for_ghosts(monkeypatch):
    monkeypatch.setattr(hostile, "FLOOD_S", 0.05)
    agent = _Agent()
    c = hostile.HostileContainers(_Containers(), agent, frozenset({"oom-flood"}))
    await c._oom_flood("a")
    evs, gap = agent.events.since(0)
    ids = {e.fields["id"] for e in evs}
    assert "a" in ids and any(i.startswith("ghost-") for i in ids)
    assert agent.events.last_seq >= hostile.FLOOD_BATCH
    await asyncio.sleep(0)
