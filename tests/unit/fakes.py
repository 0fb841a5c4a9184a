"""Fakes for the host-side orchestration (shim.task_service / shim.containers / shim.exits):
an in-memory guest agent, a sandbox around it, and a recording event publisher. Real small
classes, no mock framework: each records what it was asked, can be told to fail one call, and
the agent lets a test play the guest (push exit and OOM events).

    agent = FakeAgent()
    agent.fail("create", ttrpc.Internal("guest: runc create failed"))
    agent.push_exit("c1", status=3)

    factory = FakeSandboxFactory()          # a FakeSandbox (with its FakeAgent) per call
    factory.plan(fail={"share_rootfs": HostError("virtiofsd died")})
    svc = build_task_service(factory, RecordingPublisher(), ...)
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ttrpc

from spinbox.shim.agent import AgentEvent, ExitStatus, ProcessInfo, Stats
from spinbox.shim.sandbox import GuestRootfs, Sandbox, SharedBinds

NAMESPACE_KEY = "containerd-namespace-ttrpc"


# --- containerd's side ----------------------------------------------------------------------

@dataclass
class Ctx:
    """The bits of ttrpc.ServerContext the Task service reads."""
    metadata: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def ns(namespace: str) -> Ctx:
        return Ctx({NAMESPACE_KEY: namespace})


class RecordingPublisher:
    """What containerd's event service would receive, in order: (namespace, topic, event)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self.fail_topics: set[str] = set()      # publishing these raises (a lost event)

    async def publish(self, namespace: str, topic: str, event: Any) -> None:
        if topic in self.fail_topics:
            raise ConnectionError(f"publisher down for {topic}")
        self.events.append((namespace, topic, event))

    def of(self, container_id: str) -> list[tuple[str, str, Any]]:
        return [e for e in self.events if getattr(e[2], "container_id", None) == container_id]

    def topics(self, container_id: str | None = None) -> list[str]:
        evs = self.events if container_id is None else self.of(container_id)
        return [t for _, t, _ in evs]

    def exits(self, container_id: str) -> list[tuple[str, int]]:
        """(TaskExit.id, exit_status) of the container's exits, in publication order."""
        return [(e.id, e.exit_status) for _, t, e in self.of(container_id) if t == "/tasks/exit"]


def minimal_spec(args: list[str] | None = None, *, mounts: list[dict] | None = None) -> dict:
    """A minimal OCI config.json (as integration/bundles.py oci_spec, no bind mounts)."""
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args or ["sh"],
                    "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "box",
        "mounts": mounts if mounts is not None else [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]},
    }


def make_bundle(root: Path, name: str = "bundle", spec: dict | None = None) -> Path:
    """<root>/<name>/config.json plus an empty rootfs dir: nothing to mount (req.rootfs empty)."""
    b = root / name
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text(json.dumps(spec or minimal_spec()))
    return b


# --- the guest agent ------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    name: str
    args: tuple
    kwargs: dict


@dataclass
class FakeProc:
    pid: int = 0
    started: bool = False
    exit_status: int | None = None
    exited_at_ns: int = 0


class FakeOutputStream:
    """shim.agent.OutputStream's surface (read/refused/aclose): chunks fed by the test; None =
    end; `refuse(error)` = the guest broke the stream's contract."""

    def __init__(self, id: str, exec_id: str, fd: int) -> None:
        self.id, self.exec_id, self.fd = id, exec_id, fd
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._refused: asyncio.Future[BaseException] = asyncio.get_event_loop().create_future()
        self.closed = False

    def feed(self, data: bytes) -> None:
        self._q.put_nowait(data)

    def end(self) -> None:
        self._q.put_nowait(None)

    async def read(self) -> bytes | None:
        return await self._q.get()

    def refuse(self, error: BaseException) -> None:
        self._refused.set_result(error)

    async def refused(self) -> BaseException:
        return await asyncio.shield(self._refused)

    async def aclose(self) -> None:
        self.closed = True


class FakeInputStream:
    """shim.agent.InputStream's surface (write/close/aclose): records what the guest got."""

    def __init__(self, id: str, exec_id: str) -> None:
        self.id, self.exec_id = id, exec_id
        self.data = bytearray()
        self.eof = False
        self.closed = False

    async def write(self, data: bytes) -> None:
        self.data += data

    async def close(self, timeout: float | None = None) -> None:
        self.eof = True

    async def aclose(self) -> None:
        self.closed = True


Hook = Callable[..., Awaitable[None]]


class FakeAgent:
    """In-memory stand-in for spinbox.shim.agent.AgentClient (the calls ContainerManager makes).

    * `calls`: every call, in order (`Call(name, args, kwargs)`); `names()` just the names.
    * `fail(name, exc, times=1)`: the next `times` calls of `name` raise `exc` (None = always).
    * `hooks[name] = async fn(*args)`: awaited after the fake guest did the call's work and
      before it answers (to play a race: an exit before the Start reply, a slow Create).
    * `push_exit(...)`, `push_oom(...)`: guest events into `events()` (seq numbered from 1);
      `exit_on_kill`: a kill makes the process exit with 128+signal, as a real guest would.
    * `journal`: a list shared with the FakeSandbox (one timeline of "agent.<call> <id>").
    """

    def __init__(self, *, first_pid: int = 100, journal: list[str] | None = None) -> None:
        self.calls: list[Call] = []
        self.journal = journal if journal is not None else []
        self.hooks: dict[str, Hook] = {}
        self.exit_on_kill = False
        self.procs: dict[tuple[str, str], FakeProc] = {}
        self.pids_extra: list[ProcessInfo] = []     # added to every pids() answer
        self.stats_value = Stats(2_000_000, 1_500_000, 500_000, 4096, 1 << 20, 3, 64, 1, b"{}")
        self.outputs: list[FakeOutputStream] = []
        self.inputs: list[FakeInputStream] = []
        self.closed = False
        self._next_pid = first_pid
        self._failures: dict[str, list[Any]] = {}     # name -> [exc, times left or None]
        self._events: list[AgentEvent] = []
        self._seq = 0
        self._wake: asyncio.Future[None] | None = None
        self._broken: BaseException | None = None

    # --- test controls ---------------------------------------------------------------------

    def fail(self, name: str, exc: BaseException, times: int | None = 1) -> None:
        self._failures[name] = [exc, times]

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def called(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def push(self, kind: str, id: str, exec_id: str = "", *, pid: int = 0, exit_status: int = 0,
             exited_at_ns: int = 0, gap: bool = False) -> AgentEvent:
        self._seq += 1
        e = AgentEvent(self._seq, time.time_ns(), gap, kind, id, exec_id, pid, exit_status, exited_at_ns)
        self._events.append(e)
        self._kick()
        return e

    def push_exit(self, id: str, exec_id: str = "", status: int = 0, *, pid: int | None = None,
                  end_output: bool = True) -> AgentEvent:
        """The guest's exit event for a process (its pid unless `pid` says otherwise); its output
        streams end first, as the guest's do."""
        proc = self.procs.get((id, exec_id))
        now = time.time_ns()
        if proc is not None:
            proc.exit_status, proc.exited_at_ns = status, now
        if end_output:
            for s in self.outputs:
                if s.id == id and s.exec_id == exec_id:
                    s.end()
        return self.push("exit", id, exec_id, pid=pid if pid is not None else (proc.pid if proc else 0),
                         exit_status=status, exited_at_ns=now)

    def push_oom(self, id: str) -> AgentEvent:
        return self.push("oom", id)

    def break_events(self, exc: BaseException) -> None:
        """The current subscription fails with `exc` when it next wakes up, before it yields
        anything pushed since (a stream hiccup); the next subscription works."""
        self._broken = exc
        self._kick()

    # --- plumbing --------------------------------------------------------------------------

    def _kick(self) -> None:
        fut, self._wake = self._wake, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _changed(self) -> None:
        if self._wake is None:
            self._wake = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._wake)

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        self.calls.append(Call(name, args, kwargs))
        if name != "events":
            self.journal.append(f"agent.{name} {args[0] if args else ''}".rstrip())
        f = self._failures.get(name)
        if f is not None:
            exc, left = f
            if left is not None:
                if left <= 1:
                    del self._failures[name]
                else:
                    f[1] = left - 1
            raise exc

    async def _answer(self, name: str, *args: Any) -> None:
        """The guest did the work; the reply is not out yet: the test's hook runs now."""
        hook = self.hooks.get(name)
        if hook is not None:
            await hook(*args)

    def _proc(self, id: str, exec_id: str = "") -> FakeProc:
        p = self.procs.get((id, exec_id))
        if p is None:
            raise ttrpc.NotFound(f"guest: process {id}/{exec_id} not found")
        return p

    def _pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    # --- AgentClient's surface -------------------------------------------------------------

    async def create(self, id: str, spec: dict | bytes, **kw: Any) -> int:
        self._record("create", (id, spec), kw)
        if (id, "") in self.procs:
            raise ttrpc.AlreadyExists(f"guest: container {id} exists")
        p = self.procs[(id, "")] = FakeProc(self._pid())
        await self._answer("create", id, spec)
        return p.pid

    async def start(self, id: str, exec_id: str = "", **kw: Any) -> int:
        self._record("start", (id, exec_id), kw)
        p = self._proc(id, exec_id)
        if p.started:
            raise ttrpc.FailedPrecondition(f"guest: {id}/{exec_id} already started")
        if not p.pid:
            p.pid = self._pid()
        p.started = True
        await self._answer("start", id, exec_id)
        return p.pid

    async def exec(self, id: str, exec_id: str, process: dict | bytes, **kw: Any) -> None:
        self._record("exec", (id, exec_id, process), kw)
        self._proc(id)
        if (id, exec_id) in self.procs:
            raise ttrpc.AlreadyExists(f"guest: exec {exec_id} exists")
        self.procs[(id, exec_id)] = FakeProc()
        await self._answer("exec", id, exec_id)

    async def kill(self, id: str, exec_id: str = "", signal: int = 15, all: bool = False, **kw: Any) -> None:
        self._record("kill", (id, exec_id, signal, all), kw)
        p = self._proc(id, exec_id)
        if self.exit_on_kill and p.started and p.exit_status is None:
            self.push_exit(id, exec_id, 128 + signal)
        await self._answer("kill", id, exec_id)

    async def delete(self, id: str, exec_id: str = "", **kw: Any) -> ExitStatus:
        self._record("delete", (id, exec_id), kw)
        p = self._proc(id, exec_id)
        if p.started and p.exit_status is None:
            raise ttrpc.FailedPrecondition(f"guest: {id}/{exec_id} is running")
        del self.procs[(id, exec_id)]
        if not exec_id:
            for key in [k for k in self.procs if k[0] == id]:
                del self.procs[key]
        await self._answer("delete", id, exec_id)
        status = p.exit_status if p.exit_status is not None else 255
        return ExitStatus(status, p.exited_at_ns, p.pid)

    async def pids(self, id: str, **kw: Any) -> list[ProcessInfo]:
        self._record("pids", (id,), kw)
        await self._answer("pids", id)
        return [ProcessInfo(p.pid, k[1]) for k, p in self.procs.items()
                if k[0] == id and p.started and p.exit_status is None] + list(self.pids_extra)

    async def pause(self, id: str, **kw: Any) -> None:
        self._record("pause", (id,), kw)
        await self._answer("pause", id)

    async def resume(self, id: str, **kw: Any) -> None:
        self._record("resume", (id,), kw)
        await self._answer("resume", id)

    async def update(self, id: str, resources: dict | bytes, **kw: Any) -> None:
        self._record("update", (id, resources), kw)
        await self._answer("update", id)

    async def stats(self, id: str, **kw: Any) -> Stats:
        self._record("stats", (id,), kw)
        await self._answer("stats", id)
        return self.stats_value

    async def close_stdin(self, id: str, exec_id: str = "", **kw: Any) -> None:
        self._record("close_stdin", (id, exec_id), kw)
        await self._answer("close_stdin", id, exec_id)

    async def resize_pty(self, id: str, exec_id: str, width: int, height: int, **kw: Any) -> None:
        self._record("resize_pty", (id, exec_id, width, height), kw)
        await self._answer("resize_pty", id, exec_id)

    def open_output(self, id: str, exec_id: str, fd: int, **kw: Any) -> FakeOutputStream:
        self._record("open_output", (id, exec_id, fd), kw)
        s = FakeOutputStream(id, exec_id, fd)
        self.outputs.append(s)
        return s

    def open_input(self, id: str, exec_id: str = "") -> FakeInputStream:
        self._record("open_input", (id, exec_id), {})
        s = FakeInputStream(id, exec_id)
        self.inputs.append(s)
        return s

    async def events(self, after_seq: int = 0) -> AsyncIterator[AgentEvent]:
        """Every pushed event with seq > after_seq, then waits for more; ends at close()."""
        self._record("events", (after_seq,), {})
        seen = after_seq
        broken_at = self._broken
        while True:
            if self._broken is not None and self._broken is not broken_at:
                exc, self._broken = self._broken, None
                raise exc
            for e in list(self._events):
                if e.seq > seen:
                    seen = e.seq
                    yield e
            if self.closed:
                return
            await self._changed()

    async def close(self) -> None:
        self.calls.append(Call("close", (), {}))
        self.closed = True
        self._kick()


# --- the sandbox ----------------------------------------------------------------------------

class FakeSandbox(Sandbox):
    """A Sandbox around a FakeAgent. `journal` is the timeline of what happened ("start",
    "share_rootfs c1", "share_binds c1", "unshare c1", "stop", and the agent's calls);
    `fail[name] = exc` makes that step raise (start, share_rootfs, share_binds, unshare, stop);
    `shared` is what is currently shared per container. `mark_lost()` is the base class's."""

    def __init__(self, id: str = "sandbox", *, agent: FakeAgent | None = None,
                 fail: dict[str, BaseException] | None = None) -> None:
        super().__init__(id)
        self.journal: list[str] = []
        self.fake_agent = agent if agent is not None else FakeAgent(journal=self.journal)
        self.fake_agent.journal = self.journal
        self.fail = dict(fail or {})
        self.spec: dict | None = None
        self.shared: dict[str, list[str]] = {}
        self.gates: dict[str, asyncio.Event] = {}    # step -> wait for it before answering

    async def _step(self, name: str, container_id: str = "") -> None:
        self.journal.append(f"{name} {container_id}".rstrip())
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        exc = self.fail.get(name)
        if exc is not None:
            raise exc

    async def _start(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        await self._step("start")
        self.agent = self.fake_agent         # type: ignore[assignment]

    async def _stop(self) -> None:
        await self._step("stop")
        await self.fake_agent.close()
        self.agent = None

    async def share_rootfs(self, container_id: str, host_rootfs: Path) -> GuestRootfs:
        self.shared.setdefault(container_id, []).append(f"rootfs:{host_rootfs}")
        await self._step("share_rootfs", container_id)
        return GuestRootfs(path=str(host_rootfs))

    async def share_binds(self, container_id: str, binds: list) -> SharedBinds:
        await self._step("share_binds", container_id)
        if binds:
            self.shared.setdefault(container_id, []).extend(f"bind:{b.source}" for b in binds)
        return SharedBinds(None)

    async def unshare(self, container_id: str) -> None:
        self.shared.pop(container_id, None)
        await self._step("unshare", container_id)


class FakeSandboxFactory:
    """The manager's sandbox factory: a fresh FakeSandbox per call (kept in `made`);
    `plan(fail=..., agent_fail=...)` sets the failures of the next sandbox made."""

    def __init__(self) -> None:
        self.made: list[FakeSandbox] = []
        self._plans: list[dict[str, BaseException]] = []

    def plan(self, *, fail: dict[str, BaseException] | None = None,
             agent_fail: dict[str, BaseException] | None = None) -> None:
        """Failures of the next sandbox made: its steps (`fail`) and its agent's calls (once)."""
        self._plans.append((fail or {}, agent_fail or {}))

    def __call__(self) -> FakeSandbox:
        fail, agent_fail = self._plans.pop(0) if self._plans else ({}, {})
        sb = FakeSandbox(f"sandbox-{len(self.made)}", fail=fail)
        for name, exc in agent_fail.items():
            sb.fake_agent.fail(name, exc)
        self.made.append(sb)
        return sb

    @property
    def last(self) -> FakeSandbox:
        return self.made[-1]
