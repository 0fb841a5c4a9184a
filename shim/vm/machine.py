"""One QEMU VM: start, watch, stop — with a clear run state.

    CREATED ──start()──▶ BOOTING ──ready──▶ RUNNING ──stop()──▶ STOPPING ──▶ STOPPED
                            │                  │
                            └──boot failure────┴──QEMU died──▶ FAILED  (stop() still cleans up)

`start(probe)` execs QEMU in its own process group, connects QMP, and waits until the guest is
ready: `probe()` (the caller's agent ping; the VM layer knows nothing of the agent API) returns
without raising, or — without a probe — the console shows `config.ready_marker`. A boot
watchdog kills a guest that is not ready within `timeouts.boot_s` and raises `VMBootError`
with the QEMU exit status and the console tail. The boot timeline is always logged and kept in
`vm.timeline`.

QEMU dying at any time is noticed by a task waiting on the process (and the QMP connection
dropping): `vm.died` is set, `await vm.wait_died()` returns a `VMExit`, callbacks run.

`stop()` is idempotent and safe from any state and on cancellation: graceful (caller's
callable or ACPI powerdown, bounded) → QMP quit → SIGKILL to the group → reap; then every
helper process, socket, log and pidfile the VM made is removed, and the CID released.
`kill_from_state(state_dir)` does the same for a VM whose shim crashed, from vm.json.

VM templates (shim/vm/template.py): `start(probe, template=TemplateArgv(...))` boots with guest
RAM in a file; `save_state(path)` then pauses the guest and writes its device state (RAM in the
shared file is skipped: x-ignore-shared). `start(probe, template=..., restore=Restore(...))`
starts a clone: QEMU waits (`-incoming defer`), the state is loaded over QMP (`migrate-incoming
fd:`), the guest runs on, and the probe decides readiness as for a cold boot.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp.protocol import Runstate

from spinbox.shim import releasers
from spinbox.shim.errors import HostError

from . import accel as accel_mod
from . import confine
from . import hostcgroup
from . import jail as jail_mod
from . import logsink
from . import procinfo
from . import uids
from .cid import DEFAULT_RUNTIME_DIR, CIDLease, allocate_cid
from .config import VMConfig
from .console import ConsoleLog
from .paths import VMPaths
from .qemu_args import PassedFds, Resolved, TemplateArgv, build_argv
from .qmp import QMPClient

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[object]]
Cleanup = Callable[[], Awaitable[None]]
STATE_FILE_VERSION = 1


@dataclass(frozen=True)
class Restore:
    """Start from a saved device state instead of booting (the argv's TemplateArgv says where
    the RAM comes from). `pass_fds` are inherited by QEMU (a memfd behind /proc/self/fd/N)."""
    state_file: Path
    ignore_shared: bool = True
    pass_fds: tuple[int, ...] = ()


class VMState(enum.Enum):
    CREATED = "created"
    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class VMError(HostError):
    """QEMU could not be started, driven or stopped."""


class VMStateError(VMError):
    pass


class _EarlyHang(Exception):
    """Internal: an attempt printed nothing in time (retried if attempts remain)."""


class VMBootError(VMError):
    """The guest did not become ready. Carries what is known about why."""

    def __init__(self, message: str, *, timeline: dict[str, float], returncode: int | None,
                 console_tail: list[str], qemu_log_tail: list[str], timed_out: bool = False):
        parts = [message]
        if qemu_log_tail:
            parts.append("QEMU output:\n  " + "\n  ".join(qemu_log_tail))
        parts.append("console tail:\n  " + ("\n  ".join(console_tail) if console_tail else "(empty)"))
        super().__init__("\n".join(parts))
        self.timeline = timeline
        self.returncode = returncode
        self.console_tail = console_tail
        self.qemu_log_tail = qemu_log_tail
        self.timed_out = timed_out


@dataclass(frozen=True)
class VMExit:
    returncode: int
    expected: bool       # True when stop() (or the caller's shutdown) ended it
    reason: str          # human readable: "exit status 0", "killed by SIGKILL"
    t: float             # host seconds since QEMU exec


def _listening_socket(path: Path) -> int:
    """A unix socket listening at `path` (0600), as an fd for QEMU to serve: a jailed QEMU
    cannot create one (it has no writable dir), and clients connect by path as before."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        s.bind(str(path))
        os.chmod(path, 0o600)
        s.listen(16)
    except BaseException:
        s.close()
        raise
    return s.detach()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class VM:
    def __init__(self, config: VMConfig, state_dir: str | os.PathLike[str], *, name: str = "spinbox",
                 cid_runtime_dir: str | os.PathLike[str] = DEFAULT_RUNTIME_DIR,
                 uid_runtime_dir: str | os.PathLike[str] = uids.DEFAULT_RUNTIME_DIR,
                 accel: accel_mod.Choice | None = None, transport: accel_mod.Choice | None = None):
        self.config = config.validate()
        self.name = name
        self.paths = VMPaths(Path(state_dir), config.console_log)
        self._cid_runtime_dir = Path(cid_runtime_dir)
        self.accel = accel            # resolved at start() unless given
        self.transport = transport
        self._state = VMState.CREATED
        self._state_changed = asyncio.Event()
        self._cid: CIDLease | None = None
        self._uid_runtime_dir = Path(uid_runtime_dir)
        self._uid: uids.UIDLease | None = None     # the jailed QEMU's own uid (shim/vm/jail.py)
        self.jail_problem: str | None = None        # why QEMU runs unjailed although configured
        self._proc: asyncio.subprocess.Process | None = None
        self._pid_start: int | None = None
        self._qmp: QMPClient | None = None
        self._t0 = 0.0
        self.timeline: dict[str, float] = {}
        self.console: ConsoleLog | None = None
        self._console_reader: logsink.FdReader | None = None
        self._qemu_output: logsink.ChildOutput | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._exit_task: asyncio.Task[VMExit] | None = None
        self._stop_task: asyncio.Task[VMExit | None] | None = None
        self._stopping = False
        self.exit: VMExit | None = None
        self.died = asyncio.Event()            # QEMU exited without stop() asking for it
        self.exited = asyncio.Event()          # QEMU exited, for any reason
        self.qmp_lost = asyncio.Event()        # the QMP connection dropped while QEMU was up
        self._exit_callbacks: list[Callable[[VMExit], None]] = []
        self._cleanups: list[tuple[str, Cleanup]] = []
        self._helpers: dict[str, dict[str, Any]] = {}   # persisted helper processes (virtiofsd)
        self._created_state_dir = False
        self._last_probe_error: BaseException | None = None
        self._retrying = False
        self.fd_lock = asyncio.Lock()   # SCM_RIGHTS + getfd must not interleave with another fd
        self.used_ports: set[str] = set()  # pcie-root-ports taken by hot-plugged devices
        self.template: TemplateArgv | None = None
        self.restore: Restore | None = None

    # ------------------------------------------------------------------ properties
    @property
    def state(self) -> VMState:
        return self._state

    def _set_state(self, new: VMState) -> None:
        if new is not self._state:
            log.debug("vm %s: %s -> %s", self.name, self._state.value, new.value)
            self._state = new
            self._state_changed.set()
            self._state_changed = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def cid(self) -> int | None:
        return self._cid.cid if self._cid else None

    @property
    def qemu_uid(self) -> int | None:
        """The uid QEMU runs as when jailed (None: as root)."""
        return self._uid.uid if self._uid else None

    @property
    def jail_root(self) -> Path:
        """The empty dir the jail's root is mounted on (in QEMU's mount namespace only)."""
        return self.paths.state_dir / "jail"

    @property
    def qmp(self) -> QMPClient:
        if self._qmp is None or self._qmp.runstate is not Runstate.RUNNING:
            raise VMStateError(f"vm {self.name}: no QMP connection (state {self._state.value})")
        return self._qmp

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def add_exit_callback(self, cb: Callable[[VMExit], None]) -> None:
        """Called once when QEMU exits (expected or not); right away if it already has."""
        if self.exit is not None:
            cb(self.exit)
        else:
            self._exit_callbacks.append(cb)

    async def wait_died(self) -> VMExit:
        """Returns only if QEMU exits unexpectedly (the shim fails its tasks then)."""
        await self.died.wait()
        assert self.exit is not None
        return self.exit

    def add_cleanup(self, what: str, fn: Cleanup) -> None:
        """Run `fn` when the VM stops (after QEMU is gone), newest first."""
        self._cleanups.append((what, fn))

    # ------------------------------------------------------------------ QMP
    async def execute(self, cmd: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        if self._state not in (VMState.BOOTING, VMState.RUNNING, VMState.STOPPING):
            raise VMStateError(f"vm {self.name}: cannot run QMP {cmd} in state {self._state.value}")
        return await asyncio.wait_for(self.qmp.execute(cmd, arguments),
                                      timeout or self.config.timeouts.qmp_command_s)

    # ------------------------------------------------------------------ start
    async def start(self, probe: Probe | None = None, *, template: TemplateArgv | None = None,
                    restore: Restore | None = None) -> dict[str, float]:
        """Boot and wait until ready; returns the timeline. On any failure QEMU is gone and
        everything cleaned up before the exception leaves (state FAILED). `template`: RAM in a
        file + vmgenid (a template or a clone); `restore`: load that saved state (a clone)."""
        if self._state is not VMState.CREATED:
            raise VMStateError(f"vm {self.name}: start() in state {self._state.value} (a VM starts once)")
        if restore is not None and (template is None or not template.incoming):
            raise VMStateError(f"vm {self.name}: a restore needs a TemplateArgv with incoming=True")
        self.template, self.restore = template, restore
        self._set_state(VMState.BOOTING)
        try:
            self._prepare()
            # a restored guest prints nothing: the early-hang watchdog is for cold boots only
            attempts = 1 if restore is not None else self.config.timeouts.boot_attempts
            for attempt in range(1, attempts + 1):
                await self._exec()
                try:
                    await self._boot(probe)
                    break
                except _EarlyHang as hang:
                    if attempt == attempts:
                        raise TimeoutError(f"{hang} (attempt {attempt} of {attempts})") from None
                    log.warning("vm %s: %s; booting again (attempt %d of %d)", self.name, hang, attempt + 1,
                                attempts)
                    await self._reset_for_retry()
        except BaseException as exc:
            await self._fail_boot(exc)
            raise
        self._set_state(VMState.RUNNING)
        self.timeline["ready"] = self.elapsed()
        self._log_timeline()
        return dict(self.timeline)

    def _prepare(self) -> None:
        c = self.config
        if self.accel is None:
            self.accel = accel_mod.select_accel(c.accel)
        if self.transport is None:
            self.transport = accel_mod.select_transport(c.transport)
        log.info("vm %s: accel %s; transport %s", self.name, self.accel, self.transport)
        if not self.paths.state_dir.exists():
            self.paths.state_dir.mkdir(parents=True, mode=0o700)
            self._created_state_dir = True
        for p in (self.paths.qmp_socket, self.paths.agent_socket, self.paths.pidfile):
            p.unlink(missing_ok=True)  # stale ones from an earlier VM in this dir
        uid_range = range(c.qemu_uid_base, c.qemu_uid_base + c.qemu_uid_count)
        if self.transport.value == "vsock":
            self._cid = allocate_cid(self._cid_runtime_dir, qemu_binaries=(c.qemu_binary,), qemu_uids=uid_range)
        if c.qemu_jail and self._uid is None:
            self._uid = uids.allocate_uid(self._uid_runtime_dir, base=c.qemu_uid_base, count=c.qemu_uid_count)
            self.jail_root.mkdir(mode=0o700, exist_ok=True)

    def _jail_setup(self) -> tuple[jail_mod.JailSpec | None, list[int], PassedFds | None]:
        """The jail QEMU starts in and the fds the shim opens for it (the caller closes its
        copies once QEMU has them). Unjailed, with one warning, where it cannot work here."""
        if self._uid is None:
            return None, [], None
        try:
            spec = jail_mod.jail_spec(self.config, root=self.jail_root, uid=self._uid.uid,
                                      accel=self.accel.value,  # type: ignore[union-attr]
                                      nofile=confine.QEMU_NOFILE,
                                      parent=os.getpid() if self.config.die_with_parent else None)
            if not self.config.qemu_rlimits:
                spec = dataclasses.replace(spec, rlimits={})
        except jail_mod.JailError as e:
            self.jail_problem = str(e)
            log.warning("vm %s: QEMU runs unjailed (as root): %s", self.name, e)
            self._uid.release()
            self._uid = None
            return None, [], None
        held: list[int] = []
        try:
            held.append(_listening_socket(self.paths.qmp_socket))
            agent = vhost = None
            if self.transport.value == "virtio-serial":  # type: ignore[union-attr]
                agent = _listening_socket(self.paths.agent_socket)
                held.append(agent)
            else:
                vhost = os.open("/dev/vhost-vsock", os.O_RDWR | os.O_CLOEXEC)
                held.append(vhost)
        except BaseException:
            for fd in held:
                os.close(fd)
            raise
        return spec, held, PassedFds(qmp=held[0], agent=agent, vhost_vsock=vhost)

    async def _exec(self) -> None:
        # the console: a socketpair, QEMU's end inherited; ours read on the loop into the
        # bounded console file (the guest writes it at will, logsink's docstring)
        spec, held, fds = self._jail_setup()
        ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = build_argv(self.config, self.paths,
                          Resolved(self.accel.value, self.transport.value, self.cid),  # type: ignore[union-attr]
                          name=self.name, template=self.template, console_fd=qemus.fileno(), fds=fds)
        if spec is not None:
            # rlimits and the parent-death signal are set by the launcher, after the uid change
            argv = jail_mod.launcher_argv(spec, argv)
            preexec = None
        else:
            # confinement (shim/vm/confine.py): no core dumps of guest RAM, bounded fds
            preexec = confine.compose_preexec(
                procinfo.set_pdeathsig if self.config.die_with_parent else None,
                (lambda: confine.set_rlimits(confine.qemu_rlimits())) if self.config.qemu_rlimits else None)
        log.debug("vm %s: exec %s", self.name, " ".join(argv))
        self._close_logs()             # a retried boot's
        self.paths.console_log.parent.mkdir(parents=True, exist_ok=True)
        console_file = logsink.RotatingFile(self.paths.console_log, self.config.console_log_max_bytes)
        self._qemu_output = logsink.ChildOutput(self.paths.qemu_log, logsink.QEMU_LOG_MAX_BYTES)
        pass_fds = (qemus.fileno(), *held, *(self.restore.pass_fds if self.restore else ()))
        try:
            self._t0 = time.monotonic()
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=self._qemu_output.child_fd,
                stderr=asyncio.subprocess.STDOUT,
                process_group=0,  # our signals (Ctrl-C to the shim's group) never reach it
                pass_fds=pass_fds, preexec_fn=preexec)
        except BaseException:
            ours.close()
            console_file.close()
            raise
        finally:
            qemus.close()              # QEMU's now: its exit is our EOF
            for fd in held:            # QEMU's listening sockets (and vhost fd) now
                os.close(fd)
            self._qemu_output.started()
        self.timeline = {"qemu_exec": 0.0}
        self._pid_start = procinfo.start_time(self._proc.pid)
        console = ConsoleLog(self._t0, file=console_file)
        self._console_reader = logsink.FdReader(ours.detach(), console.feed, on_eof=console_file.close)
        console.pull = self._console_reader.read_available
        self.console = console
        self._persist()
        self._exit_task = asyncio.create_task(self._watch_process(), name=f"vm-{self.name}-wait")
        hostcgroup.join(self.config.host_cgroup_dirs, self._proc.pid)   # tracked first; before the boot

    def qemu_log_tail(self, n: int = 20) -> list[str]:
        if self._qemu_output is not None:
            return self._qemu_output.tail(n)
        return logsink.tail_lines(self.paths.qemu_log, n)

    async def _drain_logs(self, timeout: float = 0.5) -> None:
        """After QEMU is gone: take in the last of its console and output (bounded)."""
        for reader in (self._console_reader, self._qemu_output.reader if self._qemu_output else None):
            if reader is not None:
                await reader.wait_eof(timeout)

    def _close_logs(self) -> None:
        if self._console_reader is not None:
            self._console_reader.read_available()
            self._console_reader.close()
        if self._qemu_output is not None:
            self._qemu_output.close()

    async def _reset_for_retry(self) -> None:
        """Throw away a hung attempt (QEMU, QMP, watchers) but keep the CID and state dir."""
        self._retrying = True
        self._kill_group()
        await self._reap()
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self.exit = None
        self.exited = asyncio.Event()
        self.died = asyncio.Event()
        self.qmp_lost = asyncio.Event()
        self._stopping = False
        self._retrying = False
        for p in (self.paths.qmp_socket, self.paths.agent_socket, self.paths.pidfile):
            p.unlink(missing_ok=True)

    def _persist(self) -> None:
        """vm.json: enough for kill_from_state() after a shim crash."""
        if self._proc is None:
            return
        _write_json_atomic(self.paths.state_file, {
            "version": STATE_FILE_VERSION,
            "name": self.name,
            "pid": self._proc.pid,
            "start_time": self._pid_start,
            "tag": str(self.paths.qmp_socket),   # appears in QEMU's argv: proves it is ours
            "cid": self.cid,
            "cid_lock": str(self._cid.path) if self._cid else None,
            "uid": self.qemu_uid,          # a jailed QEMU: kill_from_state checks it runs as this
            "uid_lock": str(self._uid.path) if self._uid else None,
            "helpers": self._helpers,
            "files": [str(p) for p in self._owned_files()],
        })

    def _owned_files(self) -> list[Path]:
        p = self.paths
        rotated = logsink.rotated
        files = [p.qmp_socket, p.agent_socket, p.pidfile, p.qemu_log, rotated(p.qemu_log), p.state_file]
        if not self.config.keep_console_log:
            files += [p.console_log, rotated(p.console_log)]
        for key in self._helpers:      # keys are "virtiofsd-<tag>" (devices.add_virtiofs)
            tag = key.removeprefix("virtiofsd-")
            files += [p.virtiofs_socket(tag), p.virtiofsd_log(tag), rotated(p.virtiofsd_log(tag))]
        return files

    async def _watch_process(self) -> VMExit:
        assert self._proc is not None
        rc = await self._proc.wait()
        expected = self._stopping
        ex = VMExit(rc, expected, procinfo.describe_returncode(rc), self.elapsed())
        self.exit = ex
        if not expected:
            log.error("vm %s: QEMU (pid %d) exited unexpectedly after %.2f s: %s", self.name,
                      self._proc.pid, ex.t, ex.reason)
            if self._state is VMState.RUNNING:
                self._set_state(VMState.FAILED)
            self.died.set()
        else:
            log.info("vm %s: QEMU exited (%s)", self.name, ex.reason)
        self.exited.set()
        if self._retrying:
            return ex  # a hung boot attempt we killed: not the VM's exit
        for cb in self._exit_callbacks:
            try:
                cb(ex)
            except Exception:  # a callback must not break the others
                log.exception("vm %s: exit callback failed", self.name)
        return ex

    async def _connect_qmp(self, deadline: float) -> None:
        client = QMPClient(self.name)
        sock = str(self.paths.qmp_socket)
        delay = 0.001  # QEMU creates the socket within ~40 ms; poll tightly, back off a little
        while True:
            if not self.alive:
                raise VMError("QEMU exited before its QMP socket came up")
            if os.path.exists(sock):
                try:
                    await client.connect(sock)
                    break
                except Exception as e:  # ConnectError: not listening yet
                    last = e
            if time.monotonic() > deadline:
                raise VMError(f"QMP socket {sock} not ready within {self.config.timeouts.qmp_connect_s} s"
                              + (f" ({last})" if "last" in locals() else ""))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self._qmp = client
        self.timeline["qmp_ready"] = self.elapsed()
        self._spawn(self._watch_qmp(client), "qmp-watch")

    async def _watch_qmp(self, client: QMPClient) -> None:
        while True:
            state = await client.runstate_changed()
            if state in (Runstate.DISCONNECTING, Runstate.IDLE):
                if not self._stopping:
                    log.warning("vm %s: QMP connection lost", self.name)
                    self.qmp_lost.set()
                return

    def _spawn(self, coro: Awaitable[Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"vm-{self.name}-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watch_console(self) -> None:
        """Timeline marks from the console: first output, the ready marker."""
        assert self.console is not None
        marker = self.config.ready_marker
        while True:
            self.console.poll()
            if "first_console" not in self.timeline and self.console.line_count:
                self.timeline["first_console"] = self.console.lines()[0].t
            if marker and "ready_marker" not in self.timeline:
                hit = self.console.find(marker)
                if hit:
                    self.timeline["ready_marker"] = hit.t
            if "first_console" in self.timeline and (not marker or "ready_marker" in self.timeline):
                return
            await asyncio.sleep(0.02)

    async def _boot(self, probe: Probe | None) -> None:
        t = self.config.timeouts
        deadline = self._t0 + t.boot_s
        ready = asyncio.ensure_future(self._wait_ready(probe, deadline))
        assert self._exit_task is not None
        early = self._t0 + t.first_output_s if t.first_output_s and self.restore is None else None
        try:
            while True:
                until = min(deadline, early) if early else deadline
                done, _ = await asyncio.wait({ready, self._exit_task}, timeout=max(0.0, until - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if done or time.monotonic() >= deadline:
                    break
                if early and time.monotonic() >= early:
                    assert self.console is not None
                    self.console.poll()
                    if self.console.line_count == 0 and not self.console.tail(1):
                        raise _EarlyHang(f"no console output within {t.first_output_s} s")
                    early = None
        except BaseException:
            ready.cancel()
            with contextlib.suppress(BaseException):
                await ready
            raise
        if ready in done:
            ready.result()  # raises what the readiness wait raised
            return
        ready.cancel()
        with contextlib.suppress(BaseException):
            await ready
        if self._exit_task in done:
            raise VMError(f"QEMU exited during boot ({self._exit_task.result().reason})")
        raise TimeoutError(f"guest not ready within the boot timeout of {t.boot_s} s")

    async def _wait_ready(self, probe: Probe | None, deadline: float) -> None:
        await self._connect_qmp(min(deadline, self._t0 + self.config.timeouts.qmp_connect_s))
        if self.restore is not None:
            await self._incoming(self.restore, deadline)
        watcher = self._spawn(self._watch_console(), "console")
        if probe is not None:
            delay = 0.01
            while True:
                try:
                    ok = await asyncio.wait_for(probe(), max(0.05, deadline - time.monotonic()))
                    if ok is not False:
                        break
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # expected while the guest boots
                    self._last_probe_error = e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
            self.timeline["probe_ok"] = self.elapsed()
        elif self.config.ready_marker:
            await watcher  # returns once the marker is seen (the boot deadline bounds it)
        # one last look so the marks are filled in when the guest was quick
        if not watcher.done():
            assert self.console is not None
            self.console.poll()
            if self.console.line_count and "first_console" not in self.timeline:
                self.timeline["first_console"] = self.console.lines()[0].t

    async def _send_fd(self, fd: int, fdname: str) -> None:
        async with self.fd_lock:  # QEMU binds the fd to the next getfd on this monitor
            self.qmp.send_fd_scm(fd)
            await self.execute("getfd", {"fdname": fdname})

    async def _set_ignore_shared(self, on: bool) -> None:
        await self.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": "x-ignore-shared", "state": on}]})

    async def _wait_migration(self, deadline: float, what: str) -> dict[str, Any]:
        delay = 0.002
        while True:
            r = await self.execute("query-migrate")
            status = r.get("status")
            if status == "completed":
                return r
            if status in ("failed", "cancelled"):
                raise VMError(f"{what} {status}: {r.get('error-desc', 'no reason given')}; "
                              f"QEMU log: {' | '.join(self.qemu_log_tail(5))}")
            if not self.alive:
                raise VMError(f"QEMU exited during {what}: {' | '.join(self.qemu_log_tail(5))}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not completed in time (status {status})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _incoming(self, restore: Restore, deadline: float) -> None:
        """Load the saved device state into the waiting QEMU and let the guest run on."""
        await self._set_ignore_shared(restore.ignore_shared)
        fd = os.open(restore.state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._send_fd(fd, "spinbox-incoming")
        finally:
            os.close(fd)
        await self.execute("migrate-incoming", {"uri": "fd:spinbox-incoming"})
        # query-migrate on the incoming side reports "completed" once the state is loaded
        await self._wait_migration(deadline, "restore (incoming migration)")
        self.timeline["state_loaded"] = self.elapsed()
        status = (await self.execute("query-status")).get("status")
        if status != "running":  # QEMU autostarts after -incoming unless -S; be explicit anyway
            await self.execute("cont")
        self.timeline["resumed"] = self.elapsed()

    async def save_state(self, path: str | os.PathLike[str], *, ignore_shared: bool = True,
                         timeout: float = 60.0) -> dict[str, Any]:
        """Pause the guest and write its state to `path` (RAM in a shared file skipped with
        `ignore_shared`). The guest stays paused; QEMU refuses to run it or save it again, so
        stop() comes next. Returns QEMU's final query-migrate."""
        if self._state is not VMState.RUNNING:
            raise VMStateError(f"vm {self.name}: save_state() in state {self._state.value}")
        deadline = time.monotonic() + timeout
        await self.execute("stop")
        await self._set_ignore_shared(ignore_shared)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await self._send_fd(fd, "spinbox-save")
        finally:
            os.close(fd)
        await self.execute("migrate", {"uri": "fd:spinbox-save"})
        return await self._wait_migration(deadline, "save (migration)")

    async def _fail_boot(self, exc: BaseException) -> None:
        timed_out = isinstance(exc, TimeoutError)
        was_alive = self.alive
        if self.alive:
            self._kill_group()
        await self._reap()
        await self._drain_logs()
        console_tail = self.console.tail(25) if self.console else []
        qemu_tail = self.qemu_log_tail(15)
        timeline = dict(self.timeline)
        rc = self._proc.returncode if self._proc else None
        await self._release()
        self._set_state(VMState.FAILED)
        if isinstance(exc, asyncio.CancelledError):
            return  # the caller gave up; nothing to explain, everything is cleaned up
        why = str(exc) or type(exc).__name__
        if timed_out:
            why += f"; QEMU {'killed by the boot watchdog' if was_alive else procinfo.describe_returncode(rc)}"
            last = getattr(self, "_last_probe_error", None)
            if last is not None:
                why += f"; last probe error: {last!r}"
        elif rc is not None and "QEMU exited" not in why:
            why += f"; QEMU {procinfo.describe_returncode(rc)}"
        marks = " ".join(f"{k}={v:.3f}" for k, v in timeline.items())
        err = VMBootError(f"vm {self.name}: boot failed: {why} (timeline: {marks})", timeline=timeline,
                          returncode=rc, console_tail=console_tail, qemu_log_tail=qemu_tail, timed_out=timed_out)
        log.error("%s", err)
        raise err from exc

    def _log_timeline(self) -> None:
        marks = " ".join(f"{k}={v:.3f}" for k, v in self.timeline.items() if k != "qemu_exec")
        log.info("BOOT_TIMELINE vm=%s accel=%s machine=%s %s", self.name,
                 self.accel.value if self.accel else "?", self.config.machine, marks)

    # ------------------------------------------------------------------ helpers (virtiofsd)
    def register_helper(self, key: str, pid: int, tag: str) -> None:
        """Persist a helper process (so crash cleanup kills it too); it joins the VM's cgroup."""
        self._helpers[key] = {"pid": pid, "start_time": procinfo.start_time(pid), "tag": tag}
        self._persist()
        hostcgroup.join(self.config.host_cgroup_dirs, pid)

    def unregister_helper(self, key: str) -> None:
        if self._helpers.pop(key, None) is not None and self.alive:
            self._persist()

    # ------------------------------------------------------------------ stop
    async def stop(self, *, graceful: Callable[[], Awaitable[object]] | None = None,
                   powerdown: bool = False) -> VMExit | None:
        """Stop QEMU and release everything. Idempotent; concurrent calls share one stop; a
        cancelled caller does not interrupt it. `graceful`: e.g. the agent's shutdown call;
        `powerdown`: ACPI power button (only useful if the guest handles it)."""
        if self._state is VMState.CREATED:
            self._set_state(VMState.STOPPED)
            return None
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._do_stop(graceful, powerdown))
        return await asyncio.shield(self._stop_task)

    async def _do_stop(self, graceful: Callable[[], Awaitable[object]] | None, powerdown: bool) -> VMExit | None:
        failed = self._state is VMState.FAILED
        self._stopping = True
        if not failed:
            self._set_state(VMState.STOPPING)
        t = self.config.timeouts
        try:
            if self.alive and (graceful or powerdown):
                try:
                    if graceful is not None:
                        await asyncio.wait_for(graceful(), t.shutdown_grace_s)
                    else:
                        await self.execute("system_powerdown", timeout=t.shutdown_grace_s)
                    await self._wait_exit(t.shutdown_grace_s)
                except Exception as e:
                    log.info("vm %s: graceful stop did not finish: %r", self.name, e)
            if self.alive and self._qmp is not None and self._qmp.runstate is Runstate.RUNNING:
                with contextlib.suppress(Exception):
                    # `quit` may not get its reply out before QEMU closes the socket
                    await asyncio.wait_for(self._qmp.execute("quit"), t.quit_s)
                await self._wait_exit(t.quit_s)
            if self.alive:
                log.warning("vm %s: QEMU still running, SIGKILL", self.name)
                self._kill_group()
        finally:
            if self.alive:
                self._kill_group()
            await self._reap()
            await self._release()
            self._set_state(VMState.FAILED if failed else VMState.STOPPED)
        return self.exit

    async def _wait_exit(self, timeout: float) -> None:
        if self._exit_task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exit_task), timeout)

    def _kill_group(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        self._stopping = True  # our own kill is an expected exit
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    async def _reap(self) -> None:
        if self._exit_task is not None:
            await asyncio.wait_for(asyncio.shield(self._exit_task), self.config.timeouts.kill_s)

    async def _release(self) -> None:
        """After QEMU is gone: QMP, tasks, helpers, CID, files. Never raises."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            ev = self._qmp.events
            if ev.received:   # the guest raises them at will: how many, for the operator
                log.info("vm %s: %d QMP events received, %d beyond the last %d dropped", self.name,
                         ev.received, ev.dropped, ev.maxlen)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self._drain_logs(0.2)
        self._close_logs()
        while self._cleanups:
            what, fn = self._cleanups.pop()
            try:
                await fn()
            except Exception:
                log.exception("vm %s: cleanup %s failed", self.name, what)
        if self._cid is not None:
            self._cid.release()
        if self._uid is not None:
            self._uid.release()
        with contextlib.suppress(OSError):
            self.jail_root.rmdir()
        for p in self._owned_files():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.paths.state_file.with_name(self.paths.state_file.name + ".tmp").unlink()
        if self._created_state_dir:
            with contextlib.suppress(OSError):
                self.paths.state_dir.rmdir()  # only if empty: it may hold the kept console log

    # ------------------------------------------------------------------ context manager
    async def __aenter__(self) -> VM:
        if self._state is VMState.CREATED:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# ---------------------------------------------------------------------------------------------
# crash cleanup

def kill_from_state(state_dir: str | os.PathLike[str], *, timeout: float = 5.0,
                    keep_console_log: bool = False) -> list[str]:
    """Clean up after a VM whose shim died: kill QEMU and its helpers if (and only if) the pids
    still belong to them (start time + argv tag from vm.json), release the CID lock file and
    remove the VM's files. Idempotent; returns what it did."""
    d = Path(state_dir)
    state_file = d / "vm.json"
    done: list[str] = []
    try:
        st = json.loads(state_file.read_text())
    except FileNotFoundError:
        return done
    except (OSError, ValueError) as e:
        raise VMError(f"unreadable VM state {state_file}: {e}") from None
    # helpers first: once QEMU is gone a virtiofsd exits by itself and the report would race
    procs = [(f"helper {k}", h.get("pid"), h.get("start_time"), h.get("tag"))
             for k, h in (st.get("helpers") or {}).items()]
    uid = st.get("uid") if isinstance(st.get("uid"), int) else None
    # a jailed QEMU must also still run as its own uid
    procs.append(("qemu", st.get("pid"), st.get("start_time"), st.get("tag")))
    for what, pid, start, tag in procs:
        if isinstance(pid, int) and isinstance(start, int):
            if procinfo.kill_verified(pid, start, tag, timeout=timeout, uid=uid if what == "qemu" else None):
                done.append(f"killed {what} pid {pid}")
            else:
                done.append(f"{what} pid {pid} already gone")
    for lock_key, what in (("cid_lock", f"CID {st.get('cid')}"), ("uid_lock", f"QEMU uid {uid}")):
        lock = st.get(lock_key)
        if not isinstance(lock, str) or not lock:
            continue
        # the dead shim's flock died with it; the file is ours to remove if nobody locked it
        from .cid import _try_lock
        p = Path(lock)
        if p.exists():
            fd = _try_lock(p)
            if fd is not None:
                p.unlink(missing_ok=True)
                os.close(fd)
                done.append(f"released {what}")
    with contextlib.suppress(OSError):
        (d / "jail").rmdir()
    for f in st.get("files") or []:
        p = Path(f)
        if p.parent != d or (keep_console_log and p.name in ("console.log", "console.log.1")):
            continue  # never delete outside the state dir, whatever the file says
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            done.append(f"removed {p.name}")
    state_file.unlink(missing_ok=True)
    return done


@releasers.releaser("vm")
async def release_vm_record(r: dict[str, Any]) -> str:
    """A "vm" state record (the VM dir of a shim that crashed): `kill_from_state`, then the
    emptied dir and its parent. The kills wait for the processes to die: in a thread."""
    d = Path(r["path"])
    done = await asyncio.to_thread(kill_from_state, d, timeout=float(r.get("kill_timeout", 2.0)),
                                   keep_console_log=bool(r.get("keep_console_log", False)))
    with contextlib.suppress(OSError):
        d.rmdir()
    with contextlib.suppress(OSError):
        d.parent.rmdir()
    return f"vm {d}: " + (", ".join(done) if done else "nothing left")
