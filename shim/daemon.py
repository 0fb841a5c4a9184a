"""The long-running shim daemon: one per sandbox group, spawned by `start` (manager.py).

    <shim> -namespace N -address A -publish-binary P -id ID -bundle B -group G -socket unix://S serve

* fd 3: the listening socket `start` bound (without fd 3, `-socket` is bound here: handy by hand);
  fd 4: readiness pipe — "ready\n" once the TTRPC server accepts, or "error: <why>\n".
* Logs go to containerd's `<bundle>/log` FIFO (containerd copies it into its own log), or to
  `<state>/<ns>/<group>/shim.log` when nobody reads the FIFO.
* Services: `spinbox.shim.task_service.build_services(server, ctx)` if that module exists,
  else a Task service that answers UNIMPLEMENTED with a clear message except Connect/Shutdown.
* Exit: `ctx.request_shutdown()` (the Task service's Shutdown with no task left) or
  SIGTERM/SIGINT → stop serving → cleanups registered with `ctx.add_cleanup` (newest first) →
  flush events → release whatever the state still records → remove the state → exit 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import inspect
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

import ttrpc
from spinbox.shim import config as config_mod
from spinbox.shim.manager import VERSION, ShimArgs, socket_path
from spinbox.shim.publisher import Publisher
from spinbox.shim.state import GroupLock, GroupPaths, State, cleanup_all

log = logging.getLogger("spinbox.shim")

LISTEN_FD = 3
READY_FD = 4
SHUTDOWN_FLUSH_S = 0.05     # let the Shutdown RPC's response leave before the server closes
CLEANUP_STEP_S = 10.0       # bound per registered cleanup callback
EVENT_FLUSH_S = 5.0


@dataclass
class ShimContext:
    """What the daemon hands the Task service (build_services)."""
    namespace: str
    task_id: str                 # the task whose `start` spawned this daemon
    group: str                   # sandbox group id (== task_id outside pods)
    bundle: Path                 # that task's bundle (the daemon's cwd)
    address: str                 # unix://... this daemon serves
    config: config_mod.SpinboxConfig
    options: any_pb2.Any | None  # runtime options `start` received (CreateTaskRequest has them too)
    paths: GroupPaths
    state: State
    publisher: Publisher
    debug: bool = False
    grpc_address: str = ""
    publish_binary: str = ""
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

    async def publish(self, topic: str, event: Message) -> None:
        """Queue a task event for containerd in this daemon's namespace (ordered)."""
        await self.publisher.publish(self.namespace, topic, event)


# ---------------------------------------------------------------------------------------------
# the placeholder Task service

class UnimplementedTask:
    """Until spinbox.shim.task_service exists: every call fails with UNIMPLEMENTED naming why,
    except Connect (containerd's liveness probe) and Shutdown (so the daemon can go away)."""

    def __init__(self, ctx: ShimContext, version: int):
        self.ctx = ctx
        from spinbox.api._pb.containerd.task.v2 import shim_pb2 as v2
        from spinbox.api._pb.containerd.task.v3 import shim_pb2 as v3
        self.pb = v2 if version == 2 else v3

    async def Connect(self, request, cctx):
        return self.pb.ConnectResponse(shim_pid=os.getpid(), task_pid=0, version=VERSION)

    async def Shutdown(self, request, cctx):
        self.ctx.request_shutdown()
        return empty_pb2.Empty()


def _unimplemented(name: str):
    async def handler(self, request, cctx):
        raise ttrpc.Unimplemented(
            f"spinbox shim {VERSION}: Task.{name} is not available: the Task service "
            f"(spinbox.shim.task_service) is not installed")
    handler.__name__ = name
    return handler


def _fill_unimplemented() -> None:
    from spinbox.api._pb.containerd.task.v2 import shim_pb2
    for m in shim_pb2.DESCRIPTOR.services_by_name["Task"].methods:
        if not hasattr(UnimplementedTask, m.name):
            setattr(UnimplementedTask, m.name, _unimplemented(m.name))


_fill_unimplemented()


async def build_services(server: ttrpc.Server, ctx: ShimContext) -> None:
    try:
        mod = importlib.import_module("spinbox.shim.task_service")
    except ModuleNotFoundError as e:
        if e.name != "spinbox.shim.task_service":
            raise
        mod = None
    if mod is not None:
        res = mod.build_services(server, ctx)
        if inspect.isawaitable(res):
            await res
        return
    from spinbox.api._pb.containerd.task.v2 import shim_pb2 as v2
    from spinbox.api._pb.containerd.task.v3 import shim_pb2 as v3
    server.register(v2.DESCRIPTOR.services_by_name["Task"], UnimplementedTask(ctx, 2))
    server.register(v3.DESCRIPTOR.services_by_name["Task"], UnimplementedTask(ctx, 3))
    log.warning("spinbox.shim.task_service not installed: serving a Task service that answers "
                "UNIMPLEMENTED")


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


def setup_logging(fd: int, debug: bool, namespace: str, group: str) -> None:
    os.dup2(fd, 2)            # tracebacks and stray prints land in the log too
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="replace")
    logging.raiseExceptions = False      # a gone log reader must not kill the daemon
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s spinbox-shim[%(process)d] {namespace}/{group} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


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
        setup_logging(fd, args.debug, args.namespace, group)
    except Exception as e:
        _ready(f"error: shim daemon setup failed: {e}")
        return 1
    log.info("spinbox shim %s serving %s (task %s, log %s, config %s)", VERSION, args.socket,
             args.id, where, " + ".join(cfg.sources) or "defaults")
    try:
        return asyncio.run(_serve(args, bundle, group, cfg, options, paths))
    except Exception as e:
        log.exception("shim daemon failed")
        _ready(f"error: shim daemon failed: {e}")
        return 1


async def _serve(args: ShimArgs, bundle: Path, group: str, cfg: config_mod.SpinboxConfig,
                 options: any_pb2.Any | None, paths: GroupPaths) -> int:
    state = State.open(paths)
    address = args.socket if args.socket.startswith("unix://") else "unix://" + args.socket
    state.set_daemon(os.getpid(), address)
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), publish_binary=args.publish_binary or None,
                          grpc_address=args.address or None)
    ctx = ShimContext(namespace=args.namespace, task_id=args.id, group=group, bundle=bundle,
                      address=address, config=cfg, options=options, paths=paths, state=state,
                      publisher=publisher, debug=args.debug, grpc_address=args.address,
                      publish_binary=args.publish_binary)
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
        await build_services(server, ctx)
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
        report = cleanup_all(ctx.state)
        for line in report.done:
            log.info("cleanup: %s", line)
        for line in report.failed:
            log.error("cleanup failed: %s", line)
        if report.ok:
            ctx.state.remove_files()
            removed = True
    finally:
        lock.release(remove=removed)
