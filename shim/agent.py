"""Host-side client of the guest agent (vminitd): typed, validated, reconnectable.

Everything the guest sends is UNTRUSTED. Every reply is checked (pids 1..2^22, exit statuses
0..255, ids equal to what we asked, bounded strings/lists/chunks, stream offsets contiguous and
inside the window we granted); a violation raises `AgentProtocolError`. No guest string is ever
used as a host path.

Connecting
    agent = await AgentClient.connect(address)   # address: unix socket path (str | PathLike:
                                                 #   the VM's virtio-serial chardev socket, or a
                                                 #   local `vminitd --listen unix:` socket), or
                                                 #   a vsock (cid, port) tuple
    agent = await AgentClient.wait_ready(address, deadline)   # deadline: absolute
            # time.monotonic() value (or timeout=seconds); pings with short timeouts until the
            # guest answers (virtio-serial drops/delays bytes sent before the guest opens the
            # port; late replies to abandoned pings are dropped by stream id). Raises
            # TimeoutError with the last error when the deadline passes.
    await agent.reconnect(deadline=None)   # virtio-serial: drop the connection, connect again,
            # ping until answered. Open output/input streams and event iterators resume by
            # themselves (from the last delivered offset / the last seen event sequence).
    agent.connected / await agent.wait_disconnected() / await agent.close()

Calls (all `async`; `timeout=` seconds, default DEFAULT_TIMEOUT; wait() has none)
    create(id, spec, *, rootfs_path="", rootfs_mounts=(), readonly=False, terminal=False,
           stdin=False, stdout=False, stderr=False) -> pid           spec: dict | bytes (OCI)
    start(id, exec_id="") -> pid
    exec(id, exec_id, process, *, terminal, stdin, stdout, stderr)    process: dict | bytes
    kill(id, exec_id="", signal=15, all=False)
    wait(id, exec_id="") -> ExitStatus(exit_status, exited_at_ns, pid)
    delete(id, exec_id="") -> ExitStatus
    state(id, exec_id="") -> ProcessState   (.status: containerd's Status numbers, .status_name)
    pids(id) -> list[ProcessInfo(pid, exec_id)]
    pause(id), resume(id), update(id, resources: dict | bytes), stats(id) -> Stats
    close_stdin(id, exec_id=""), resize_pty(id, exec_id, width, height)
    ping(), version() -> GuestVersion, info() -> GuestInfo, set_time(unix_ns=None),
    set_hostname(name), sync(), shutdown(reboot=False), online_cpus() -> CpuOnline,
    online_memory() -> MemoryOnline

Streams
    out = agent.open_output(id, exec_id, fd)   # fd 1 (stdout, or the TTY) / 2 (stderr)
    async for chunk in out: ...                # bytes; ends after the guest's EOF was acked
    out.offset                                 # bytes delivered to us so far
    await out.aclose()
        Credits: the guest may send `window` bytes beyond what we acknowledged; we acknowledge
        bytes when the consumer takes them (so a consumer that stops stops only that stream).
    inp = agent.open_input(id, exec_id)
    await inp.write(data)    # returns once `data` is queued with at most `window` bytes
                             # unacknowledged by the guest (back-pressure)
    await inp.close(timeout=None)    # EOF; returns when the guest acknowledged it
    async for ev in agent.events(after_seq=0): ...   # AgentEvent(seq, kind "exit"|"oom", ...)
        Resubscribes with the last seen seq after a reconnect; ends when the agent is closed.

Errors
    AgentError            base class of ours
    AgentProtocolError    the guest broke the protocol (bad value, offset, size, ...)
    AgentUnavailable      no connection (lost, or the client closed); also ConnectionClosed
    ttrpc.TTRPCError      subclasses (ttrpc.NotFound, ...) for errors the guest reported, with
                          the guest's message sanitised and truncated
    ttrpc.DeadlineExceeded  a call's timeout passed
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import ttrpc

from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import events_pb2 as epb
from spinbox.api._pb.spinbox.agent.v1 import network_pb2 as npb
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb
from spinbox.api._pb.spinbox.agent.v1 import system_pb2 as sypb

log = logging.getLogger("spinbox.agent")

Address = Union[str, os.PathLike, tuple]   # unix socket path, or (cid, port) for vsock

SVC_CONTAINERS = "spinbox.agent.v1.Containers"
SVC_STDIO = "spinbox.agent.v1.Stdio"
SVC_EVENTS = "spinbox.agent.v1.Events"
SVC_SYSTEM = "spinbox.agent.v1.System"
SVC_NETWORK = "spinbox.agent.v1.Network"
SHARES_ROOT = "/run/spinbox/shares"     # guest: CreateRequest.shares are mounted at <root>/<id>/<target>

DEFAULT_TIMEOUT = 60.0           # one unary call (runc under TCG takes ~1 s; be generous)
DEFAULT_OUTPUT_WINDOW = 1 << 20  # guest bytes in flight per output stream
MAX_WINDOW = 16 << 20            # largest stdin window we accept from the guest
MAX_CHUNK = 1 << 20              # largest output data message we accept (the guest sends 64 KiB)
MAX_READ = 256 << 10             # largest chunk handed to a consumer at once
PID_MAX = 1 << 22                # Linux PID_MAX_LIMIT
MAX_STRING = 4096                # any string from the guest
MAX_ERROR_MESSAGE = 2048
MAX_PIDS = 65536
MAX_RAW_STATS = 1 << 20
PING_TIMEOUT_FIRST = 0.25
PING_TIMEOUT_MAX = 3.0
STREAM_BUFFER_MESSAGES = 1024    # ttrpc per-stream receive buffer (readers drain at once)

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,75}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_STATUS_NAMES = {0: "unknown", 1: "created", 2: "running", 3: "stopped", 4: "paused", 5: "pausing"}


# ------------------------------------------------------------------------------- errors

class AgentError(Exception):
    pass


class AgentProtocolError(AgentError):
    """The guest sent something that breaks the protocol; the guest is not trusted."""


class AgentUnavailable(AgentError):
    """No usable connection to the guest agent."""


# ------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class ExitStatus:
    exit_status: int
    exited_at_ns: int
    pid: int


@dataclass(frozen=True)
class ProcessState:
    id: str
    exec_id: str
    pid: int
    status: int           # containerd.v1.types.Status numbers
    terminal: bool
    exit_status: int
    exited_at_ns: int
    stdin: bool
    stdout: bool
    stderr: bool

    @property
    def status_name(self) -> str:
        return _STATUS_NAMES.get(self.status, "unknown")


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    exec_id: str


@dataclass(frozen=True)
class Stats:
    cpu_usage_ns: int
    cpu_user_ns: int
    cpu_system_ns: int
    memory_usage_bytes: int
    memory_limit_bytes: int
    pids_current: int
    pids_limit: int
    oom_kills: int
    raw: bytes            # `runc events --stats` JSON (bounded); parse with care


@dataclass(frozen=True)
class GuestVersion:
    agent_version: str
    api: str
    runtime: str


@dataclass(frozen=True)
class GuestInfo:
    kernel: str
    cpus_online: int
    cpus_present: int
    memory_total_bytes: int
    memory_available_bytes: int
    uptime_s: float
    pid1: bool

    @property
    def memory_used_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_available_bytes)


@dataclass(frozen=True)
class CpuOnline:
    onlined: int
    online: int
    present: int


@dataclass(frozen=True)
class MemoryOnline:
    blocks_onlined: int
    blocks_online: int
    memory_total_bytes: int


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str = ""
    options: Sequence[str] = ()


@dataclass(frozen=True)
class AgentEvent:
    seq: int
    timestamp_ns: int
    gap: bool                 # events before this one were dropped from the guest's ring
    kind: str                 # "exit" | "oom"
    id: str
    exec_id: str = ""
    pid: int = 0
    exit_status: int = 0
    exited_at_ns: int = 0


# ------------------------------------------------------------------------------- validation

def _bad(msg: str) -> AgentProtocolError:
    return AgentProtocolError(f"guest agent protocol violation: {msg}")


def check_pid(pid: int, what: str, *, allow_zero: bool = False) -> int:
    if pid == 0 and allow_zero:
        return 0
    if not 1 <= pid <= PID_MAX:
        raise _bad(f"{what}: pid {pid} outside 1..{PID_MAX}")
    return pid


def check_exit_status(status: int, what: str) -> int:
    if not 0 <= status <= 255:
        raise _bad(f"{what}: exit status {status} outside 0..255")
    return status


def check_time_ns(t: int, what: str) -> int:
    if t < 0:
        raise _bad(f"{what}: negative time {t}")
    return t


def check_string(s: str, what: str, limit: int = MAX_STRING) -> str:
    if len(s) > limit:
        raise _bad(f"{what}: string of {len(s)} characters (limit {limit})")
    if any(c in s for c in "\0\r\n"):
        raise _bad(f"{what}: control characters in {s[:80]!r}")
    return s


def check_guest_id(s: str, what: str, *, allow_empty: bool = False) -> str:
    if s == "" and allow_empty:
        return s
    if not _ID_RE.fullmatch(s) or ".." in s:
        raise _bad(f"{what}: invalid id {s[:80]!r}")
    return s


def _check_request_id(s: str, what: str, *, allow_empty: bool = False) -> str:
    """Our own arguments: refuse early with ValueError (the guest would refuse them too)."""
    if s == "" and allow_empty:
        return s
    if not isinstance(s, str) or not _ID_RE.fullmatch(s) or ".." in s:
        raise ValueError(f"invalid {what} {s!r}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,75}}")
    return s


def _sanitize(message: str) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in message[:MAX_ERROR_MESSAGE])
    return clean + ("..." if len(message) > MAX_ERROR_MESSAGE else "")


def _as_json(value: dict | bytes | str, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


# ------------------------------------------------------------------------------- transport

async def _open(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(address, tuple):
        cid, port = address
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # type: ignore[attr-defined]
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (int(cid), int(port)))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=1 << 20)
    path = os.fspath(address)
    if path.startswith("unix://"):
        path = path[len("unix://"):]
    elif path.startswith("unix:"):
        path = path[len("unix:"):]
    return await asyncio.open_unix_connection(path, limit=1 << 20)


def _describe(address: Address) -> str:
    if isinstance(address, tuple):
        return f"vsock:{address[0]}:{address[1]}"
    return f"unix:{os.fspath(address)}"


# ------------------------------------------------------------------------------- client

class AgentClient:
    def __init__(self, address: Address) -> None:
        self.address = address
        self._client: ttrpc.Client | None = None
        self._gen = 0                         # bumps on every new connection
        self._changed = asyncio.Event()       # set+replaced whenever the connection changes
        self._closed = False
        self._next_stream_id = 1
        self._reconnect_lock = asyncio.Lock()
        self._streams: set[Any] = set()       # open OutputStream / InputStream objects

    # -- connection -----------------------------------------------------------------------

    @classmethod
    async def connect(cls, address: Address) -> AgentClient:
        agent = cls(address)
        await agent._connect()
        return agent

    @classmethod
    async def wait_ready(cls, address: Address, deadline: float | None = None, *,
                         timeout: float | None = None) -> AgentClient:
        """Connect and ping until the guest answers. `deadline` is a time.monotonic() value."""
        if deadline is None:
            deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
        agent = cls(address)
        try:
            await agent._connect_and_probe(deadline)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def _connect(self) -> None:
        reader, writer = await _open(self.address)
        # Stream ids continue across connections: on virtio-serial, frames the guest wrote for
        # the previous connection may still arrive on this one, and must not match a new call.
        client = ttrpc.Client(reader, writer, stream_buffer_messages=STREAM_BUFFER_MESSAGES,
                              first_stream_id=self._next_stream_id)
        self._install(client)

    def _install(self, client: ttrpc.Client | None) -> None:
        old = self._client
        if old is not None:
            self._next_stream_id = max(self._next_stream_id, old.next_stream_id)
        self._client = client
        if client is not None:
            self._gen += 1
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def _connect_and_probe(self, deadline: float) -> None:
        """(Re)connect until a ping is answered or the deadline passes."""
        last: BaseException | None = None
        ping_timeout = PING_TIMEOUT_FIRST
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"guest agent at {_describe(self.address)} did not answer a ping "
                                   f"in time (last error: {last!r})")
            if self._client is None or self._client.closed:
                if self._client is not None:
                    await self._drop_client()
                try:
                    await self._connect()
                except (OSError, ValueError) as e:   # socket not there yet / refused
                    last = e
                    await asyncio.sleep(min(0.05, max(0.0, deadline - now)))
                    continue
            try:
                await self._unary(SVC_SYSTEM, "Ping", cpb.Empty(), cpb.Empty,
                                  min(ping_timeout, max(0.01, deadline - time.monotonic())))
                return
            except ttrpc.DeadlineExceeded as e:
                # The guest may not have opened the port yet: bytes can be late or lost. Ask
                # again on a new stream id; a late answer to this one is dropped.
                last = e
                ping_timeout = min(ping_timeout * 1.5, PING_TIMEOUT_MAX)
            except AgentUnavailable as e:
                last = e
                await self._drop_client()
                await asyncio.sleep(0.05)

    async def _drop_client(self) -> None:
        client = self._client
        if client is None:
            return
        self._install(None)
        with contextlib.suppress(Exception):
            await client.close()

    async def reconnect(self, deadline: float | None = None, *, timeout: float = 30.0) -> None:
        """Close the current connection and connect again, pinging until the guest answers.
        Streams and event iterators resume on the new connection."""
        if self._closed:
            raise AgentUnavailable("agent client is closed")
        if deadline is None:
            deadline = time.monotonic() + timeout
        async with self._reconnect_lock:
            await self._drop_client()
            await self._connect_and_probe(deadline)

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._client.closed

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_disconnected(self) -> None:
        """Returns when the current connection is gone (or right away if there is none)."""
        while self._client is not None and not self._client.closed:
            client = self._client
            waiter = asyncio.ensure_future(client.wait_closed())
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait([waiter, changed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                changed.cancel()

    async def close(self) -> None:
        """Close the connection for good; streams and event iterators end."""
        if self._closed:
            return
        self._closed = True
        for s in list(self._streams):
            s._abort(AgentUnavailable("agent client closed"))
        await self._drop_client()
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _current(self, after_gen: int = 0) -> tuple[ttrpc.Client, int]:
        """The connected client with generation > after_gen; waits for a reconnect."""
        while True:
            if self._closed:
                raise AgentUnavailable("agent client is closed")
            c = self._client
            if c is not None and not c.closed and self._gen > after_gen:
                return c, self._gen
            await self._changed.wait()

    # -- unary plumbing ------------------------------------------------------------------

    async def _unary(self, service: str, method: str, request: Any, response_type: type,
                     timeout: float | None) -> Any:
        if self._closed:
            raise AgentUnavailable("agent client is closed")
        client = self._client
        if client is None or client.closed:
            raise AgentUnavailable(f"not connected to the guest agent at {_describe(self.address)}")
        try:
            return await client.call(service, method, request, response_type, timeout=timeout)
        except ttrpc.ConnectionClosed as e:
            raise AgentUnavailable(f"{method}: connection to the guest agent lost ({e.message})") from None
        except ttrpc.DeadlineExceeded:
            raise
        except ttrpc.TTRPCError as e:
            raise ttrpc.error_from_status(int(e.code), f"guest: {_sanitize(e.message)}") from None

    # -- containers ------------------------------------------------------------------------

    async def create(self, id: str, spec: dict | bytes, *, rootfs_path: str = "",
                     rootfs_mounts: Sequence[Mount] = (), readonly: bool = False,
                     terminal: bool = False, stdin: bool = False, stdout: bool = False,
                     stderr: bool = False, shares: Sequence[Mount] = (),
                     timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """`shares`: virtiofs tags the guest mounts at SHARES_ROOT/<id>/<target> first."""
        _check_request_id(id, "container id")
        rootfs = cpb.Rootfs(path=rootfs_path, readonly=readonly, mounts=[
            cpb.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
            for m in rootfs_mounts])
        req = cpb.CreateRequest(id=id, spec=_as_json(spec, "spec"), rootfs=rootfs, terminal=terminal,
                                stdin=stdin, stdout=stdout, stderr=stderr,
                                shares=[cpb.Mount(type=m.type, source=m.source, target=m.target,
                                                  options=list(m.options)) for m in shares])
        resp = await self._unary(SVC_CONTAINERS, "Create", req, cpb.CreateResponse, timeout)
        return check_pid(resp.pid, f"create {id}")

    async def start(self, id: str, exec_id: str = "", *, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id", allow_empty=True)
        resp = await self._unary(SVC_CONTAINERS, "Start", cpb.StartRequest(id=id, exec_id=exec_id),
                                 cpb.StartResponse, timeout)
        return check_pid(resp.pid, f"start {id}/{exec_id}")

    async def exec(self, id: str, exec_id: str, process: dict | bytes, *, terminal: bool = False,
                   stdin: bool = False, stdout: bool = False, stderr: bool = False,
                   timeout: float | None = DEFAULT_TIMEOUT) -> None:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id")
        req = cpb.ExecRequest(id=id, exec_id=exec_id, process=_as_json(process, "process"),
                              terminal=terminal, stdin=stdin, stdout=stdout, stderr=stderr)
        await self._unary(SVC_CONTAINERS, "Exec", req, cpb.Empty, timeout)

    async def kill(self, id: str, exec_id: str = "", signal: int = 15, all: bool = False, *,
                   timeout: float | None = DEFAULT_TIMEOUT) -> None:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id", allow_empty=True)
        if not 1 <= int(signal) <= 64:
            raise ValueError(f"invalid signal {signal}: must be 1..64")
        await self._unary(SVC_CONTAINERS, "Kill",
                          cpb.KillRequest(id=id, exec_id=exec_id, signal=int(signal), all=all),
                          cpb.Empty, timeout)

    async def wait(self, id: str, exec_id: str = "", *, timeout: float | None = None) -> ExitStatus:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id", allow_empty=True)
        resp = await self._unary(SVC_CONTAINERS, "Wait", cpb.WaitRequest(id=id, exec_id=exec_id),
                                 cpb.WaitResponse, timeout)
        what = f"wait {id}/{exec_id}"
        return ExitStatus(check_exit_status(resp.exit_status, what), check_time_ns(resp.exited_at_ns, what),
                          check_pid(resp.pid, what))

    async def delete(self, id: str, exec_id: str = "", *, timeout: float | None = DEFAULT_TIMEOUT) -> ExitStatus:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id", allow_empty=True)
        resp = await self._unary(SVC_CONTAINERS, "Delete", cpb.DeleteRequest(id=id, exec_id=exec_id),
                                 cpb.DeleteResponse, timeout)
        what = f"delete {id}/{exec_id}"
        # a never-started exec has no pid
        return ExitStatus(check_exit_status(resp.exit_status, what), check_time_ns(resp.exited_at_ns, what),
                          check_pid(resp.pid, what, allow_zero=True))

    async def state(self, id: str, exec_id: str = "", *, timeout: float | None = DEFAULT_TIMEOUT) -> ProcessState:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id", allow_empty=True)
        r = await self._unary(SVC_CONTAINERS, "State", cpb.StateRequest(id=id, exec_id=exec_id),
                              cpb.StateResponse, timeout)
        what = f"state {id}/{exec_id}"
        if r.id != id or r.exec_id != exec_id:
            raise _bad(f"{what}: reply is about {r.id[:80]!r}/{r.exec_id[:80]!r}")
        if r.status not in _STATUS_NAMES:
            raise _bad(f"{what}: unknown status {r.status}")
        return ProcessState(id, exec_id, check_pid(r.pid, what, allow_zero=True), int(r.status), r.terminal,
                            check_exit_status(r.exit_status, what), check_time_ns(r.exited_at_ns, what),
                            r.stdin, r.stdout, r.stderr)

    async def pids(self, id: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> list[ProcessInfo]:
        _check_request_id(id, "container id")
        r = await self._unary(SVC_CONTAINERS, "Pids", cpb.PidsRequest(id=id), cpb.PidsResponse, timeout)
        if len(r.processes) > MAX_PIDS:
            raise _bad(f"pids {id}: {len(r.processes)} processes (limit {MAX_PIDS})")
        return [ProcessInfo(check_pid(p.pid, f"pids {id}"),
                            check_guest_id(p.exec_id, f"pids {id}", allow_empty=True)) for p in r.processes]

    async def pause(self, id: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        _check_request_id(id, "container id")
        await self._unary(SVC_CONTAINERS, "Pause", cpb.ContainerRequest(id=id), cpb.Empty, timeout)

    async def resume(self, id: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        _check_request_id(id, "container id")
        await self._unary(SVC_CONTAINERS, "Resume", cpb.ContainerRequest(id=id), cpb.Empty, timeout)

    async def update(self, id: str, resources: dict | bytes, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        _check_request_id(id, "container id")
        await self._unary(SVC_CONTAINERS, "Update",
                          cpb.UpdateRequest(id=id, resources=_as_json(resources, "resources")), cpb.Empty, timeout)

    async def stats(self, id: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> Stats:
        _check_request_id(id, "container id")
        r = await self._unary(SVC_CONTAINERS, "Stats", cpb.StatsRequest(id=id), cpb.StatsResponse, timeout)
        if len(r.raw) > MAX_RAW_STATS:
            raise _bad(f"stats {id}: raw stats of {len(r.raw)} bytes (limit {MAX_RAW_STATS})")
        return Stats(r.cpu_usage_ns, r.cpu_user_ns, r.cpu_system_ns, r.memory_usage_bytes, r.memory_limit_bytes,
                     r.pids_current, r.pids_limit, r.oom_kills, bytes(r.raw))

    async def close_stdin(self, id: str, exec_id: str = "", *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id", allow_empty=True)
        await self._unary(SVC_CONTAINERS, "CloseStdin", cpb.CloseStdinRequest(id=id, exec_id=exec_id),
                          cpb.Empty, timeout)

    async def resize_pty(self, id: str, exec_id: str, width: int, height: int, *,
                         timeout: float | None = DEFAULT_TIMEOUT) -> None:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id", allow_empty=True)
        await self._unary(SVC_CONTAINERS, "ResizePty",
                          cpb.ResizePtyRequest(id=id, exec_id=exec_id, width=width, height=height),
                          cpb.Empty, timeout)

    # -- system ------------------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = 5.0) -> None:
        await self._unary(SVC_SYSTEM, "Ping", cpb.Empty(), cpb.Empty, timeout)

    async def version(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> GuestVersion:
        r = await self._unary(SVC_SYSTEM, "Version", cpb.Empty(), sypb.VersionResponse, timeout)
        return GuestVersion(check_string(r.agent_version, "version", 256), check_string(r.api, "version api", 256),
                            check_string(r.runtime, "version runtime"))

    async def info(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> GuestInfo:
        r = await self._unary(SVC_SYSTEM, "Info", cpb.Empty(), sypb.InfoResponse, timeout)
        if r.cpus_online > 4096 or r.cpus_present > 4096:
            raise _bad(f"info: {r.cpus_online} cpus online / {r.cpus_present} present")
        if r.memory_available_bytes > r.memory_total_bytes:
            raise _bad(f"info: memory available {r.memory_available_bytes} > total {r.memory_total_bytes}")
        if not (r.uptime_s >= 0 and r.uptime_s < 1e10):    # also rejects NaN
            raise _bad(f"info: uptime {r.uptime_s}")
        return GuestInfo(check_string(r.kernel, "info kernel", 256), r.cpus_online, r.cpus_present,
                         r.memory_total_bytes, r.memory_available_bytes, r.uptime_s, r.pid1)

    async def set_time(self, unix_ns: int | None = None, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await self._unary(SVC_SYSTEM, "SetTime", sypb.SetTimeRequest(unix_ns=unix_ns or time.time_ns()),
                          cpb.Empty, timeout)

    async def set_hostname(self, hostname: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await self._unary(SVC_SYSTEM, "SetHostname", sypb.SetHostnameRequest(hostname=hostname), cpb.Empty, timeout)

    async def sync(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await self._unary(SVC_SYSTEM, "Sync", cpb.Empty(), cpb.Empty, timeout)

    async def shutdown(self, reboot: bool = False, *, timeout: float | None = 10.0) -> None:
        """Ask the guest to kill its containers, sync and power off. Returns when the guest
        acknowledged; the VM exits shortly after (wait for QEMU's exit)."""
        await self._unary(SVC_SYSTEM, "Shutdown", sypb.ShutdownRequest(reboot=reboot), cpb.Empty, timeout)

    async def online_cpus(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> CpuOnline:
        r = await self._unary(SVC_SYSTEM, "OnlineCpus", cpb.Empty(), sypb.OnlineCpusResponse, timeout)
        if max(r.onlined, r.online, r.present) > 4096 or r.online > r.present:
            raise _bad(f"online_cpus: onlined {r.onlined} online {r.online} present {r.present}")
        return CpuOnline(r.onlined, r.online, r.present)

    async def online_memory(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> MemoryOnline:
        r = await self._unary(SVC_SYSTEM, "OnlineMemory", cpb.Empty(), sypb.OnlineMemoryResponse, timeout)
        if r.blocks_onlined > r.blocks_online:
            raise _bad(f"online_memory: onlined {r.blocks_onlined} > online {r.blocks_online}")
        return MemoryOnline(r.blocks_onlined, r.blocks_online, r.memory_total_bytes)

    # -- network -----------------------------------------------------------------------------

    async def configure_network(self, request: npb.ConfigureRequest, *,
                                timeout: float | None = DEFAULT_TIMEOUT) -> dict[str, str]:
        """Network.Configure; returns mac -> the guest's link name, for the requested MACs only
        (anything else in the answer is a protocol violation)."""
        r = await self._unary(SVC_NETWORK, "Configure", request, npb.ConfigureResponse, timeout)
        wanted = {i.mac.lower() for i in request.interfaces}
        out: dict[str, str] = {}
        for it in r.interfaces:
            mac = it.mac.lower()
            if mac not in wanted or mac in out:
                raise _bad(f"configure_network: unexpected interface {check_string(it.mac, 'mac', 64)!r}")
            if not _IFNAME_RE.fullmatch(it.name):
                raise _bad(f"configure_network: invalid link name {check_string(it.name, 'name', 64)!r}")
            out[mac] = it.name
        return out

    # -- streams -----------------------------------------------------------------------------

    def open_output(self, id: str, exec_id: str, fd: int, *, offset: int = 0,
                    window: int = DEFAULT_OUTPUT_WINDOW) -> OutputStream:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id", allow_empty=True)
        if fd not in (1, 2):
            raise ValueError(f"output fd must be 1 (stdout) or 2 (stderr), not {fd}")
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"output window {window} outside 1..{MAX_WINDOW}")
        return OutputStream(self, id, exec_id, fd, offset, window)

    def open_input(self, id: str, exec_id: str = "") -> InputStream:
        _check_request_id(id, "container id")
        _check_request_id(exec_id, "exec id", allow_empty=True)
        return InputStream(self, id, exec_id)

    async def events(self, after_seq: int = 0) -> AsyncIterator[AgentEvent]:
        """Every event with seq > after_seq, following reconnects; ends when the agent closes."""
        last = after_seq
        gen = 0
        while True:
            try:
                client, gen = await self._current(gen)
            except AgentUnavailable:
                return
            try:
                stream = await client.open_stream(SVC_EVENTS, "Subscribe", epb.Event,
                                                  request=epb.SubscribeRequest(after_seq=last),
                                                  server_streaming=True)
                try:
                    async for msg in stream:
                        ev = _event_from(msg, last)
                        last = ev.seq if ev is not None else msg.seq
                        if ev is not None:
                            yield ev
                finally:
                    await stream.aclose()
            except ttrpc.ConnectionClosed:
                pass
            except (ttrpc.DeadlineExceeded, AgentProtocolError):
                raise
            except ttrpc.TTRPCError as e:
                raise ttrpc.error_from_status(int(e.code), f"guest: events: {_sanitize(e.message)}") from None
            # the stream ended (the connection was lost or replaced): the next round waits for
            # a newer connection, then resubscribes after the last event we saw
            if self._closed:
                return


def _event_from(msg: epb.Event, last: int) -> AgentEvent | None:
    if msg.seq <= last:
        raise _bad(f"event seq {msg.seq} not after {last}")
    check_time_ns(msg.timestamp_ns, "event")
    kind = msg.WhichOneof("event")
    if kind == "exit":
        e = msg.exit
        what = f"exit event {msg.seq}"
        return AgentEvent(msg.seq, msg.timestamp_ns, msg.gap, "exit", check_guest_id(e.id, what),
                          check_guest_id(e.exec_id, what, allow_empty=True), check_pid(e.pid, what),
                          check_exit_status(e.exit_status, what), check_time_ns(e.exited_at_ns, what))
    if kind == "oom":
        return AgentEvent(msg.seq, msg.timestamp_ns, msg.gap, "oom", check_guest_id(msg.oom.id, f"oom event {msg.seq}"))
    log.debug("agent: ignoring event %d of unknown kind", msg.seq)
    return None


# ------------------------------------------------------------------------------- streams

class _ResumableStream:
    """What output and input streams share: a background task that (re)opens the guest
    session after every reconnect, a change signal for waiters, and a first-error latch."""

    _kind = "stream"

    def _finished(self) -> bool:
        raise NotImplementedError

    def _kick(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def _abort(self, error: BaseException) -> None:
        if self._error is None and not self._finished():
            self._error = error
        self._kick()

    def _ensure_task(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"agent-{self._kind}-{self.name}")


# ------------------------------------------------------------------------------- output

class OutputStream(_ResumableStream):
    """Bytes of one process's stdout/stderr, in order, exactly once, across reconnects."""

    _kind = "output"

    def __init__(self, agent: AgentClient, id: str, exec_id: str, fd: int, offset: int, window: int) -> None:
        self.agent = agent
        self.id, self.exec_id, self.fd = id, exec_id, fd
        self.window = window
        self.offset = offset              # delivered to our consumer
        self._pending = bytearray()       # received, not yet delivered: [offset, _received)
        self._received = offset
        self._acked = offset              # what we last told the guest
        self._eof_at: int | None = None   # the guest's EOF offset, once received
        self._eof_acked = False
        self._error: BaseException | None = None
        self._stream: ttrpc.ClientStream | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._done = False
        agent._streams.add(self)

    @property
    def name(self) -> str:
        return f"{self.id}/{self.exec_id or 'init'}/{'stdout' if self.fd == 1 else 'stderr'}"

    def _finished(self) -> bool:
        return self._done

    async def _run(self) -> None:
        """Open sessions (again after every reconnect) and move guest chunks into _pending."""
        gen = 0
        try:
            while not self._done:
                client, gen = await self.agent._current(gen)
                if self._eof_acked:
                    return
                # resume at what the consumer has: pending bytes were not delivered, drop them
                self._pending.clear()
                self._received = self._acked = self.offset
                self._eof_at = None
                try:
                    await self._session(client)
                    return
                except ttrpc.ConnectionClosed:
                    log.debug("agent: %s: connection lost at offset %d; waiting for a reconnect",
                              self.name, self.offset)
                    self._stream = None
                    continue
        except ttrpc.TTRPCError as e:
            if isinstance(e, ttrpc.DeadlineExceeded):
                self._abort(e)
            else:
                self._abort(ttrpc.error_from_status(int(e.code), f"guest: output {self.name}: {_sanitize(e.message)}"))
        except BaseException as e:   # protocol errors, AgentUnavailable, cancellation
            self._abort(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._stream = None
            self._kick()

    async def _session(self, client: ttrpc.Client) -> None:
        open_msg = spb.OutputClient(open=spb.OutputOpen(id=self.id, exec_id=self.exec_id, fd=self.fd,
                                                        offset=self.offset, window=self.window))
        stream = await client.open_stream(SVC_STDIO, "Output", spb.OutputServer, request=open_msg,
                                          client_streaming=True, server_streaming=True)
        self._stream = stream
        try:
            while True:
                msg = await stream.recv()
                if msg is None:
                    if self._eof_acked:
                        return
                    if client.closed:   # the stream ended because the connection did
                        raise ttrpc.ConnectionClosed("connection closed")
                    raise _bad(f"output {self.name}: stream ended at offset {self._received} without EOF")
                self._accept(msg)
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    def _accept(self, msg: spb.OutputServer) -> None:
        where = f"output {self.name}"
        if self._eof_at is not None:
            raise _bad(f"{where}: data after EOF")
        if msg.offset != self._received:
            raise _bad(f"{where}: chunk at offset {msg.offset}, expected {self._received}")
        n = len(msg.data)
        if msg.eof:
            if n:
                raise _bad(f"{where}: EOF message carries {n} bytes")
            self._eof_at = msg.offset
            self._kick()
            return
        if n == 0:
            raise _bad(f"{where}: empty data message")
        if n > MAX_CHUNK:
            raise _bad(f"{where}: chunk of {n} bytes (limit {MAX_CHUNK})")
        if msg.offset + n > self._acked + self.window:
            raise _bad(f"{where}: chunk [{msg.offset}, {msg.offset + n}) beyond the window "
                       f"(acked {self._acked} + {self.window})")
        self._pending += msg.data
        self._received += n
        self._kick()

    async def _send_ack(self, eof: bool = False) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            await stream.send(spb.OutputClient(ack=spb.OutputAck(offset=self.offset, window=self.window, eof=eof)))
            self._acked = self.offset
        except ttrpc.TTRPCError:
            pass   # the session is going away; the next one resumes at self.offset

    async def read(self) -> bytes | None:
        """The next bytes, or None once the guest's EOF was received and acknowledged."""
        self._ensure_task()
        while True:
            if self._pending:
                data = bytes(self._pending[:MAX_READ])
                del self._pending[:len(data)]
                self.offset += len(data)
                # grant credit as the consumer takes data: in quarters of the window, or now
                # when we have nothing left (the guest may be waiting for exactly this)
                if self.offset - self._acked >= self.window // 4 or not self._pending:
                    await self._send_ack()
                return data
            if self._eof_at is not None and self._eof_at == self.offset:
                if not self._eof_acked:
                    self._eof_acked = True
                    self._done = True
                    await self._send_ack(eof=True)
                    with contextlib.suppress(Exception):
                        if self._stream is not None:
                            await self._stream.close_send()
                    self.agent._streams.discard(self)
                return None
            if self._error is not None:
                self.agent._streams.discard(self)
                raise self._error
            if self._done:
                return None
            waiter = self._changed
            await waiter.wait()

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if data is None:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        self._done = True
        self.agent._streams.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._kick()


# ------------------------------------------------------------------------------- input

class InputStream(_ResumableStream):
    """A process's stdin: bytes in order, exactly once, across reconnects; EOF acknowledged."""

    _kind = "input"

    def __init__(self, agent: AgentClient, id: str, exec_id: str) -> None:
        self.agent = agent
        self.id, self.exec_id = id, exec_id
        self._buf = bytearray()        # bytes from _acked on that the guest has not confirmed
        self._acked = 0                # the guest confirmed receiving everything before this
        self._sent = 0                 # sent on the current session
        self._limit = 0                # may send up to here (guest's offset + window)
        self._window = 0
        self._eof_requested = False
        self._eof_sent = False
        self._eof_acked = False
        self._error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._opened = False           # a session got the guest's first answer
        agent._streams.add(self)

    @property
    def name(self) -> str:
        return f"{self.id}/{self.exec_id or 'init'}/stdin"

    @property
    def offset(self) -> int:
        """Bytes the guest confirmed receiving."""
        return self._acked

    def _finished(self) -> bool:
        return self._eof_acked

    async def _run(self) -> None:
        gen = 0
        try:
            while not self._eof_acked:
                client, gen = await self.agent._current(gen)
                try:
                    await self._session(client)
                except ttrpc.ConnectionClosed:
                    log.debug("agent: %s: connection lost; waiting for a reconnect", self.name)
                    continue
        except ttrpc.TTRPCError as e:
            if isinstance(e, ttrpc.DeadlineExceeded):
                self._abort(e)
            else:
                self._abort(ttrpc.error_from_status(int(e.code), f"guest: input {self.name}: {_sanitize(e.message)}"))
        except BaseException as e:
            self._abort(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._kick()

    async def _session(self, client: ttrpc.Client) -> None:
        self._opened = False
        stream = await client.open_stream(SVC_STDIO, "Input", spb.InputServer,
                                          request=spb.InputClient(open=spb.InputOpen(id=self.id, exec_id=self.exec_id)),
                                          client_streaming=True, server_streaming=True)
        sender: asyncio.Task | None = None
        try:
            while True:
                msg = await stream.recv()
                if msg is None:
                    if self._eof_acked:
                        return
                    if client.closed:
                        raise ttrpc.ConnectionClosed("connection closed")
                    raise _bad(f"input {self.name}: stream ended without acknowledging EOF")
                self._accept(msg)
                if self._eof_acked:
                    return
                if sender is None:
                    sender = asyncio.ensure_future(self._send_loop(stream))
                elif sender.done():
                    sender.result()
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
            with contextlib.suppress(Exception):
                await stream.aclose()

    def _accept(self, msg: spb.InputServer) -> None:
        where = f"input {self.name}"
        end = self._acked + len(self._buf)
        if msg.offset < self._acked:
            raise _bad(f"{where}: guest offset went back from {self._acked} to {msg.offset}")
        top = self._sent if self._opened else end
        if msg.offset > top:
            raise _bad(f"{where}: guest acknowledged {msg.offset} bytes but only {top} were sent")
        if msg.window > MAX_WINDOW:
            raise _bad(f"{where}: window {msg.window} (limit {MAX_WINDOW})")
        if msg.eof:
            if not self._eof_sent or msg.offset != end:
                raise _bad(f"{where}: EOF acknowledged at {msg.offset} before we sent it (end {end})")
            del self._buf[:]
            self._acked = msg.offset
            self._eof_acked = True
            self.agent._streams.discard(self)
            self._kick()
            return
        del self._buf[:msg.offset - self._acked]
        self._acked = msg.offset
        self._window = msg.window
        self._limit = msg.offset + msg.window
        if not self._opened:
            # a new session: resume at the guest's position
            self._opened = True
            self._sent = msg.offset
            self._eof_sent = False
        self._kick()

    async def _send_loop(self, stream: ttrpc.ClientStream) -> None:
        while True:
            waiter = self._changed
            end = self._acked + len(self._buf)
            n = min(end, self._limit) - self._sent
            if n > 0:
                start = self._sent - self._acked
                piece = bytes(self._buf[start:start + min(n, 64 << 10)])
                await stream.send(spb.InputClient(data=spb.InputData(offset=self._sent, data=piece)))
                self._sent += len(piece)
                continue
            if self._eof_requested and not self._eof_sent and self._sent == end:
                self._eof_sent = True
                await stream.send(spb.InputClient(data=spb.InputData(offset=self._sent, eof=True)))
                continue
            await waiter.wait()

    async def write(self, data: bytes) -> None:
        """Queue data; waits while more than the guest's window is unacknowledged."""
        if self._eof_requested:
            raise ValueError(f"{self.name}: write after close")
        self._ensure_task()
        view = memoryview(bytes(data))
        while view:
            if self._error is not None:
                raise self._error
            waiter = self._changed
            room = max(self._window, 64 << 10) - len(self._buf)
            if room <= 0:
                await waiter.wait()
                continue
            self._buf += view[:room]
            view = view[room:]
            self._kick()

    async def close(self, timeout: float | None = None) -> None:
        """Send EOF after everything written; returns when the guest acknowledged it."""
        self._ensure_task()
        self._eof_requested = True
        self._kick()

        async def acked() -> None:
            while not self._eof_acked:
                if self._error is not None:
                    raise self._error
                waiter = self._changed
                await waiter.wait()
        await asyncio.wait_for(acked(), timeout)

    async def aclose(self) -> None:
        """Stop without EOF (the process's stdin stays open in the guest)."""
        self.agent._streams.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
