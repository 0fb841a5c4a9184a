"""After an event gap the follower asks the guest for the state of each live process; a
"stopped" answer naming another pid is not this process's exit (the exit-event path refuses
the same mismatch). Found by the fuzz target `events`: the lying guest's pid was published
as the process's exit pid."""
from __future__ import annotations

import asyncio

import pytest

from spinbox.shim import exits
from spinbox.shim.agent.records import ProcessState
from spinbox.shim.process import Container, StdioPaths


async def _reconcile_with_answer(pid_in_answer: int) -> list:
    published: list = []

    async def publish_exit(p, info):
        published.append((p.name, info.pid, info.status))

    c = Container("c1", "/nonexistent", StdioPaths())
    c.sequencer = exits.ExitSequencer(publish_exit, container=c)
    c.init.started(100)
    c.init.start_published.set()

    async def query_state(id: str, exec_id: str) -> ProcessState:
        return ProcessState(id, exec_id, pid_in_answer, 3, False, 7, 10**18, False, False, False)

    async def on_oom(cid: str) -> None:
        pass

    follower = exits.GuestEventFollower({"c1": c}, on_oom, lambda: False, query_state=query_state)
    await follower.reconcile()
    await asyncio.wait_for(c.sequencer.flush(), 5)
    return published


@pytest.mark.parametrize("answer_pid", [100, 0])
async def test_a_stopped_state_of_the_process_reports_its_exit(answer_pid):
    assert await _reconcile_with_answer(answer_pid) == [("c1", 100, 7)]


async def test_a_stopped_state_naming_another_pid_is_not_this_process_exit():
    assert await _reconcile_with_answer(7) == []
