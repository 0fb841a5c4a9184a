"""The long-running shim daemon: one per sandbox group, spawned by `start` (manager.py).

    <shim> -namespace N -address A -publish-binary P -id ID -bundle B -group G -socket unix://S serve

* fd 3: the listening socket `start` bound (without fd 3, `-socket` is bound here: handy by hand);
  fd 4: readiness pipe — "ready\n" once the TTRPC server accepts, or "error: <why>\n".
* Logs go to containerd's `<bundle>/log` FIFO (containerd copies it into its own log), or to
  `<state>/<ns>/<group>/shim.log` when nobody reads the FIFO; written by a thread from a bounded
  queue (shim.logwriter), so a slow reader drops log lines (counted) instead of stalling RPCs.
* Services: the Task API, built by `shim.assembly.vm_task_service` (a VM per sandbox), and
  containerd's Sandbox API on the same manager (`shim.assembly.sandbox_service`, used by
  containerd 2.x when a runtime says `sandboxer = "shim"`).
  Beside it the read-only Monitor service (shim.monitor_service) for `spinbox monitor`.
* Exit: `ctx.request_shutdown()` (the Task service's Shutdown with no task left) or
  SIGTERM/SIGINT → stop serving → cleanups registered with `ctx.add_cleanup` (newest first) →
  flush events → release whatever the state still records → remove the state → exit 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2

import ttrpc
from spinbox.shim import config as config_mod
from spinbox.api import contract
from spinbox.shim.assembly import sandbox_service, vm_task_service
from spinbox.shim.logwriter import NonBlockingHandler
from spinbox.shim.manager import ShimArgs, daemon_log_level, socket_path
from spinbox.shim.monitor_service import MonitorService
from spinbox.shim.publisher import Publisher
from spinbox.shim.state import GroupLock, GroupPaths, State, cleanup_all

log = logging.getLogger(__name__)

LISTEN_FD = 3
READY_FD = 4
SHUTDOWN_FLUSH_S = 0.05     # let the Shutdown RPC's response leave before the server closes
CLEANUP_STEP_S = 10.0       # bound per registered cleanup callback
EVENT_FLUSH_S = 5.0


@dataclass
class ShimContext:
    """The daemon's own state: what it serves, and what runs at its exit."""
    namespace: str
    group: str                   # sandbox group id (== the task id outside pods)
    config: config_mod.SpinboxConfig
    paths: GroupPaths
    state: State
    publisher: Publisher
    _shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    _cleanups: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)

    def request_shutdown(self) -> None:
        """Stop serving and exit (after cleanups). Idempotent; safe from a signal handler."""
        if not self._shutdown.is_set():
            log.info("shutdown requested")
            self._shutdown.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def add_cleanup(self, what: str, fn: Callable[[], Any]) -> None:
        """Run `fn()` (sync or async) at exit, newest first, before the state is released."""
        self._cleanups.append((what, fn))


def build_services(server: ttrpc.Server, ctx: ShimContext) -> None:
    """Serve the Task API (v2 and v3) and the Sandbox API for this daemon's sandbox; the Task
    service's close runs at exit."""
    svc = vm_task_service(group=ctx.group, namespace=ctx.namespace, config=ctx.config, paths=ctx.paths,
                          state=ctx.state, publisher=ctx.publisher, request_exit=ctx.request_shutdown)
    svc.register(server)
    sandbox_service(svc, group=ctx.group, request_exit=ctx.request_shutdown).register(server)
    ctx.add_cleanup("task service", svc.close)
    MonitorService(svc.manager).register(server)     # read-only figures for `spinbox monitor`


# ---------------------------------------------------------------------------------------------
# process setup

def close_stray_fds() -> None:
    """fds the daemon inherited from containerd's side (not CLOEXEC) must not live on in it."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > READY_FD:
            with contextlib.suppress(OSError):
                os.close(fd)


def open_log(bundle: Path, fallback: Path) -> tuple[int, str]:
    """containerd's log FIFO (only if a reader exists: O_NONBLOCK open fails with ENXIO
    otherwise), else an append-only file. Returns (fd, description)."""
    fifo = bundle / "log"
    try:
        if stat.S_ISFIFO(os.stat(fifo).st_mode):
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(fd, True)   # containerd drains it; never drop our own log lines
            return fd, str(fifo)
    except OSError as e:
        if e.errno not in (errno.ENXIO, errno.ENOENT):
            raise
    fallback.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(fallback, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    return fd, str(fallback)


def setup_logging(fd: int, level: int, namespace: str, group: str) -> None:
    os.dup2(fd, 2)            # tracebacks and stray prints land in the log too
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="replace")
    logging.raiseExceptions = False      # a gone log reader must not kill the daemon
    # a slow FIFO reader must not stall the event loop: records go through a bounded queue
    handler = NonBlockingHandler(2)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s spinbox-shim[%(process)d] {namespace}/{group} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # at debug qemu.qmp logs every message, and the guest raises QMP events at will
    logging.getLogger("qemu.qmp").setLevel(logging.INFO)


def _listener(args: ShimArgs) -> socket.socket:
    try:
        sock = socket.socket(fileno=LISTEN_FD)
        if sock.family == socket.AF_UNIX:
            return sock
        sock.detach()
    except OSError:
        pass
    if not args.socket:
        raise RuntimeError("no listening socket on fd 3 and no -socket given")
    path = socket_path(args.socket)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    return sock


def _ready(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(READY_FD, (message.replace("\n", " ") + "\n").encode())
    with contextlib.suppress(OSError):
        os.close(READY_FD)


def _read_options(paths: GroupPaths) -> any_pb2.Any | None:
    try:
        raw = paths.options_file.read_bytes()
    except FileNotFoundError:
        return None
    a = any_pb2.Any()
    a.ParseFromString(raw)
    return a


# ---------------------------------------------------------------------------------------------
# main

def serve(args: ShimArgs) -> int:
    close_stray_fds()
    bundle = Path(args.bundle or os.getcwd())
    group = args.group or args.id
    try:
        cfg0 = config_mod.load(None)
        paths = GroupPaths(Path(cfg0.paths.state_dir), args.namespace, group)
        options = _read_options(paths)
        cfg = config_mod.load(options) if options is not None else cfg0
        paths = GroupPaths(Path(cfg.paths.state_dir), args.namespace, group)
        fd, where = open_log(bundle, paths.log_file)
        setup_logging(fd, daemon_log_level(args), args.namespace, group)
    except Exception as e:
        _ready(f"error: shim daemon setup failed: {e}")
        return 1
    log.info("spinbox shim %s serving %s (task %s, log %s, config %s)", contract.version(), args.socket,
             args.id, where, " + ".join(cfg.sources) or "defaults")
    try:
        return asyncio.run(_serve(args, group, cfg, paths))
    except Exception as e:
        log.exception("shim daemon failed")
        _ready(f"error: shim daemon failed: {e}")
        return 1


async def _serve(args: ShimArgs, group: str, cfg: config_mod.SpinboxConfig, paths: GroupPaths) -> int:
    state = State.open(paths)
    address = args.socket if args.socket.startswith("unix://") else "unix://" + args.socket
    state.set_daemon(os.getpid(), address)
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), publish_binary=args.publish_binary or None,
                          grpc_address=args.address or None)
    ctx = ShimContext(namespace=args.namespace, group=group, config=cfg, paths=paths, state=state,
                      publisher=publisher)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.request_shutdown)
    server = ttrpc.Server()
    listener = _listener(args)
    path = socket_path(address)
    if state.find("socket", path) is None:   # bound here (-socket, no fd 3): ours to remove
        st = os.stat(path)
        state.record("socket", path, path=path, ino=st.st_ino, dev=st.st_dev)
    try:
        build_services(server, ctx)
        await server.serve_listener(listener, require_same_user=True)
    except BaseException:
        await _finish(ctx, server)
        raise
    _ready("ready")
    await ctx._shutdown.wait()
    await asyncio.sleep(SHUTDOWN_FLUSH_S)
    await _finish(ctx, server)
    log.info("spinbox shim exiting")
    return 0


async def _finish(ctx: ShimContext, server: ttrpc.Server) -> None:
    """Stop serving, run cleanups, flush events, release what is still recorded."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.close(), 5.0)
    for what, fn in reversed(ctx._cleanups):
        try:
            res = fn()
            if inspect.isawaitable(res):
                await asyncio.wait_for(res, CLEANUP_STEP_S)
        except Exception as e:
            log.error("cleanup %s failed: %s", what, e)
    await ctx.publisher.close(EVENT_FLUSH_S)
    # the group lock: a `start` for this group must not see a half-removed state
    lock = GroupLock(ctx.paths)
    await asyncio.to_thread(lock.acquire)
    removed = False
    try:
        report = await cleanup_all(ctx.state)
        for line in report.done:
            log.info("cleanup: %s", line)
        for line in report.failed:
            log.error("cleanup failed: %s", line)
        if report.ok:
            ctx.state.remove_files()
            removed = True
    finally:
        lock.release(remove=removed)
