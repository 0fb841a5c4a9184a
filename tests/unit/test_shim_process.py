"""Host-side process state machine (shim/process.py, shim/states.py) and exit ordering
(shim/exits.py)."""
from __future__ import annotations

import asyncio

import pytest

from spinbox.shim import errors
from spinbox.shim.exits import ExitSequencer
from spinbox.shim.process import Container, ExitInfo, Process, Status, StdioPaths, signal_exit_status


def test_exit_status_of_a_signal():
    assert signal_exit_status(9) == 137
    assert signal_exit_status(15) == 143


def test_init_lifecycle_and_errors():
    c = Container("c1", "/b", StdioPaths())
    p = c.init
    assert p.status == Status.CREATED and p.event_id == "c1"
    p.check("start")
    p.check("delete")                      # created may be deleted
    p.started(42)
    assert p.status == Status.RUNNING and p.pid == 42
    with pytest.raises(errors.FailedPrecondition):
        p.check("start")                   # twice
    with pytest.raises(errors.FailedPrecondition):
        p.check("delete")                  # running
    p.check("kill")
    p.set_exited(ExitInfo(42, 7, 1))
    assert p.status == Status.STOPPED and p.exit.status == 7
    with pytest.raises(errors.NotFound, match="process already finished"):
        p.check("kill")
    p.check("delete")
    p.mark_deleted()
    with pytest.raises(errors.NotFound):
        p.check("delete")


def test_pause_is_container_level():
    c = Container("c1", "/b", StdioPaths())
    with pytest.raises(errors.FailedPrecondition):
        c.init.check("pause")                   # not running yet
    c.init.started(10)
    e = c.add_exec("e1", StdioPaths())
    e.started(11)
    c.init.check("pause")
    c.init.machine.apply("paused")
    assert c.status_of(c.init) == Status.PAUSED and c.status_of(e) == Status.PAUSED
    with pytest.raises(errors.FailedPrecondition):
        c.init.check("pause")
    c.init.check("resume")
    c.init.machine.apply("resumed")
    with pytest.raises(errors.FailedPrecondition):
        c.init.check("resume")


def test_exec_registration():
    c = Container("c1", "/b", StdioPaths())
    c.init.started(10)
    c.add_exec("e1", StdioPaths(stdout="/x"))
    with pytest.raises(errors.AlreadyExists):
        c.add_exec("e1", StdioPaths())
    with pytest.raises(errors.NotFound):
        c.process("nope")
    assert c.process("e1").exec_id == "e1" and c.process("") is c.init
    c.init.set_exited(ExitInfo(10, 0, 1))
    with pytest.raises(errors.FailedPrecondition, match="init process is not running"):
        c.add_exec("e2", StdioPaths())
    with pytest.raises(errors.FailedPrecondition, match="init process is not running"):
        c.init.check("exec_start")


def test_delete_of_a_never_started_process_wakes_waiters():
    async def main():
        p = Process("c", "", StdioPaths())
        w = asyncio.ensure_future(p.wait())
        await asyncio.sleep(0)
        assert not w.done()
        p.mark_deleted()
        info = await w
        assert info.status == 255 and info.at_ns > 0
    asyncio.run(main())


class Recorder:
    """A real recording sink for exits (no mock framework)."""

    def __init__(self):
        self.published: list[tuple[str, int]] = []
        self.exited_when_published: list[bool] = []

    async def publish_exit(self, p: Process, info: ExitInfo) -> None:
        self.exited_when_published.append(p.exited)
        self.published.append((p.event_id, info.status))


async def test_exit_waits_for_the_start_event():
    r = Recorder()
    c = Container("c", "/b", StdioPaths())
    seq = ExitSequencer(r.publish_exit)
    seq.container = c
    c.init.started(5)
    waiter = asyncio.ensure_future(c.init.wait())
    seq.submit(c.init, ExitInfo(5, 3, 1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert r.published == [] and not waiter.done()     # start not yet published
    c.init.start_published.set()
    assert (await waiter).status == 3
    assert r.published == [("c", 3)]
    assert r.exited_when_published == [False]           # waiters wake only after the event


async def test_exit_waits_for_output_drain():
    r = Recorder()
    c = Container("c", "/b", StdioPaths())
    drained = asyncio.Event()

    async def drain(p, timeout):
        await drained.wait()
        return True

    seq = ExitSequencer(r.publish_exit, drain)
    seq.container = c
    c.init.started(5)
    c.init.start_published.set()
    seq.submit(c.init, ExitInfo(5, 0, 1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert r.published == []
    drained.set()
    await seq.flush()
    assert r.published == [("c", 0)]


async def test_drain_timeout_still_reports_the_exit():
    r = Recorder()
    c = Container("c", "/b", StdioPaths())

    async def drain(p, timeout):
        return False                   # gave up: output still stuck in a FIFO nobody reads

    seq = ExitSequencer(r.publish_exit, drain)
    c.init.started(5)
    c.init.start_published.set()
    seq.submit(c.init, ExitInfo(5, 1, 1))
    await seq.flush()
    assert r.published == [("c", 1)] and c.init.exited


async def test_exec_exits_go_before_the_init_exit():
    r = Recorder()
    c = Container("c", "/b", StdioPaths())
    seq = ExitSequencer(r.publish_exit, exec_grace=30)
    seq.container = c
    c.init.started(5)
    c.init.start_published.set()
    e1 = c.add_exec("e1", StdioPaths())
    e2 = c.add_exec("e2", StdioPaths())
    for e, pid in ((e1, 6), (e2, 7)):
        e.started(pid)
        e.start_published.set()
    # The init's exit arrives first; the execs' exits only later.
    seq.submit(c.init, ExitInfo(5, 137, 3))
    for _ in range(5):
        await asyncio.sleep(0)
    assert r.published == []
    seq.submit(e2, ExitInfo(7, 137, 2))
    seq.submit(e1, ExitInfo(6, 137, 2))
    await seq.flush()
    assert r.published == [("e2", 137), ("e1", 137), ("c", 137)]


async def test_init_exit_does_not_wait_forever_for_execs():
    r = Recorder()
    c = Container("c", "/b", StdioPaths())
    seq = ExitSequencer(r.publish_exit, exec_grace=0.05)
    seq.container = c
    c.init.started(5)
    c.init.start_published.set()
    e1 = c.add_exec("e1", StdioPaths())
    e1.started(6)
    seq.submit(c.init, ExitInfo(5, 0, 3))
    await seq.flush()
    assert r.published == [("c", 0)]


async def test_exec_exit_waits_for_exec_started_and_duplicates_are_ignored():
    r = Recorder()
    c = Container("c", "/b", StdioPaths())
    seq = ExitSequencer(r.publish_exit)
    seq.container = c
    c.init.started(5)
    c.init.start_published.set()
    e = c.add_exec("e", StdioPaths())
    e.started(6)
    seq.submit(e, ExitInfo(6, 0, 1))
    seq.submit(e, ExitInfo(6, 0, 1))
    with pytest.raises(errors.NotFound):
        e.check("kill")                   # exit arrived: a kill now finds nothing to signal
    for _ in range(5):
        await asyncio.sleep(0)
    assert r.published == []
    e.start_published.set()
    await seq.flush()
    assert r.published == [("e", 0)]


async def test_concurrent_waiters_all_wake():
    c = Container("c", "/b", StdioPaths())
    seq = ExitSequencer(Recorder().publish_exit)
    c.init.started(5)
    c.init.start_published.set()
    waiters = [asyncio.ensure_future(c.init.wait()) for _ in range(10)]
    seq.submit(c.init, ExitInfo(5, 42, 9))
    results = await asyncio.gather(*waiters)
    assert {(i.status, i.at_ns) for i in results} == {(42, 9)}
    assert (await c.init.wait()).status == 42      # already exited: returns at once
