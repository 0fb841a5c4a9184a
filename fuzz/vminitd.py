"""Target `vminitd`: vminitd's request handling as a compromised host drives it. Every method
of the guest API (Containers, Stdio, Events, System, Network) is called through vminitd's own
dispatch wrappers (vminitd/server.py `_Adapter`: AgentError -> status) on the real servicers
(vminitd/service.py, vminitd/network.py) and a real `Agent` (vminitd/agent.py) in a temporary
state dir, with hostile messages (fuzz/messages.py: ids with `..`, `/`, NUL, newlines, 77
characters; huge sizes, windows and offsets; paths; invalid JSON specs) mixed with valid
requests, so that later calls meet containers and execs that exist.

This is a decoder and validation fuzz, not a runtime test: no runc runs. The runtime layer is
a stub (`StubRunc`: writes pid files, reports exits through the real `Reaper`, sends a pty over
the console socket), its pids lie above the kernel's PID_MAX_LIMIT so that a signal can never
reach a real process; mount(2), umount(2), clock_settime, sethostname, sync and the /sys
writes of CPU/memory onlining are stubbed (this host runs its tests as root), rtnetlink too
(link lookups read a fake /sys/class/net in the temp dir).

Invariants: each call returns a response or raises a ttrpc status error (a TTRPCError), never
anything else; only waiting calls (Wait, the streams, Subscribe, Configure waiting for links)
may run out the per-call bound; nothing is created, written, renamed or removed outside the
temp dir (an audit hook refuses it and records it); no fd is left open after the input.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ttrpc
from google.protobuf.message_factory import GetMessageClass

from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.vminitd import cgroups as v_cgroups
from spinbox.vminitd import mounts as v_mounts
from spinbox.vminitd import network as v_network
from spinbox.vminitd import server as v_server
from spinbox.vminitd import system as v_system
from spinbox.vminitd.agent import Agent
from spinbox.vminitd.events import EventLog
from spinbox.vminitd.reaper import Exit, Reaper

from . import messages
from .data import Input
from .driver import AsyncHarness, Finding, Target

PID_BASE = (1 << 22) + 1000           # above PID_MAX_LIMIT (4194304): no process has such a pid
CALL_BOUND_S = 0.3                    # a call that does not wait must answer within this
WAIT_S = 0.01                         # how long a waiting call is given before it is cancelled
WAITING = {"Wait", "Output", "Input", "Subscribe", "Configure"}
MACS = ("52:54:00:12:34:01", "52:54:00:12:34:02")
IDS = ("c1", "c2", "e1", "e2", "", "..", "../c1", "../../../../../../tmp/fuzz-escape", "c1/..", "a/b", "c1\0", "c1\n", "a" * 77, "a" * 76, "-x", ".x")
SPECS = (b'{"process": {"args": ["sh"]}}',
         b'{"process": {"args": ["sh"], "terminal": true}, "hooks": {"prestart": [{"path": "/bin/x"}]}}',
         b'{"process": {"args": ["sh"]}, "mounts": [{"type": "bind", "source": "/nonexistent-fuzz", '
         b'"destination": "/x"}]}',
         b'{"process": {"args": ["sh"]}, "linux": {"namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]}}',
         b'{"process": {}}', b"[]", b"{", b"null", b'{"args": ["sh"], "cwd": "/"}')


class StubRunc:
    """The runtime layer's interface (vminitd/runc.py `Runc`) without a runtime: processes are
    numbers, exits go through the agent's real Reaper when a kill or a forced delete asks."""

    def __init__(self, reaper: Reaper, root: Path) -> None:
        self.reaper = reaper
        self.root = root
        self.binary = "runc-stub"
        self.log_dir = root / "logs"
        self._next = PID_BASE
        self.pids: dict[str, list[int]] = {}      # container id -> its pids, init first

    def _pid(self, id: str, pid_file: Path) -> None:
        self._next += 1
        pid_file.write_text(str(self._next))
        self.pids.setdefault(id, []).append(self._next)

    def _exit(self, pid: int, status: int) -> None:
        self.reaper._deliver(Exit(pid, status, time.time_ns(), time.monotonic()))

    @staticmethod
    def _console(console_socket: Path | None) -> None:
        if console_socket is None:
            return
        master, slave = os.openpty()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(console_socket))
                socket.send_fds(s, [b"pty"], [master])
        finally:
            os.close(master)
            os.close(slave)

    async def create(self, id: str, bundle: Path, pid_file: Path, *, console_socket: Path | None,
                     stdio: Any) -> None:
        self._console(console_socket)
        self._pid(id, pid_file)

    async def exec(self, id: str, process_json: Path, pid_file: Path, *, console_socket: Path | None,
                   stdio: Any) -> None:
        self._console(console_socket)
        self._pid(id, pid_file)

    async def start(self, id: str) -> None:
        pass

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        pids = self.pids.get(id, [])
        for pid in pids if all else pids[:1]:
            self._exit(pid, 128 + signal)

    async def delete(self, id: str, force: bool = False) -> None:
        for pid in self.pids.pop(id, []):
            self._exit(pid, 137)

    async def ps(self, id: str) -> list[int]:
        return list(self.pids.get(id, []))

    async def pause(self, id: str) -> None:
        pass

    async def resume(self, id: str) -> None:
        pass

    async def update(self, id: str, resources: dict) -> None:
        pass

    async def stats(self, id: str) -> dict:
        return {"type": "stats", "data": {"cpu": {"usage": {"total": 5}}, "pids": {"current": 1}}}


class _Confined:
    """An audit hook (once per process; hooks cannot be removed) that, while `root` is set,
    refuses every file system change outside it and records what was tried."""

    def __init__(self) -> None:
        self.root: str | None = None
        self.violations: list[str] = []
        sys.addaudithook(self._hook)

    # event -> ((index of a path argument, index of its dir_fd argument or None), ...)
    _WRITE_EVENTS = {"os.mkdir": ((0, 2),), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),),
                     "os.rename": ((0, 2), (1, 3)), "os.replace": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
                     "os.link": ((1, 3),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
                     "os.truncate": ((0, None),), "os.utime": ((0, 3),), "shutil.rmtree": ((0, 1),)}

    @staticmethod
    def _resolve(path: Any, dir_fd: Any) -> str | None:
        if isinstance(path, int) or not isinstance(path, (str, bytes, os.PathLike)):
            return None
        p = os.fsdecode(path)
        if not os.path.isabs(p) and isinstance(dir_fd, int) and dir_fd >= 0:
            try:
                p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
            except OSError:
                return p
        return os.path.abspath(p)

    def _outside(self, p: str) -> bool:
        assert self.root is not None
        inside = p == self.root or p.startswith(self.root + os.sep)
        return not inside and "__pycache__" not in p and not p.startswith("/dev/pts/")

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.root is None:
            return
        paths: list[str | None] = []
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                paths.append(self._resolve(path, None))
        elif event in self._WRITE_EVENTS:
            for i, fd_i in self._WRITE_EVENTS[event]:
                if i < len(args):
                    paths.append(self._resolve(args[i], args[fd_i] if fd_i is not None and fd_i < len(args) else None))
        for p in paths:
            if p is not None and self._outside(p):
                self.violations.append(f"{event} {p!r}")
                raise PermissionError(f"fuzz: {event} outside the temp dir: {p}")


_CONFINED: _Confined | None = None


def _confined() -> _Confined:
    global _CONFINED
    if _CONFINED is None:
        _CONFINED = _Confined()
    return _CONFINED


class _Stream:
    """The ttrpc stream a streaming handler gets: the host's messages, then the end; sends
    counted (a stream that sends without bound is a finding)."""

    def __init__(self, incoming: list[Any]) -> None:
        self.incoming = incoming
        self.sent = 0

    async def recv(self) -> Any:
        await asyncio.sleep(0)
        return self.incoming.pop(0) if self.incoming else None

    async def send(self, msg: Any) -> None:
        self.sent += 1
        if self.sent > 10_000:
            raise Finding("a stream sent over 10000 messages for a few requests")
        await asyncio.sleep(0)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def _stubs(tmp: Path) -> Iterator[None]:
    """What would change this host: mounts, the clock, the hostname, sync, /sys, rtnetlink."""
    mounted: list[str] = []

    def mount(source: str, target: str, fstype: str, options: list[str]) -> None:
        if not os.path.isdir(target):
            raise FileNotFoundError(target)
        mounted.append(target)

    saved = [(v_mounts, "mount", mount), (v_mounts, "umount", lambda target, *a, **k: None),
             (time, "clock_settime_ns", lambda clock, ns: None),
             (socket, "sethostname", lambda name: None), (os, "sync", lambda: None),
             (v_system, "online_cpus", functools.partial(v_system.online_cpus, root=str(tmp / "sys/cpu"))),
             (v_system, "set_online_cpus", functools.partial(v_system.set_online_cpus, root=str(tmp / "sys/cpu"))),
             (v_system, "online_memory", functools.partial(v_system.online_memory, root=str(tmp / "sys/memory"))),
             (v_network, "configure_links", lambda plan, current: {i.mac: i.name or current[i.mac]
                                                                   for i in plan.interfaces}),
             (v_cgroups, "remove_parent", lambda cgroup, root=None: None)]
    originals = [(mod, name, getattr(mod, name)) for mod, name, _ in saved]
    for mod, name, value in saved:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in originals:
            setattr(mod, name, value)


def _fake_sys(tmp: Path) -> None:
    cpu = tmp / "sys/cpu"
    (cpu / "cpu1").mkdir(parents=True)
    (cpu / "online").write_text("0\n")
    (cpu / "present").write_text("0-1\n")
    (cpu / "cpu1/online").write_text("0\n")
    mem = tmp / "sys/memory/memory0"
    mem.mkdir(parents=True)
    (mem / "state").write_text("online\n")
    for i, mac in enumerate(MACS):
        d = tmp / f"net/eth{i}"
        d.mkdir(parents=True)
        (d / "address").write_text(mac + "\n")
    (tmp / "etc").mkdir()
    (tmp / "rootfs").mkdir()


def _methods() -> list[tuple[str, Any]]:
    out = []
    for module, name in v_server.SERVICES:
        for m in module.DESCRIPTOR.services_by_name[name].methods:
            out.append((name, m))
    return out


METHODS = _methods()
CONTAINERS = [sm for sm in METHODS if sm[0] == "Containers"]


class VminitdHarness(AsyncHarness):
    def __init__(self) -> None:
        super().__init__(time_bound_s=6.0)
        # tmpfs where there is one: a directory removed on disk costs milliseconds here
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.tmp = Path(tempfile.mkdtemp(prefix="spinbox-fuzz-vm-", dir=shm))
        self._remove_tmp = weakref.finalize(self, shutil.rmtree, self.tmp, True)
        _fake_sys(self.tmp)
        self.confined = _confined()
        self.fds_before: int | None = None
        self.types = {m.full_name: GetMessageClass(m.input_type) for _, m in METHODS}

    def _build(self, state: Path) -> tuple[Agent, dict[str, Any]]:
        agent = Agent(state, Reaper(), events=EventLog(capacity=64), drain_idle_timeout=0.02,
                      cgroup_parent="/spinbox-fuzz", shares_root=str(self.tmp / "shares"))
        agent.runc = StubRunc(agent.reaper, state)   # type: ignore[assignment]

        def wrap(impls: dict[str, Any], a: Any) -> dict[str, Any]:
            impls["Network"] = v_network.NetworkService(a, etc_dir=str(self.tmp / "etc"),
                                                        sys_class_net=str(self.tmp / "net"), set_hostname=False)
            return impls

        srv = v_server.AgentServer(lambda: agent, wrap=wrap)
        adapters = {}
        for module, name in v_server.SERVICES:
            desc = module.DESCRIPTOR.services_by_name[name]
            own = srv._liveness if name == "System" else None
            adapters[name] = v_server._Adapter(desc, functools.partial(srv._servicer, name), own)
        return agent, adapters

    def _request(self, inp: Input, m: Any) -> Any:
        cls = self.types[m.full_name]
        msg: Any                   # a message of the method's input type (fields vary)
        if inp.chance(3):
            msg = messages.fill(cls(), inp, pool=IDS)
        else:
            try:
                msg = cls.FromString(messages.hostile(cls, inp, pool=IDS))
            except Exception:
                return None        # not a message: the server refuses it before dispatch
        # mostly ids that exist or may (c1, c2, e1): the handlers behind the id checks get reached
        if "id" in cls.DESCRIPTOR.fields_by_name and not inp.chance(3):
            msg.id = inp.pick(("c1", "c1", "c2"))
        if "exec_id" in cls.DESCRIPTOR.fields_by_name and not inp.chance(3):
            msg.exec_id = inp.pick(("", "", "e1", "e2"))
        if m.name == "Create" and not inp.chance(4):
            msg.spec = inp.pick(SPECS)
            if inp.flag():
                msg.rootfs.path = str(self.tmp / "rootfs")
        elif m.name == "Exec" and not inp.chance(4):
            msg.process = inp.pick(SPECS[:2] + (b'{"args": ["sh"]}',))
        elif m.name == "Configure" and inp.flag():
            msg.link_timeout_ms = inp.pick((0, 1, 50))
            for it in msg.interfaces:
                it.mac = inp.pick(MACS + ("ff:ff:ff:ff:ff:ff",))
        return msg

    async def run(self, inp: Input) -> None:
        state = self.tmp / "state"     # one per harness: a new Agent each input, no containers left
        if self.fds_before is None:
            self.fds_before = _fd_count()
        self.confined.violations.clear()
        self.confined.root = str(self.tmp)
        agent = None
        try:
            with _stubs(self.tmp):
                agent, adapters = self._build(state)
                if inp.flag():
                    await self._prologue(inp, adapters)
                for _ in range(inp.below(10) + 1):
                    svc, m = inp.pick(METHODS) if inp.chance(3) else inp.pick(CONTAINERS)
                    req = self._request(inp, m)
                    if req is None:
                        continue
                    await self._call(inp, adapters[svc], m, req)
                    if self.confined.violations:
                        raise Finding(f"{m.name}: wrote outside the temp dir: {self.confined.violations[0]}")
                await self._shutdown(agent)
        finally:
            self.confined.root = None
            for d in (state / "bundles", self.tmp / "shares"):
                if d.exists() and any(d.iterdir()):
                    shutil.rmtree(d, ignore_errors=True)

    async def _prologue(self, inp: Input, adapters: dict[str, Any]) -> None:
        """A container that exists (c1, started, an exec e1 maybe started too), so that the
        hostile calls after it reach the handlers past the lookups."""
        by_name = {m.name: (svc, m) for svc, m in METHODS}
        tty = inp.chance(4)
        wanted: dict[str, Any] = {"stdin": inp.flag(), "stdout": inp.flag() or tty, "stderr": inp.flag() and not tty}
        steps = [("Create", cpb.CreateRequest(id="c1", spec=SPECS[0], rootfs=cpb.Rootfs(path=str(self.tmp / "rootfs")),
                                              terminal=tty, **wanted)),
                 ("Start", cpb.StartRequest(id="c1"))]
        if inp.flag():
            steps += [("Exec", cpb.ExecRequest(id="c1", exec_id="e1", process=b'{"args": ["sh"]}', terminal=tty,
                                               **wanted)),
                      ("Start", cpb.StartRequest(id="c1", exec_id="e1"))]
        for name, req in steps:
            svc, m = by_name[name]
            await self._call(inp, adapters[svc], m, req)

    async def _call(self, inp: Input, adapter: Any, m: Any, req: Any) -> None:
        handler = getattr(adapter, m.name)
        if m.client_streaming:
            follow = [self._follow_up(inp, m) for _ in range(inp.below(6))]
            call = handler(_Stream([req, *[f for f in follow if f is not None]]), None)
        elif m.server_streaming:
            call = handler(_Stream([req]), None)
        else:
            call = handler(req, None)
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait_for(asyncio.shield(task), WAIT_S if m.name in WAITING else CALL_BOUND_S)
        except TimeoutError:
            if m.name not in WAITING and not task.done():
                task.cancel()
                raise Finding(f"{m.name} still running after {CALL_BOUND_S}s") from None
        except ttrpc.TTRPCError as e:
            if not isinstance(e.message, str):
                raise Finding(f"{m.name}: status without a message") from e
        except Finding:
            raise
        except Exception as e:
            raise Finding(f"{m.name}: {type(e).__name__} escaped as a non-status error: {e}") from e
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _follow_up(self, inp: Input, m: Any) -> Any:
        cls = self.types[m.full_name]
        try:
            return cls.FromString(messages.hostile(cls, inp, pool=IDS))
        except Exception:
            return None

    async def _shutdown(self, agent: Agent) -> None:
        """The agent's own teardown (vminitd's exit path), then: no fd of the input left open."""
        try:
            await asyncio.wait_for(agent.shutdown(), 2.0)
        except TimeoutError:
            raise Finding("Agent.shutdown did not finish in 2 s") from None
        for t in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            t.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert self.fds_before is not None
        left = _fd_count() - self.fds_before
        if left > 8:
            raise Finding(f"{left} fds left open after the input: {sorted(os.listdir('/proc/self/fd'))[-10:]}")

    def close(self) -> None:
        super().close()
        self._remove_tmp()


def seeds() -> list[bytes]:
    return [b"", bytes(range(64)), b"\x01\x00\x00\x01\x01" + b"\x00" * 40, bytes(range(255, 0, -3)),
            b"\x03\x00\x00\x00\x01\x00\x01" + b"\x01\x02" * 20, b"\x05\x01" + b"\x00\x01" * 40]


TARGET = Target("vminitd", "vminitd's dispatch, servicers and Agent (stub runtime layer, temp state dir) "
                "fed hostile requests of every guest API method",
                VminitdHarness, seeds, weight=1.4, time_bound_s=6.0, memory_bound_mb=64, smoke_inputs=1000)
