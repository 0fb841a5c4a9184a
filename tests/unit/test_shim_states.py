"""The host's state tables (shim/states.py): the process and sandbox machines, checked
against tables written out here (so a change of the shim's table is a visible change of this
file), plus random event sequences (hypothesis) and the Sandbox base class's use of its
machine (with tests/unit/fakes.py's FakeSandbox)."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spinbox.shim import errors
from spinbox.shim.errors import HostError
from spinbox.shim.process import Process, Status, StdioPaths
from spinbox.shim.states import (PROCESS_EVENTS, PROCESS_OPS, SANDBOX_EVENTS, ProcessMachine,
                                 ProcessState, SandboxMachine, SandboxState)

from fakes import FakeSandbox

P = ProcessState
S = SandboxState
ALL_P = frozenset(P)
ALL_S = frozenset(S)
LIVE = {P.CREATED, P.RUNNING, P.PAUSED}
FINISHED = {P.EXIT_PENDING, P.STOPPED, P.DELETED}

# --- the expected tables (containerd's runc shim: process/*_state.go) ----------------------

EXPECTED_OPS = {
    "start": {P.CREATED},
    "kill": LIVE,
    "kill_all": LIVE | {P.EXIT_PENDING},
    "delete": {P.CREATED, P.EXIT_PENDING, P.STOPPED},
    "exec": LIVE,
    "exec_start": {P.RUNNING, P.PAUSED},
    "pause": {P.RUNNING},
    "resume": {P.PAUSED},
    "update": LIVE,
    "pids": LIVE,
}

EXPECTED_EVENTS = {
    "started": ({P.CREATED}, P.RUNNING),
    "paused": ({P.RUNNING}, P.PAUSED),
    "resumed": ({P.PAUSED}, P.RUNNING),
    "exit_arrived": (LIVE, P.EXIT_PENDING),
    "exited": (LIVE | {P.EXIT_PENDING}, P.STOPPED),
    "deleted": (ALL_P - {P.DELETED}, P.DELETED),
}

EXPECTED_SANDBOX = {
    "start": ({S.NEW}, S.STARTING),
    "ready": ({S.STARTING}, S.READY),
    "lost": ({S.STARTING, S.READY}, S.LOST),
    "stop": ({S.NEW, S.STARTING, S.READY, S.LOST}, S.STOPPING),
    "stopped": ({S.STOPPING}, S.STOPPED),
}

# A way into each process state through events only (what the shim can actually do).
PATH_TO = {
    P.CREATED: [],
    P.RUNNING: ["started"],
    P.PAUSED: ["started", "paused"],
    P.EXIT_PENDING: ["started", "exit_arrived"],
    P.STOPPED: ["started", "exit_arrived", "exited"],
    P.DELETED: ["started", "exited", "deleted"],
}

SANDBOX_PATH_TO = {
    S.NEW: [],
    S.STARTING: ["start"],
    S.READY: ["start", "ready"],
    S.LOST: ["start", "ready", "lost"],
    S.STOPPING: ["start", "ready", "stop"],
    S.STOPPED: ["start", "ready", "stop", "stopped"],
}


def process_in(state: ProcessState, name: str = "c1") -> ProcessMachine:
    m = ProcessMachine(name)
    for e in PATH_TO[state]:
        assert m.apply(e), (state, e)
    assert m.state == state
    return m


def sandbox_in(state: SandboxState) -> SandboxMachine:
    m = SandboxMachine("sb")
    for e in SANDBOX_PATH_TO[state]:
        assert m.apply(e), (state, e)
    assert m.state == state
    return m


def reachable(events: dict, start) -> set:
    seen, todo = {start}, [start]
    while todo:
        s = todo.pop()
        for sources, target in events.values():
            if s in sources and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


# --- the tables as written -----------------------------------------------------------------

def test_process_ops_table_is_the_expected_one():
    assert {op: set(states) for op, states in PROCESS_OPS.items()} == EXPECTED_OPS


def test_process_events_table_is_the_expected_one():
    assert {e: (set(src), dst) for e, (src, dst) in PROCESS_EVENTS.items()} == EXPECTED_EVENTS


def test_sandbox_events_table_is_the_expected_one():
    assert {e: (set(src), dst) for e, (src, dst) in SANDBOX_EVENTS.items()} == EXPECTED_SANDBOX


def test_every_state_is_reachable_from_the_initial_one():
    assert reachable(PROCESS_EVENTS, P.CREATED) == ALL_P
    assert reachable(SANDBOX_EVENTS, S.NEW) == ALL_S


def test_every_process_state_has_a_containerd_status():
    for state in P:
        p = Process("c1", "", StdioPaths())
        p.machine = process_in(state)
        assert isinstance(p.status, Status)
    # An exit that is not published yet is still "running" for containerd (Wait still blocks).
    p.machine = process_in(P.EXIT_PENDING)
    assert p.status == Status.RUNNING


# --- ops: allowed exactly in their states, the documented error otherwise ------------------

def _expected_error(op: str, state: ProcessState) -> tuple[type, str | None]:
    if op in ("kill", "kill_all") and state in FINISHED:
        return errors.NotFound, "process already finished"
    if state == P.DELETED:
        return errors.NotFound, "was deleted"
    return errors.FailedPrecondition, None


@pytest.mark.parametrize("op", sorted(EXPECTED_OPS))
@pytest.mark.parametrize("state", list(P), ids=lambda s: s.name)
def test_op_is_allowed_exactly_in_its_states(op, state):
    m = process_in(state)
    if state in EXPECTED_OPS[op]:
        assert m.allows(op)
        m.check(op)                                   # no error
    else:
        assert not m.allows(op)
        exc, text = _expected_error(op, state)
        with pytest.raises(exc, match=text) as info:
            m.check(op)
        assert type(info.value) is exc                # NotFound is not a FailedPrecondition
        assert "c1" in str(info.value)                # the message names the process
    assert m.state == state                           # asking never changes the state


@pytest.mark.parametrize("state", [P.EXIT_PENDING, P.STOPPED, P.DELETED], ids=lambda s: s.name)
def test_kill_of_a_finished_process_is_not_found(state):
    for op in ("kill", "kill_all") if state != P.EXIT_PENDING else ("kill",):
        with pytest.raises(errors.NotFound, match="process already finished"):
            process_in(state).check(op)


def test_messages_for_common_refusals():
    with pytest.raises(errors.FailedPrecondition, match="cannot delete a running process"):
        process_in(P.RUNNING).check("delete")
    with pytest.raises(errors.FailedPrecondition, match="already paused"):
        process_in(P.PAUSED).check("pause")
    with pytest.raises(errors.FailedPrecondition, match="not paused"):
        process_in(P.RUNNING).check("resume")
    with pytest.raises(errors.FailedPrecondition, match="has exited"):
        process_in(P.STOPPED).check("start")
    with pytest.raises(errors.FailedPrecondition, match="is running"):
        process_in(P.RUNNING).check("start")
    with pytest.raises(errors.FailedPrecondition, match="init process is not running"):
        process_in(P.CREATED).check("exec_start")


def test_unknown_op_or_event_is_a_programming_error():
    m = ProcessMachine("c1")
    with pytest.raises(KeyError):
        m.allows("frobnicate")
    with pytest.raises(KeyError):
        m.apply("frobnicated")


# --- events ----------------------------------------------------------------------------------

@pytest.mark.parametrize("event", sorted(EXPECTED_EVENTS))
@pytest.mark.parametrize("state", list(P), ids=lambda s: s.name)
def test_process_event_transitions(event, state):
    m = process_in(state)
    sources, target = EXPECTED_EVENTS[event]
    if state in sources:
        assert m.apply(event) is True and m.state == target
    else:
        assert m.apply(event) is False and m.state == state


def test_an_exit_that_races_a_delete_is_not_an_error():
    m = process_in(P.DELETED)
    assert not m.apply("exit_arrived") and not m.apply("exited") and m.state == P.DELETED


def test_an_exit_that_races_start_keeps_exit_pending():
    m = ProcessMachine("c1")
    assert m.apply("exit_arrived")                 # the guest said so before Start answered
    assert not m.apply("started") and m.state == P.EXIT_PENDING
    assert m.apply("exited") and m.state == P.STOPPED


@pytest.mark.parametrize("event", sorted(EXPECTED_SANDBOX))
@pytest.mark.parametrize("state", list(S), ids=lambda s: s.name)
def test_sandbox_event_transitions(event, state):
    m = sandbox_in(state)
    sources, target = EXPECTED_SANDBOX[event]
    if state in sources:
        assert m.apply(event) is True and m.state == target
    else:
        assert m.apply(event) is False and m.state == state


@pytest.mark.parametrize("state", list(S), ids=lambda s: s.name)
def test_sandbox_require_guard(state):
    m = sandbox_in(state)
    m.require(state)
    m.require(*S)
    others = [s for s in S if s != state]
    with pytest.raises(errors.FailedPrecondition, match=f"sandbox sb is {state.value}"):
        m.require(*others)
    with pytest.raises(errors.FailedPrecondition):
        m.require()
    assert m.state == state


# --- random sequences --------------------------------------------------------------------

PROCESS_REACHABLE = reachable(PROCESS_EVENTS, P.CREATED)
SANDBOX_REACHABLE = reachable(SANDBOX_EVENTS, S.NEW)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(PROCESS_EVENTS)), max_size=40))
def test_random_process_events_stay_on_the_table(events):
    m = ProcessMachine("c1")
    finished = False
    for e in events:
        before = m.state
        ok = m.apply(e)
        sources, target = PROCESS_EVENTS[e]
        if ok:
            assert before in sources and m.state == target
        else:
            assert before not in sources and m.state == before     # False changes nothing
        assert m.state in PROCESS_REACHABLE
        # an exit is final: a finished process never comes back to life
        if finished:
            assert m.state in FINISHED
        finished = m.state in FINISHED
        # check() agrees with allows() and never changes the state
        for op in PROCESS_OPS:
            s = m.state
            if m.allows(op):
                m.check(op)
            else:
                with pytest.raises((errors.NotFound, errors.FailedPrecondition)):
                    m.check(op)
            assert m.state == s
    if m.state == P.DELETED:
        assert all(not m.apply(e) for e in PROCESS_EVENTS)          # deleted is absorbing


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(SANDBOX_EVENTS)), max_size=30))
def test_random_sandbox_events_stay_on_the_table(events):
    m = SandboxMachine("sb")
    for e in events:
        before = m.state
        ok = m.apply(e)
        sources, target = SANDBOX_EVENTS[e]
        if ok:
            assert before in sources and m.state == target
        else:
            assert before not in sources and m.state == before
        assert m.state in SANDBOX_REACHABLE
        if before in (S.STOPPING, S.STOPPED):
            assert m.state in (S.STOPPING, S.STOPPED)               # no way back from a stop
    if m.state == S.STOPPED:
        assert all(not m.apply(e) for e in SANDBOX_EVENTS)


# --- the Sandbox base class drives its machine ---------------------------------------------

async def test_sandbox_lifecycle_start_lost_stop():
    sb = FakeSandbox("sb")
    assert sb.state == S.NEW
    await sb.start({"process": {}})
    assert sb.state == S.READY and sb.agent is sb.fake_agent and not sb.lost.is_set()
    with pytest.raises(errors.FailedPrecondition, match="cannot start"):
        await sb.start()
    sb.mark_lost()
    assert sb.state == S.LOST and sb.lost.is_set()
    sb.mark_lost()                                  # twice: no change
    assert sb.state == S.LOST
    await sb.stop()
    assert sb.state == S.STOPPED and sb.journal == ["start", "stop"]
    sb.mark_lost()                                  # the VM dying after a stop: still stopped
    assert sb.state == S.STOPPED


async def test_sandbox_start_failure_stops_it():
    sb = FakeSandbox("sb", fail={"start": HostError("boot failed")})
    with pytest.raises(HostError, match="boot failed"):
        await sb.start()
    assert sb.state == S.STOPPED and sb.lost.is_set() and sb.journal == ["start", "stop"]
    with pytest.raises(errors.FailedPrecondition):
        await sb.start()                            # a stopped sandbox is not restarted


async def test_sandbox_stop_is_idempotent_and_concurrent_stops_share_one():
    sb = FakeSandbox("sb")
    await sb.start()
    gate = asyncio.Event()
    sb.gates["stop"] = gate
    first = asyncio.ensure_future(sb.stop())
    await asyncio.sleep(0)
    second = asyncio.ensure_future(sb.stop())
    await asyncio.sleep(0.01)
    assert sb.state == S.STOPPING and not second.done()
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    await sb.stop()
    assert sb.journal.count("stop") == 1 and sb.state == S.STOPPED
    with pytest.raises(errors.GuestUnavailable):
        _ = sb.agent_client


async def test_sandbox_stop_before_start_and_a_failing_stop_still_ends_stopped():
    sb = FakeSandbox("sb")
    await sb.stop()
    assert sb.state == S.STOPPED
    sb2 = FakeSandbox("sb2", fail={"stop": HostError("qemu stuck")})
    await sb2.start()
    with pytest.raises(HostError):
        await sb2.stop()
    assert sb2.state == S.STOPPED and sb2.lost.is_set()


async def test_sandbox_lost_while_starting_fails_the_start():
    sb = FakeSandbox("sb")
    gate = asyncio.Event()
    sb.gates["start"] = gate
    t = asyncio.ensure_future(sb.start())
    await asyncio.sleep(0.01)
    assert sb.state == S.STARTING
    sb.mark_lost()                                  # QEMU died during the boot
    gate.set()
    with pytest.raises(errors.GuestUnavailable, match="lost while starting"):
        await asyncio.wait_for(t, 5)
    assert sb.lost.is_set() and sb.state in (S.LOST, S.STOPPED)


async def test_sandbox_lost_while_starting_is_stopped():
    sb = FakeSandbox("sb")
    gate = asyncio.Event()
    sb.gates["start"] = gate
    t = asyncio.ensure_future(sb.start())
    await asyncio.sleep(0.01)
    sb.mark_lost()
    gate.set()
    with pytest.raises(errors.GuestUnavailable):
        await asyncio.wait_for(t, 5)
    assert sb.journal == ["start", "stop"] and sb.state == S.STOPPED
