"""The shim binary's short-lived actions, as containerd runs them:

    containerd-shim-spinbox-v1 -namespace N -address A -publish-binary P -id ID [-debug] start
    containerd-shim-spinbox-v1 -namespace N -address A -publish-binary P -id ID -bundle B delete
    containerd-shim-spinbox-v1 -v | -info

* `start` (cwd = bundle): picks the sandbox group (under CRI `io.kubernetes.cri.sandbox-id`, and a
  group annotation naming another is refused; else `io.containerd.spinbox.v1.group` or
  `spinbox.io/sandbox`, else the task id), reuses the
  group's daemon if its socket answers, or binds the socket itself and spawns the daemon with
  the listener as fd 3 (no race: the socket accepts before the daemon even runs), waits for the
  daemon to say it is ready, writes `<bundle>/address`, and prints the address — plain text, or
  a protobuf BootstrapResult when stdin held BootstrapParams (containerd 2.3+).
  Nothing reaches stderr on success (containerd merges it into the address it reads).
  Where the task's identity comes from (`resolve_start`): BootstrapParams when stdin holds them
  (ids, namespace, addresses, containerd binary, log level, socket dir: containerd 2.3 marks the
  flags deprecated, to be removed); the flags, then containerd's env (`NAMESPACE`,
  `GRPC_ADDRESS`, `TTRPC_ADDRESS`) only fill what the params leave empty. An id or namespace
  given both ways must agree (a clear error otherwise); for the addresses and the binary the
  params win, as in containerd's own Go shims.
* `delete`: releases everything the group's state records once its daemon is gone (waiting
  briefly for a daemon that is shutting down, killing a stuck one), unmounts `<bundle>/rootfs`
  and prints a protobuf DeleteResponse. Idempotent; exit 0 when there is nothing left.
* `-info`: a protobuf containerd.types.RuntimeInfo.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from spinbox.api import contract
from spinbox.shim import config as config_mod
from spinbox.shim.errors import SpinboxError
from spinbox.shim.mounts import unmount_all
from spinbox.shim.state import GroupLock, GroupPaths, State, StateError, cleanup_all
from spinbox.shim.vm import procinfo

RUNTIME_NAME = "io.containerd.spinbox.v1"
BINARY_NAME = "containerd-shim-spinbox-v1"
# 2 = containerd.task.v2.Task, what every containerd from 1.6 on speaks; the plain-address
# answer means 2 as well, so all containerd versions drive the shim the same way.
SHIM_PROTOCOL_VERSION = 2
DEFAULT_SOCKET_DIR = "/run/containerd/s"
SOCKET_PATH_MAX = 106        # containerd's socketPathLimit
GROUP_ANNOTATIONS = ("io.containerd.spinbox.v1.group", "spinbox.io/sandbox")   # ours (not under CRI)
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
READY_TIMEOUT_S = 30.0       # daemon spawn -> serving (Python start-up on a loaded 2-core host)
DELETE_DAEMON_WAIT_S = 1.5   # delete: let a daemon that is shutting down finish by itself


class ShimError(SpinboxError):
    """A failure containerd should see verbatim (start prints it and exits 1)."""


# ---------------------------------------------------------------------------------------------
# argv (Go `flag` syntax: -name value, -name=value, --name; bool flags take no value)

_STRING_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket", "debug-socket",
                 "group", "log-level"}
_BOOL_FLAGS = {"debug", "v", "version", "info"}


@dataclass
class ShimArgs:
    namespace: str = ""
    address: str = ""           # containerd's gRPC socket
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""            # daemon: the address it serves (the listener is fd 3)
    debug_socket: str = ""      # accepted, unused
    group: str = ""             # daemon: the group it serves (hidden)
    log_level: str = ""         # daemon: a LOG_LEVELS name, from BootstrapParams (hidden)
    debug: bool = False
    version: bool = False
    info: bool = False
    action: str = ""            # start | delete | serve (hidden)
    extra: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> ShimArgs:
    a = ShimArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            if eq and value.lower() not in ("true", "false", "1", "0", "t", "f"):
                raise ShimError(f"invalid boolean value {value!r} for flag -{name}")
            on = (not eq) or value.lower() in ("true", "1", "t")
            setattr(a, "version" if name in ("v", "version") else name, on)
        elif name in _STRING_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise ShimError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(a, name.replace("-", "_"), value)
        else:
            raise ShimError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    if rest:
        a.action, a.extra = rest[0], rest[1:]
    return a


def check_identifiers(args: ShimArgs) -> None:
    for what, value in (("namespace", args.namespace), ("id", args.id)):
        if not value:
            raise ShimError(f"-{what} is required")
        problem = contract.id_problem(value)
        if problem is not None:
            raise ShimError(f"invalid -{what} {value!r}: not a containerd identifier ({problem})")


# ---------------------------------------------------------------------------------------------
# bundle, group, socket

def read_annotations(bundle: str | os.PathLike[str]) -> dict[str, str]:
    """The OCI spec's annotations ({} when there is no config.json)."""
    path = Path(bundle) / "config.json"
    try:
        spec = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ShimError(f"cannot read OCI spec {path}: {e}") from None
    ann = spec.get("annotations") if isinstance(spec, dict) else None
    return {k: v for k, v in ann.items() if isinstance(v, str)} if isinstance(ann, dict) else {}


def _valid_group(key: str, value: str) -> str:
    if not contract.is_valid_id(value):
        raise ShimError(f"annotation {key}={value!r} is not a valid sandbox id")
    return value


def group_id(task_id: str, annotations: dict[str, str]) -> str:
    """The shim daemon a task belongs to: one per sandbox (pod), else one per task.

    Under CRI (its sandbox-id or container-type annotation is present) the pod's sandbox id
    decides, whatever else the annotations say: a pod's own annotations pass through to the
    spec, and a group annotation of its choice would run its containers in another pod's VM.
    One that names another group is refused; outside CRI our group annotations decide."""
    sandbox = annotations.get(CRI_SANDBOX_ID, "")
    if sandbox or CRI_CONTAINER_TYPE in annotations:
        group = _valid_group(CRI_SANDBOX_ID, sandbox) if sandbox else task_id
        for key in GROUP_ANNOTATIONS:
            value = annotations.get(key)
            if value and value != group:
                raise ShimError(f"annotation {key}={value!r} names another sandbox than CRI's "
                                f"{CRI_SANDBOX_ID}={group!r}: refused (under CRI the pod's sandbox "
                                "decides where its containers run)")
        return group
    for key in GROUP_ANNOTATIONS:
        value = annotations.get(key)
        if value:
            return _valid_group(key, value)
    return task_id


def socket_address(grpc_address: str, namespace: str, group: str,
                   socket_dir: str = DEFAULT_SOCKET_DIR) -> str:
    """`unix://<socket_dir>/<sha256(grpc_address/namespace/group)>`, as the runc shim names it
    (the containerd address is part of the hash: two containerds never share a shim)."""
    digest = hashlib.sha256(os.path.join(grpc_address, namespace, group).encode()).hexdigest()
    path = os.path.join(socket_dir or DEFAULT_SOCKET_DIR, digest)
    if len(path.encode()) > SOCKET_PATH_MAX:
        raise ShimError(f"shim socket path too long ({len(path.encode())} > {SOCKET_PATH_MAX} bytes): "
                        f"{path}; use a shorter socket_dir")
    return "unix://" + path


def socket_path(address: str) -> str:
    return address[len("unix://"):] if address.startswith("unix://") else address


def can_connect(path: str, timeout: float = 1.0) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# what containerd wrote on stdin

@dataclass
class StartInput:
    """`start`'s stdin, classified."""
    kind: str                                   # "empty" | "bootstrap" | "options"
    options: any_pb2.Any | None = None          # runtime options (either protocol)
    params: Any = None                          # BootstrapParams (2.3+)
    socket_dir: str | None = None               # BootstrapParams.socket_dir (field 9)


def _socket_dir_field(params: Any) -> str | None:
    """BootstrapParams field 9 `optional string socket_dir` (2.3+); None when containerd did
    not set it (an older 2.x, or the default)."""
    return params.socket_dir if params.HasField("socket_dir") else None


def _bootstrap_only_fields(params: Any) -> bool:
    """True when a field beyond 1-2 is set: a serialized Any has only fields 1 (type_url) and
    2 (value), so such bytes are BootstrapParams for sure, never a legacy options Any."""
    return bool(params.log_level or params.containerd_version or params.containerd_ttrpc_address
                or params.containerd_grpc_address or params.containerd_binary or params.extensions
                or params.HasField("socket_dir"))


def _disagreement(params: Any, task_id: str, namespace: str) -> str | None:
    for what, flag, value in (("id", task_id, params.instance_id),
                              ("namespace", namespace, params.namespace)):
        if flag and value != flag:
            return f"-{what} {flag!r} but BootstrapParams.{'instance_id' if what == 'id' else what} {value!r}"
    return None


def classify_stdin(data: bytes, task_id: str = "", namespace: str = "") -> StartInput:
    """BootstrapParams (2.3+), else a serialized Any of runtime options (1.6-2.2), else empty.

    A legacy options Any can parse as BootstrapParams by accident (its type_url lands in field
    1, its value in field 2), so bytes with only fields 1-2 are BootstrapParams only if they
    name this task and namespace, as containerd's Go shims decide; with no -id/-namespace flags
    (containerd after their removal, which always sends params) a task id and a namespace are
    enough. Bytes with any other field set are BootstrapParams whatever the flags say, and
    flags that disagree with them are an error (which task would we start?)."""
    from spinbox.api._pb.containerd.runtime.bootstrap.v1 import bootstrap_pb2

    if not data or not data.strip(b"\n\r\t "):
        return StartInput("empty")
    params = bootstrap_pb2.BootstrapParams()
    try:
        params.ParseFromString(data)
        parsed = True
    except (DecodeError, ValueError):
        parsed = False
    if parsed:
        disagree = _disagreement(params, task_id, namespace)
        if _bootstrap_only_fields(params) and disagree:
            raise ShimError(f"start: the flags and stdin's BootstrapParams name different tasks: {disagree}")
        if not disagree and ((params.instance_id and params.namespace) or _bootstrap_only_fields(params)):
            return StartInput("bootstrap", options=_options_extension(params), params=params,
                              socket_dir=_socket_dir_field(params))
    any_msg = any_pb2.Any()
    what = f"for {namespace or '?'}/{task_id or '?'}"
    try:
        any_msg.ParseFromString(data)
    except DecodeError as e:
        raise ShimError(f"start: stdin is neither BootstrapParams {what} nor "
                        f"a runtime options Any ({len(data)} bytes): {e}") from None
    if not any_msg.type_url:
        raise ShimError(f"start: stdin ({len(data)} bytes) is neither BootstrapParams {what} "
                        "nor a runtime options Any (no type_url)")
    return StartInput("options", options=any_msg)


def _options_extension(params: Any) -> any_pb2.Any | None:
    """Our runtime options among the params' extensions; a lone extension of another type is
    taken too (config.load names what is wrong with it)."""
    for ext in params.extensions:
        if ext.value.type_url.rsplit("/", 1)[-1] == config_mod.RUNTIME_OPTIONS_TYPE:
            return ext.value
    return params.extensions[0].value if len(params.extensions) == 1 else None


# BootstrapParams.log_level is an open enum (INFO 0, more verbose negative, more severe
# positive): each value maps to the nearest name at or below it.
LOG_LEVELS = {"trace": -8, "debug": -4, "info": 0, "warn": 4, "error": 8, "fatal": 10, "panic": 12}
_PY_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warn": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL,
              "panic": logging.CRITICAL}


def log_level_name(value: int) -> str:
    below = [name for name, v in LOG_LEVELS.items() if v <= value]
    return max(below, key=LOG_LEVELS.__getitem__) if below else "trace"


def daemon_log_level(args: ShimArgs) -> int:
    """The daemon's Python log level: -log-level (from BootstrapParams) if given, else
    -debug (containerd < 2.3 passes it at debug/trace), else INFO."""
    if args.log_level:
        if args.log_level not in _PY_LEVELS:
            raise ShimError(f"invalid -log-level {args.log_level!r} (one of {', '.join(LOG_LEVELS)})")
        return _PY_LEVELS[args.log_level]
    return logging.DEBUG if args.debug else logging.INFO


def resolve_start(args: ShimArgs, inp: StartInput, env: dict[str, str]) -> None:
    """Fill `args` (and the daemon's `env`) from BootstrapParams first, then the flags, then
    containerd's env; see the module docstring. Changes args and env in place."""
    p = inp.params
    if p is not None:
        # classify_stdin made sure that flags given agree with the params
        args.id, args.namespace = p.instance_id or args.id, p.namespace or args.namespace
        args.address = p.containerd_grpc_address or args.address
        args.publish_binary = p.containerd_binary or args.publish_binary
        if p.containerd_ttrpc_address:
            env["TTRPC_ADDRESS"] = p.containerd_ttrpc_address
        # INFO (0) is also "unset": then -debug, if containerd passed it, still counts
        if p.log_level or not args.debug:
            args.log_level = log_level_name(p.log_level)
    args.namespace = args.namespace or env.get("NAMESPACE", "")
    args.address = args.address or env.get("GRPC_ADDRESS", "")
    if p is not None:
        for what, field_name, value in (("id", "instance_id", args.id), ("namespace", "namespace", args.namespace)):
            if not value:
                raise ShimError(f"start: BootstrapParams.{field_name} is empty and no -{what} was given")


def bootstrap_result(address: str) -> bytes:
    from spinbox.api._pb.containerd.runtime.bootstrap.v1 import bootstrap_pb2

    return bootstrap_pb2.BootstrapResult(version=SHIM_PROTOCOL_VERSION, address=address,
                                         protocol="ttrpc").SerializeToString()


# ---------------------------------------------------------------------------------------------
# start

def _shim_command() -> list[str]:
    """How to exec ourselves: the console script containerd ran, else the module."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and os.path.isabs(argv0) and os.access(argv0, os.X_OK) and not argv0.endswith(".py"):
        return [argv0]
    return [sys.executable, "-m", "spinbox.shim.main"]


def _high_fd(fd: int) -> int:
    """A close-on-exec copy of `fd` at >= 10, so the dup2s to 3 and 4 in the child cannot clobber it."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def daemon_argv(args: ShimArgs, group: str, address: str, bundle: Path) -> list[str]:
    """The daemon's command line: what start resolved (from BootstrapParams, flags or env) in
    our own flags, so the daemon never depends on containerd passing its deprecated ones."""
    argv = [*_shim_command(), "-namespace", args.namespace, "-address", args.address,
            "-publish-binary", args.publish_binary, "-id", args.id, "-bundle", str(bundle),
            "-group", group, "-socket", address]
    if args.debug:
        argv.append("-debug")
    if args.log_level:
        argv += ["-log-level", args.log_level]
    return [*argv, "serve"]


def spawn_daemon(args: ShimArgs, group: str, address: str, listener: socket.socket,
                 bundle: Path, env: dict[str, str]) -> tuple[int, int]:
    """fork + exec the daemon: new session, stdio on /dev/null, cwd = bundle, the listening
    socket as fd 3, a readiness pipe as fd 4. Returns (pid, read end of the pipe)."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    sock_fd, pipe_fd = _high_fd(listener.fileno()), _high_fd(ready_w)
    os.close(ready_w)
    argv = daemon_argv(args, group, address, bundle)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:   # child: only async-signal-safe-ish calls until exec
        try:
            os.setsid()
            os.chdir(bundle)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.dup2(sock_fd, 3)      # dup2 clears close-on-exec on the copy
            os.dup2(pipe_fd, 4)
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(devnull)
    os.close(sock_fd)
    os.close(pipe_fd)
    return pid, ready_r


def wait_ready(pid: int, ready_r: int, timeout: float = READY_TIMEOUT_S) -> None:
    """Read the daemon's readiness line: "ready" or "error: <why>"; EOF = it died."""
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ShimError(f"shim daemon (pid {pid}) not ready within {timeout:.0f} s")
            r, _, _ = select.select([ready_r], [], [], left)
            if not r:
                continue
            chunk = os.read(ready_r, 4096)
            if not chunk:
                break
            buf += chunk
    finally:
        os.close(ready_r)
    line = buf.decode(errors="replace").strip()
    if line == "ready":
        return
    if line.startswith("error: "):
        raise ShimError(line[len("error: "):])
    # died without a word: report how
    status = "unknown status"
    with contextlib.suppress(ChildProcessError):
        wpid, st = os.waitpid(pid, os.WNOHANG)
        if wpid:
            status = procinfo.describe_returncode(os.waitstatus_to_exitcode(st))
    raise ShimError(f"shim daemon (pid {pid}) exited before it was ready ({status})")


def _discard_stale_group(paths: GroupPaths) -> None:
    """A previous daemon of this group died (or hangs without serving): release what it left."""
    old = State.load(paths)
    if old is None:
        return
    d = old.daemon
    if d and isinstance(d.get("pid"), int) and isinstance(d.get("start_time"), int):
        procinfo.kill_verified(d["pid"], d["start_time"], None, timeout=2.0, group=False)
    report = asyncio.run(cleanup_all(old))
    if report.failed:
        raise ShimError(f"cannot clean up the previous shim of group {paths.group}: "
                        + "; ".join(report.failed))
    old.remove_files()


def start(args: ShimArgs, stdin: bytes, env: dict[str, str] | None = None) -> bytes:
    """The `start` action; returns what to print on stdout."""
    env = dict(os.environ if env is None else env)
    inp = classify_stdin(stdin, args.id, args.namespace)
    resolve_start(args, inp, env)
    check_identifiers(args)
    bundle = Path(args.bundle or os.getcwd())
    group = group_id(args.id, read_annotations(bundle))
    try:
        cfg = config_mod.load(inp.options, env=env)   # a bad config fails here, with its key
    except config_mod.ConfigError as e:
        raise ShimError(f"spinbox config: {e}") from None
    address = socket_address(args.address, args.namespace, group, inp.socket_dir or DEFAULT_SOCKET_DIR)
    path = socket_path(address)
    paths = GroupPaths(Path(cfg.paths.state_dir), args.namespace, group)

    with GroupLock(paths):
        if not can_connect(path):
            _discard_stale_group(paths)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            _start_daemon(args, group, address, paths, bundle, inp, env)
        _write_address(bundle, address)
    return bootstrap_result(address) if inp.kind == "bootstrap" else address.encode()


def _start_daemon(args: ShimArgs, group: str, address: str, paths: GroupPaths, bundle: Path,
                  inp: StartInput, env: dict[str, str]) -> None:
    path = socket_path(address)
    state = State(paths)
    state.save()
    sock_dir = os.path.dirname(path)
    os.makedirs(sock_dir, mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = None
    try:
        rec = state.record("socket", path, path=path)
        old_umask = os.umask(0o177)       # socket file 0600
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        st = os.stat(path)
        rec.update(ino=st.st_ino, dev=st.st_dev)
        listener.listen(128)
        if inp.options is not None:
            paths.options_file.write_bytes(inp.options.SerializeToString())
        pid, ready_r = spawn_daemon(args, group, address, listener, bundle, env)
        wait_ready(pid, ready_r)
    except BaseException:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        asyncio.run(cleanup_all(state))
        state.remove_files()
        raise
    finally:
        listener.close()


def _write_address(bundle: Path, address: str) -> None:
    tmp = bundle / ".address.tmp"
    tmp.write_text(address)
    os.replace(tmp, bundle / "address")


# ---------------------------------------------------------------------------------------------
# delete

@dataclass
class DeleteOutcome:
    pid: int = 0
    exit_status: int = 137
    done: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procinfo.is_same_process(pid, start_time):
            return True
        time.sleep(0.02)
    return not procinfo.is_same_process(pid, start_time)


def delete(args: ShimArgs, env: dict[str, str] | None = None) -> DeleteOutcome:
    """Release what the task's group left behind (see module docstring). Never raises for
    "nothing there"; problems become warnings (containerd logs delete's stderr)."""
    env = dict(os.environ if env is None else env)
    out = DeleteOutcome()
    args.namespace = args.namespace or env.get("NAMESPACE", "")   # containerd 1.7+ sets it
    check_identifiers(args)
    bundle = Path(args.bundle or os.getcwd())
    try:
        group = group_id(args.id, read_annotations(bundle))
    except ShimError as e:
        out.warnings.append(str(e))
        group = args.id
    try:
        cfg = config_mod.load(None, env=env)
    except config_mod.ConfigError as e:   # still clean up, from the default state dir
        out.warnings.append(f"spinbox config: {e} (using the default state dir)")
        cfg = config_mod.SpinboxConfig()
    paths = GroupPaths(Path(cfg.paths.state_dir), args.namespace, group)

    try:
        _delete_group(args, group, paths, out)
    except (StateError, TimeoutError, OSError) as e:
        out.warnings.append(str(e))
    try:
        n = unmount_all(bundle / "rootfs")
        if n:
            out.done.append(f"unmounted {bundle / 'rootfs'}")
    except OSError as e:
        out.warnings.append(f"unmount {bundle / 'rootfs'}: {e}")
    return out


def _delete_group(args: ShimArgs, group: str, paths: GroupPaths, out: DeleteOutcome) -> None:
    st = State.load(paths)
    if st is None:
        return
    _take_task_info(st, args.id, out)
    d = st.daemon or {}
    pid, start_time = d.get("pid"), d.get("start_time")
    if st.daemon_alive():
        serving = bool(d.get("address")) and can_connect(socket_path(d["address"]))
        if serving and args.id != group:
            # one container of a live sandbox: the daemon owns the group's resources
            return
        # the sandbox's own task: its daemon is shutting down (or stuck) — give it a moment
        if isinstance(pid, int) and isinstance(start_time, int):
            _wait_gone(pid, start_time, DELETE_DAEMON_WAIT_S)
    lock = GroupLock(paths, timeout=2.0).acquire()
    removed = False
    try:
        st = State.load(paths)
        if st is None:
            removed = True
            return
        d = st.daemon or {}
        if st.daemon_alive():
            if procinfo.kill_verified(d["pid"], d["start_time"], None, timeout=1.0, group=False):
                out.done.append(f"killed shim daemon pid {d['pid']}")
        report = asyncio.run(cleanup_all(st))
        out.done += report.done
        out.warnings += report.failed
        if report.ok:
            st.remove_files()
            removed = True
    finally:
        lock.release(remove=removed)


def _take_task_info(st: State, task_id: str, out: DeleteOutcome) -> None:
    info = st.tasks.get(task_id) or {}
    if isinstance(info.get("pid"), int) and 0 <= info["pid"] < 2**32:
        out.pid = info["pid"]
    if isinstance(info.get("exit_status"), int) and 0 <= info["exit_status"] < 2**32:
        out.exit_status = info["exit_status"]


def delete_response(out: DeleteOutcome) -> bytes:
    from spinbox.api import types
    from spinbox.api._pb.containerd.task.v2 import shim_pb2

    return shim_pb2.DeleteResponse(pid=out.pid, exit_status=out.exit_status,
                                   exited_at=types.now_timestamp()).SerializeToString()


# ---------------------------------------------------------------------------------------------
# -v, -info

def version_text() -> str:
    return (f"{BINARY_NAME}:\n  Version:  {contract.version()}\n  Runtime:  {RUNTIME_NAME}\n"
            f"  Python:   {sys.version.split()[0]}\n")


def runtime_info(stdin: bytes) -> bytes:
    """containerd.types.RuntimeInfo (containerd 2.x `-info`); options echoed back if given."""
    from spinbox.api._pb.containerd.types import introspection_pb2

    info = introspection_pb2.RuntimeInfo(
        name=RUNTIME_NAME, version=introspection_pb2.RuntimeVersion(version=contract.version(), revision=""))
    if stdin:
        opts = any_pb2.Any()
        try:
            opts.ParseFromString(stdin)
        except DecodeError as e:
            raise ShimError(f"-info: stdin is not a protobuf Any: {e}") from None
        if opts.type_url:
            info.options.CopyFrom(opts)
    return info.SerializeToString()
