"""The agent's container manager: maps the guest API onto runc and the process state machine.

Transport independent (no protobuf here): service.py translates messages to these calls.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal as _signal
import socket
import struct
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.api.contract import SHARES_ROOT

from . import bundle as _bundle
from . import cgroups, mounts, podns
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, RuntimeFailed
from .events import EventLog
from .fdio import wait_readable
from .ids import validate_exec_id, validate_guest_path, validate_id, validate_relative_target, validate_signal
from .reaper import Exit, Reaper
from .runc import Runc, read_pid_file
from .states import ProcessState, State
from .stdio import InputSink, OutputBuffer, pump_output

F_SETPIPE_SZ = 1031           # fcntl.F_SETPIPE_SZ (Linux)
OUTPUT_PIPE_SIZE = 1 << 20    # process stdout/stderr pipes: read up to 1 MiB per wakeup
HOTPLUG_MOUNT_WAIT_S = 30.0   # a just hot-plugged virtiofs device may not be probed yet
_SHARE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
DRAIN_IDLE_TIMEOUT = 5.0     # exit waits for output delivery while the host makes progress
OOM_POLL_INTERVAL = 1.0

log = logging.getLogger(__name__)


async def _mount_hotplugged(source: str, target: str, fstype: str, options: list[str]) -> None:
    """mount(2), waiting (bounded) for a virtiofs tag the host hot-plugged a moment ago: until
    the guest kernel has probed the PCI device, mounting its tag fails with EINVAL ("tag not
    found"). PCIe hotplug under TCG takes a while, longer with several VMs on a busy host."""
    deadline = time.monotonic() + HOTPLUG_MOUNT_WAIT_S
    while True:
        try:
            mounts.mount(source, target, fstype, options)
            return
        except OSError as e:
            if fstype != "virtiofs" or e.errno not in (errno.EINVAL, errno.ENODEV, errno.ENOENT) \
                    or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


@dataclass
class StdioWanted:
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False


@dataclass
class Process:
    container_id: str
    exec_id: str                       # "" = init
    terminal: bool
    wanted: StdioWanted
    state: ProcessState
    pid: int = 0
    exit: Exit | None = None
    outputs: dict[int, OutputBuffer] = field(default_factory=dict)
    stdin: InputSink | None = None
    pty_fd: int | None = None          # a dup of the pty master, for resizes
    exited: asyncio.Event = field(default_factory=asyncio.Event)     # reaped
    reported: asyncio.Event = field(default_factory=asyncio.Event)   # exit event published
    tasks: list[asyncio.Task] = field(default_factory=list)
    process_json: Path | None = None   # execs: the OCI Process file

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    def close_stdio(self) -> None:
        if self.stdin is not None:
            self.stdin.shutdown()
        if self.pty_fd is not None:
            os.close(self.pty_fd)
            self.pty_fd = None
        for t in self.tasks:
            if not t.done():
                t.cancel()


@dataclass
class Container:
    id: str
    bundle: Path
    init: Process
    cgroup: str
    mounted: list[str] = field(default_factory=list)   # rootfs mounts we made (unmount on delete)
    execs: dict[str, Process] = field(default_factory=dict)
    oom_seen: int = 0
    joins_pid_ns: bool = False     # its PID namespace is another container's (a pod's shared one)


class Agent:
    def __init__(self, state_dir: Path, reaper: Reaper, *, runc_binary: str = "runc",
                 events: EventLog | None = None, drain_idle_timeout: float = DRAIN_IDLE_TIMEOUT,
                 cgroup_parent: str = _bundle.CGROUP_PARENT, shares_root: str = SHARES_ROOT) -> None:
        self.state_dir = Path(state_dir)
        self.shares_root = Path(shares_root)
        self.bundles = self.state_dir / "bundles"
        self.sockets = self.state_dir / "c"
        for d in (self.bundles, self.sockets):
            d.mkdir(parents=True, exist_ok=True)
        self.reaper = reaper
        self.runc = Runc(reaper, self.state_dir / "runc", runc_binary, self.state_dir / "logs")
        self.events = events or EventLog()
        self.drain_idle_timeout = drain_idle_timeout
        self.cgroup_parent = cgroup_parent
        self.containers: dict[str, Container] = {}
        # container path → guest file that every later container sees (Network.Configure fills it)
        self.sandbox_files: dict[str, str] = {}
        self._oom_task: asyncio.Task | None = None
        self._sock_seq = 0
        self._locks: dict[str, asyncio.Lock] = {}

    # --- lookup -------------------------------------------------------------------------

    def _container(self, id: str) -> Container:
        validate_id(id)
        c = self.containers.get(id)
        if c is None:
            raise NotFound(f"container {id} not created")
        return c

    def process(self, id: str, exec_id: str = "") -> Process:
        c = self._container(id)
        validate_exec_id(exec_id)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise NotFound(f"exec {exec_id} of container {id} does not exist")
        return p

    def _lock(self, id: str) -> asyncio.Lock:
        return self._locks.setdefault(id, asyncio.Lock())

    # --- stdio setup ----------------------------------------------------------------------

    def _console_socket(self) -> tuple[socket.socket, Path]:
        self._sock_seq += 1
        path = self.sockets / f"{self._sock_seq}.sock"
        if len(str(path)) > 100:
            raise InvalidArgument(f"state dir too long for a console socket path: {path}")
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(1)
        s.setblocking(False)
        return s, path

    @staticmethod
    async def _receive_pty(sock: socket.socket) -> int:
        while True:
            try:
                conn, _ = sock.accept()
                break
            except BlockingIOError:
                await wait_readable(sock.fileno())
        with conn:
            conn.setblocking(False)
            while True:
                try:
                    _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                    break
                except BlockingIOError:
                    await wait_readable(conn.fileno())
        if not fds:
            raise RuntimeFailed("runc did not send the pty master over the console socket")
        return fds[0]

    def _pipes(self, p: Process) -> tuple[tuple[int | None, int | None, int | None], list[int], dict]:
        """Pipes for a non-tty process: (fds for runc, our copies of runc's ends to close after
        spawn, our ends)."""
        ours: dict[str, int] = {}
        child: list[int | None] = [None, None, None]
        theirs: list[int] = []
        if p.wanted.stdin:
            r, w = os.pipe()
            child[0], ours["stdin"] = r, w
            theirs.append(r)
        for i, name in ((1, "stdout"), (2, "stderr")):
            if getattr(p.wanted, name):
                r, w = os.pipe()
                with contextlib.suppress(OSError):   # bigger reads per wakeup; best effort
                    fcntl.fcntl(r, F_SETPIPE_SZ, OUTPUT_PIPE_SIZE)
                child[i], ours[name] = w, r
                theirs.append(w)
        return (child[0], child[1], child[2]), theirs, ours

    async def _spawn(self, p: Process, run) -> None:
        """Run `run(stdio, console_socket_path)` (runc create/exec) with p's stdio, then attach
        the process's output and input to buffers and start the exit monitor."""
        console = None
        ours: dict[str, int] = {}
        theirs: list[int] = []
        if p.terminal:
            console = self._console_socket()
            stdio: tuple[int | None, int | None, int | None] = (None, None, None)
        else:
            stdio, theirs, ours = self._pipes(p)
        try:
            await run(stdio, console[1] if console else None)
            if console is not None:
                master = await asyncio.wait_for(self._receive_pty(console[0]), 10)
                p.pty_fd = master
                buf = OutputBuffer()
                p.outputs[1] = buf
                p.tasks.append(asyncio.ensure_future(pump_output(os.dup(master), buf)))
                if p.wanted.stdin:
                    p.stdin = InputSink(os.dup(master), tty=True)
            else:
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    if name in ours:
                        buf = OutputBuffer()
                        p.outputs[fd] = buf
                        p.tasks.append(asyncio.ensure_future(pump_output(ours.pop(name), buf)))
                if "stdin" in ours:
                    p.stdin = InputSink(ours.pop("stdin"))
        finally:
            for fd in theirs:
                os.close(fd)
            for fd in ours.values():
                os.close(fd)
            if console is not None:
                console[0].close()
                try:
                    console[1].unlink()
                except FileNotFoundError:
                    pass

    # --- create / start / exec --------------------------------------------------------------

    async def create(self, id: str, spec: bytes, *, rootfs_path: str = "", rootfs_mounts: list[dict] | None = None,
                     readonly: bool = False, terminal: bool = False, stdin: bool = False,
                     stdout: bool = False, stderr: bool = False, shares: list[dict] | None = None) -> int:
        """`shares`: virtiofs tags mounted at <shares_root>/<id>/<target> first (the host
        shared the container's bind sources there and pointed the spec's binds at them)."""
        validate_id(id)
        async with self._lock(id):
            if id in self.containers:
                raise AlreadyExists(f"container {id} already exists")
            parsed = _bundle.parse_spec(spec)
            bdir = self.bundles / id
            if bdir.exists():
                shutil.rmtree(bdir)
            bdir.mkdir(parents=True)
            mounted: list[str] = []
            try:
                if rootfs_mounts:
                    root = bdir / "rootfs"
                    root.mkdir()
                    for m in rootfs_mounts:
                        target = root / validate_relative_target(m.get("target", ""))
                        target.mkdir(parents=True, exist_ok=True)
                        await _mount_hotplugged(m.get("source", ""), str(target), m.get("type", ""),
                                                list(m.get("options", [])))
                        mounted.append(str(target))
                    rootfs = str(root)
                elif rootfs_path:
                    rootfs = validate_guest_path(rootfs_path, "rootfs path")
                    if not os.path.isdir(rootfs):
                        raise InvalidArgument(f"rootfs {rootfs} is not a directory in the guest")
                else:
                    raise InvalidArgument("create needs a rootfs path or rootfs mounts")
                for m in shares or []:
                    name, fstype = m.get("target", ""), m.get("type", "")
                    if not name or len(name) > 64 or not set(name) <= _SHARE_NAME_CHARS:
                        raise InvalidArgument(f"share target {name!r}: want one name of [A-Za-z0-9_-]")
                    if fstype != "virtiofs":
                        raise InvalidArgument(f"share {name}: type must be virtiofs (got {fstype!r})")
                    target = self.shares_root / id / name
                    target.mkdir(parents=True, exist_ok=True)
                    await _mount_hotplugged(m.get("source", ""), str(target), fstype, list(m.get("options", [])))
                    mounted.append(str(target))
                adapted, notes = _bundle.adapt_spec(parsed, id, rootfs, terminal=terminal,
                                                    readonly=readonly or None,
                                                    cgroup_parent=self.cgroup_parent,
                                                    sandbox_files=self.sandbox_files,
                                                    inits=self._live_inits())
                net_sysctls = podns.split_net_sysctls(adapted["linux"])
                pinned = _bundle.pin_oci_version(adapted, self.runc.binary)
                if pinned:
                    notes.append(pinned)
                for n in notes:
                    log.debug(f"{id}: {n}")
                podns.apply_sysctls(net_sysctls)     # the VM's network namespace is the pod's
                _bundle.write_json(bdir / "config.json", adapted)
                init = Process(id, "", terminal, StdioWanted(stdin, stdout, stderr), ProcessState(id))
                c = Container(id, bdir, init, _bundle.cgroup_path(id, self.cgroup_parent), mounted,
                              joins_pid_ns=podns.joins_pid_namespace(adapted))
                pid_file = bdir / "init.pid"
                since = time.monotonic()

                async def run(stdio, console):
                    await self.runc.create(id, bdir, pid_file, console_socket=console, stdio=stdio)

                await self._spawn(init, run)
                init.pid = read_pid_file(pid_file)
            except BaseException:
                for t in reversed(mounted):
                    try:
                        mounts.umount(t)
                    except OSError as e:
                        log.warning(f"cleanup after failed create of {id}: {e}")
                self._remove_shares_dir(id)
                if id not in self.containers:
                    try:
                        await self.runc.delete(id, force=True)
                    except Exception:
                        pass
                    shutil.rmtree(bdir, ignore_errors=True)
                raise
            self.containers[id] = c
            init.tasks.append(asyncio.ensure_future(self._monitor(c, init, self.reaper.watch(init.pid, since))))
            self._ensure_oom_watch()
            return init.pid

    async def start(self, id: str, exec_id: str = "") -> int:
        c = self._container(id)
        p = self.process(id, exec_id)
        async with self._lock(id):
            p.state.check("start")
            if not exec_id:
                await self.runc.start(id)
                p.state.apply("started")
                return p.pid
            c.init.state.check("exec")
            pid_file = c.bundle / f"exec-{exec_id}.pid"
            since = time.monotonic()
            process_json = p.process_json
            assert process_json is not None  # exec() wrote it before the process could start

            async def run(stdio, console):
                await self.runc.exec(id, process_json, pid_file, console_socket=console, stdio=stdio)

            await self._spawn(p, run)
            p.pid = read_pid_file(pid_file)
            p.state.apply("started")
            p.tasks.append(asyncio.ensure_future(self._monitor(c, p, self.reaper.watch(p.pid, since))))
            return p.pid

    async def exec(self, id: str, exec_id: str, process: bytes, *, terminal: bool = False,
                   stdin: bool = False, stdout: bool = False, stderr: bool = False) -> None:
        c = self._container(id)
        validate_id(exec_id, "exec id")
        if exec_id in c.execs:
            raise AlreadyExists(f"exec {exec_id} already exists in container {id}")
        c.init.state.check("exec")
        spec = _bundle.adapt_process(_bundle.parse_spec(process, "exec process"), terminal=terminal)
        p = Process(id, exec_id, terminal, StdioWanted(stdin, stdout, stderr), ProcessState(f"{id}/{exec_id}"))
        p.process_json = c.bundle / f"exec-{exec_id}.json"
        _bundle.write_json(p.process_json, spec)
        c.execs[exec_id] = p

    # --- exits ----------------------------------------------------------------------------

    async def _monitor(self, c: Container, p: Process, exited: asyncio.Future) -> None:
        ex: Exit = await exited
        p.exit = ex
        p.state.apply("exited")
        p.exited.set()
        log.debug(f"{p.name}: pid {ex.pid} exited with {ex.status}")
        if not p.exec_id:
            if c.joins_pid_ns:
                # The PID namespace outlives this init: end the container's other processes
                # (its execs, their children) as the kernel would have with its own namespace.
                await self._kill_rest(c)
            # The init's exit comes after the exits of its execs (the kernel kills them with
            # the init's pid namespace); bounded like the output drain.
            running = [e for e in c.execs.values() if e.pid and not e.reported.is_set()]
            if running:
                await asyncio.wait([asyncio.ensure_future(e.reported.wait()) for e in running],
                                   timeout=self.drain_idle_timeout)
            self._check_oom(c)
        for buf in p.outputs.values():
            if not await buf.wait_delivered(self.drain_idle_timeout):
                log.debug(f"{p.name}: output not delivered within {self.drain_idle_timeout}s idle; reporting exit")
        self.events.publish("exit", id=c.id, exec_id=p.exec_id, pid=ex.pid, exit_status=ex.status,
                            exited_at_ns=ex.at_ns)
        p.reported.set()

    async def _kill_rest(self, c: Container) -> None:
        try:
            await self.runc.kill(c.id, int(_signal.SIGKILL), all=True)
        except Exception as e:      # nothing left to kill is the usual case
            log.debug(f"{c.id}: killing the rest after the init's exit: {e}")

    def _live_inits(self) -> dict[int, str]:
        """pid -> container id of every container init not yet reaped: the namespaces a new
        container may join."""
        return {c.init.pid: c.id for c in self.containers.values() if c.init.pid and c.init.exit is None}

    async def wait(self, id: str, exec_id: str = "") -> tuple[int, int, int]:
        p = self.process(id, exec_id)
        await p.reported.wait()
        assert p.exit is not None
        return p.exit.status, p.exit.at_ns, p.pid

    # --- signals, delete --------------------------------------------------------------------

    async def kill(self, id: str, exec_id: str = "", signal: int = 15, all: bool = False) -> None:
        p = self.process(id, exec_id)
        validate_signal(signal)
        p.state.check("kill")
        if exec_id:
            try:
                os.kill(p.pid, signal)
            except ProcessLookupError:
                raise NotFound(f"{p.name}: process already finished") from None
            return
        try:
            await self.runc.kill(id, signal, all=all)
        except RuntimeFailed as e:
            if "not running" in str(e) or "process already finished" in str(e):
                raise NotFound(f"{p.name}: process already finished") from None
            raise

    async def delete(self, id: str, exec_id: str = "") -> tuple[int, int, int]:
        c = self._container(id)
        p = self.process(id, exec_id)
        async with self._lock(id):
            p.state.check("delete")
            if exec_id:
                p.state.apply("deleted")
                p.close_stdio()
                del c.execs[exec_id]
                if p.process_json:
                    p.process_json.unlink(missing_ok=True)
                return self._exit_triple(p)
            if p.state.state == State.CREATED and p.exit is None:
                # Never started: runc delete --force kills the waiting init.
                await self.runc.delete(id, force=True)
                try:
                    await asyncio.wait_for(p.exited.wait(), 10)
                except asyncio.TimeoutError:
                    log.warning(f"delete {id}: the never-started init did not exit after runc delete --force")
            else:
                await self.runc.delete(id, force=True)
            p.state.apply("deleted")
            for e in c.execs.values():
                e.close_stdio()
            p.close_stdio()
            self._unmount(c)
            shutil.rmtree(c.bundle, ignore_errors=True)
            for f in (self.runc.log_dir / f"{id}.log.json",):
                f.unlink(missing_ok=True)
            del self.containers[id]
            return self._exit_triple(p)

    @staticmethod
    def _exit_triple(p: Process) -> tuple[int, int, int]:
        if p.exit is None:
            return p.pid, 255, time.time_ns()
        return p.pid, p.exit.status, p.exit.at_ns

    def _unmount(self, c: Container) -> None:
        for t in reversed(c.mounted):
            try:
                mounts.umount(t)
            except OSError as e:
                log.warning(f"delete {c.id}: {e}")
        c.mounted.clear()
        self._remove_shares_dir(c.id)

    def _remove_shares_dir(self, id: str) -> None:
        d = self.shares_root / id
        with contextlib.suppress(OSError):     # only empty mount points; never recurse into a share
            for sub in d.iterdir():
                sub.rmdir()
            d.rmdir()

    # --- state and friends -------------------------------------------------------------------

    def state(self, id: str, exec_id: str = "") -> dict[str, Any]:
        c = self._container(id)
        p = self.process(id, exec_id)
        st = p.state.state
        if st == State.RUNNING and c.init.state.state == State.PAUSED:
            st = State.PAUSED
        return {"id": id, "exec_id": exec_id, "pid": p.pid, "status": int(st), "terminal": p.terminal,
                "exit_status": p.exit.status if p.exit else 0,
                "exited_at_ns": p.exit.at_ns if p.exit else 0,
                "stdin": p.wanted.stdin, "stdout": p.wanted.stdout, "stderr": p.wanted.stderr}

    async def pids(self, id: str) -> list[tuple[int, str]]:
        c = self._container(id)
        if c.init.state.state in (State.STOPPED, State.DELETED):
            return []
        by_pid = {e.pid: e.exec_id for e in c.execs.values() if e.pid}
        return [(pid, by_pid.get(pid, "")) for pid in await self.runc.ps(id)]

    async def pause(self, id: str) -> None:
        c = self._container(id)
        async with self._lock(id):
            c.init.state.check("pause")
            await self.runc.pause(id)
            c.init.state.apply("paused")

    async def resume(self, id: str) -> None:
        c = self._container(id)
        async with self._lock(id):
            c.init.state.check("resume")
            await self.runc.resume(id)
            c.init.state.apply("resumed")

    async def update(self, id: str, resources: bytes) -> None:
        c = self._container(id)
        c.init.state.check("update")
        res = _bundle.parse_spec(resources, "LinuxResources")
        await self.runc.update(id, res)

    async def stats(self, id: str) -> tuple[dict[str, int], dict]:
        c = self._container(id)
        c.init.state.check("stats")
        raw = await self.runc.stats(id)
        out = cgroups.summarize_stats(raw)
        out["oom_kills"] = cgroups.oom_kill_count(c.cgroup)
        return out, raw

    def close_stdin(self, id: str, exec_id: str = "") -> None:
        p = self.process(id, exec_id)
        if p.stdin is not None:
            p.stdin.close()

    def resize_pty(self, id: str, exec_id: str, width: int, height: int) -> None:
        p = self.process(id, exec_id)
        if p.pty_fd is None:
            raise FailedPrecondition(f"{p.name} has no terminal")
        # 0x0 is a valid size ("unknown": what ctr sends from a terminal that has none), as in runc
        if not (0 <= width < 65536 and 0 <= height < 65536):
            raise InvalidArgument(f"invalid terminal size {width}x{height}")
        fcntl.ioctl(p.pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def output(self, id: str, exec_id: str, fd: int) -> OutputBuffer:
        p = self.process(id, exec_id)
        buf = p.outputs.get(fd)
        if buf is None:
            raise NotFound(f"{p.name} has no {'stdout' if fd == 1 else 'stderr'} stream "
                           f"({'tty: use stdout' if p.terminal and fd == 2 else 'not requested'})")
        return buf

    def input(self, id: str, exec_id: str) -> InputSink:
        p = self.process(id, exec_id)
        if p.stdin is None:
            raise NotFound(f"{p.name} has no stdin stream (not requested)")
        return p.stdin

    # --- OOM ----------------------------------------------------------------------------------

    def _check_oom(self, c: Container) -> None:
        n = cgroups.oom_kill_count(c.cgroup)
        if n > c.oom_seen:
            c.oom_seen = n
            self.events.publish("oom", id=c.id)

    def _ensure_oom_watch(self) -> None:
        if self._oom_task is None or self._oom_task.done():
            self._oom_task = asyncio.ensure_future(self._oom_loop())

    async def _oom_loop(self) -> None:
        # memory.events is pollable, but one cheap read per container per second is simpler
        # and bounded; the exit path checks again so an OOM is always reported before its exit.
        while self.containers:
            await asyncio.sleep(OOM_POLL_INTERVAL)
            for c in list(self.containers.values()):
                if c.init.state.state in (State.RUNNING, State.PAUSED):
                    self._check_oom(c)

    # --- shutdown ---------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Kill and delete every container (agent exit / VM power-off)."""
        for id in list(self.containers):
            c = self.containers[id]
            try:
                if c.init.state.state == State.PAUSED:
                    await self.runc.resume(id)
                if c.init.state.state in (State.CREATED, State.RUNNING, State.PAUSED):
                    await self.runc.kill(id, int(_signal.SIGKILL), all=True)
            except Exception as e:
                log.debug(f"shutdown kill {id}: {e}")
            try:
                await asyncio.wait_for(c.init.exited.wait(), 3)
            except asyncio.TimeoutError:
                pass
            try:
                await self.runc.delete(id, force=True)
            except Exception as e:
                log.warning(f"shutdown delete {id}: {e}")
            for ex in c.execs.values():
                ex.close_stdio()
            c.init.close_stdio()
            self._unmount(c)
            shutil.rmtree(c.bundle, ignore_errors=True)
            del self.containers[id]
        if self._oom_task is not None:
            self._oom_task.cancel()
        cgroups.remove_parent(self.cgroup_parent)
