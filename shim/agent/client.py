"""`AgentClient`: the shim's typed, validated calls to the guest agent (vminitd).

Everything the guest sends is untrusted: every reply is checked (see `validate`), and a
violation raises `AgentProtocolError`. No guest string is ever used as a host path. One
connection per VM: when it is lost the VM is lost (calls raise `AgentUnavailable`).

    agent = await AgentClient.wait_ready(address, deadline)   # connect, ping until answered
    pid = await agent.create(id, spec, rootfs_path=...)        # unary calls: `timeout=` seconds,
                                                               # default AGENT_CALL_TIMEOUT_S
    out = agent.open_output(id, exec_id, 1); inp = agent.open_input(id, exec_id)   # streams
    async for ev in agent.events(after_seq=0): ...             # AgentEvent, in seq order
    await agent.close()

Errors the guest reported arrive as `ttrpc.TTRPCError` subclasses with the guest's code and
its message sanitised; a call's timeout is `ttrpc.DeadlineExceeded`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ttrpc

from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import events_pb2 as epb
from spinbox.api._pb.spinbox.agent.v1 import network_pb2 as npb
from spinbox.api._pb.spinbox.agent.v1 import system_pb2 as sypb
from spinbox.api.contract import AGENT_CALL_TIMEOUT_S, SHUTDOWN_TIMEOUT_S

from ..counters import AGENT_CALLS
from ..ratelimit import LogThrottle
from .errors import AgentProtocolError, AgentUnavailable
from .records import (STATUS_NAMES, AgentEvent, CpuOnline, ExitStatus, GuestInfo, GuestVersion,
                      MemoryOnline, Mount, ProcessInfo, ProcessState, Stats)
from .streams import DEFAULT_OUTPUT_WINDOW, InputStream, OutputStream
from .transport import (SVC_CONTAINERS, SVC_EVENTS, SVC_NETWORK, SVC_SYSTEM, Address, Channel,
                        describe)
from .validate import (as_json, check_exit_status, check_guest_id, check_link_name, check_pid,
                       check_request_id, check_string, check_time_ns, protocol_error, sanitize)

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0             # a liveness ping answers at once or not at all
MAX_PIDS = 65536
MAX_RAW_STATS = 1 << 20
MAX_CPUS = 4096
MAX_CPU_MS = 1 << 53              # ~285 years of CPU time: anything past it is a lie


class AgentClient:
    """One guest agent connection: unary calls, the event subscription and stdio streams."""

    def __init__(self, address: Address, *, first_stream_id: int = 1) -> None:
        self.address = address
        self._channel = Channel(address, first_stream_id=first_stream_id)

    @property
    def next_stream_id(self) -> int:
        """Where a later client of the same guest must start (see `wait_ready`)."""
        return self._channel.next_stream_id

    # -- connection -----------------------------------------------------------------------

    @classmethod
    async def connect(cls, address: Address) -> AgentClient:
        """Connect without waiting for the guest to answer."""
        agent = cls(address)
        await agent._channel.connect()
        return agent

    @classmethod
    async def wait_ready(cls, address: Address, deadline: float | None = None, *,
                         timeout: float | None = None, first_stream_id: int = 1) -> AgentClient:
        """Connect and ping until the guest answers. `deadline` is a time.monotonic() value
        (default: `timeout` seconds, or 30, from now). virtio-serial drops or delays bytes sent
        before the guest opens its port; late replies to abandoned pings are dropped by
        stream id. TimeoutError, naming the last error, when the deadline passes.
        A client replacing an earlier one of the same guest passes that one's `next_stream_id`:
        on virtio-serial the guest may not have seen the close, and refuses a reused id."""
        if deadline is None:
            deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
        agent = cls(address, first_stream_id=first_stream_id)
        try:
            await agent._channel.probe(agent._ping, deadline)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def _ping(self, timeout: float) -> None:
        # not counted: the boot probe's pings fail until the guest is up, by design
        await self._call(SVC_SYSTEM, "Ping", cpb.Empty(), cpb.Empty, timeout)

    @property
    def connected(self) -> bool:
        return self._channel.connected

    @property
    def closed(self) -> bool:
        return self._channel.closed

    async def wait_connection_lost(self) -> None:
        """Returns when the agent can no longer be reached on this client's connection (see
        transport.Channel.wait_lost); only meaningful once the agent was ready."""
        await self._channel.wait_lost()

    async def close(self) -> None:
        """Close the connection for good; streams and event iterators end."""
        if self._channel.closed:
            return
        self._channel.closed = True
        await self._channel.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stream_client(self) -> ttrpc.Client:
        """The connected client for a new stream (stdio, events); AgentUnavailable without one:
        a lost connection is a lost VM, nothing reconnects."""
        return self._channel.stream_client()

    # -- unary plumbing ------------------------------------------------------------------

    async def _unary(self, service: str, method: str, request: Any, response_type: type,
                     timeout: float | None) -> Any:
        t0 = time.monotonic()           # counted for the Monitor service (shim.counters)
        try:
            r = await self._call(service, method, request, response_type, timeout)
        except Exception:
            AGENT_CALLS.observe(method, time.monotonic() - t0, False)
            raise
        AGENT_CALLS.observe(method, time.monotonic() - t0, True)
        return r

    async def _call(self, service: str, method: str, request: Any, response_type: type,
                    timeout: float | None) -> Any:
        if self._channel.closed:
            raise AgentUnavailable("agent client is closed")
        client = self._channel.client
        if client is None or client.closed:
            raise AgentUnavailable(f"not connected to the guest agent at {describe(self.address)}")
        try:
            return await client.call(service, method, request, response_type, timeout=timeout)
        except ttrpc.ConnectionClosed as e:
            raise AgentUnavailable(f"{method}: connection to the guest agent lost ({e.message})") from None
        except ttrpc.DeadlineExceeded as e:
            # our own timeout, or the guest's answer DEADLINE_EXCEEDED: then the message is its
            raise ttrpc.DeadlineExceeded(sanitize(e.message)) from None
        except ttrpc.TTRPCError as e:
            raise ttrpc.error_from_status(int(e.code), f"guest: {sanitize(e.message)}") from None

    # -- containers ------------------------------------------------------------------------

    async def create(self, id: str, spec: dict[str, Any] | bytes, *, rootfs_path: str = "",
                     rootfs_mounts: Sequence[Mount] = (), readonly: bool = False,
                     terminal: bool = False, stdin: bool = False, stdout: bool = False,
                     stderr: bool = False, shares: Sequence[Mount] = (),
                     timeout: float | None = AGENT_CALL_TIMEOUT_S) -> int:
        """`shares`: virtiofs tags the guest mounts at SHARES_ROOT/<id>/<target> first."""
        check_request_id(id, "container id")
        rootfs = cpb.Rootfs(path=rootfs_path, readonly=readonly, mounts=[
            cpb.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
            for m in rootfs_mounts])
        req = cpb.CreateRequest(id=id, spec=as_json(spec), rootfs=rootfs, terminal=terminal,
                                stdin=stdin, stdout=stdout, stderr=stderr,
                                shares=[cpb.Mount(type=m.type, source=m.source, target=m.target,
                                                  options=list(m.options)) for m in shares])
        resp = await self._unary(SVC_CONTAINERS, "Create", req, cpb.CreateResponse, timeout)
        return check_pid(resp.pid, f"create {id}")

    async def start(self, id: str, exec_id: str = "", *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> int:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id", allow_empty=True)
        resp = await self._unary(SVC_CONTAINERS, "Start", cpb.StartRequest(id=id, exec_id=exec_id),
                                 cpb.StartResponse, timeout)
        pid = check_pid(resp.pid, f"start {id}/{exec_id}")
        AGENT_CALLS.started(exec_id)
        return pid

    async def exec(self, id: str, exec_id: str, process: dict[str, Any] | bytes, *, terminal: bool = False,
                   stdin: bool = False, stdout: bool = False, stderr: bool = False,
                   timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id")
        req = cpb.ExecRequest(id=id, exec_id=exec_id, process=as_json(process),
                              terminal=terminal, stdin=stdin, stdout=stdout, stderr=stderr)
        await self._unary(SVC_CONTAINERS, "Exec", req, cpb.Empty, timeout)

    async def kill(self, id: str, exec_id: str = "", signal: int = 15, all: bool = False, *,
                   timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id", allow_empty=True)
        if not 1 <= int(signal) <= 64:
            raise ValueError(f"invalid signal {signal}: must be 1..64")
        await self._unary(SVC_CONTAINERS, "Kill",
                          cpb.KillRequest(id=id, exec_id=exec_id, signal=int(signal), all=all),
                          cpb.Empty, timeout)

    async def wait(self, id: str, exec_id: str = "", *, timeout: float | None = None) -> ExitStatus:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id", allow_empty=True)
        resp = await self._unary(SVC_CONTAINERS, "Wait", cpb.WaitRequest(id=id, exec_id=exec_id),
                                 cpb.WaitResponse, timeout)
        what = f"wait {id}/{exec_id}"
        return ExitStatus(check_exit_status(resp.exit_status, what), check_time_ns(resp.exited_at_ns, what),
                          check_pid(resp.pid, what))

    async def delete(self, id: str, exec_id: str = "", *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> ExitStatus:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id", allow_empty=True)
        resp = await self._unary(SVC_CONTAINERS, "Delete", cpb.DeleteRequest(id=id, exec_id=exec_id),
                                 cpb.DeleteResponse, timeout)
        what = f"delete {id}/{exec_id}"
        # a never-started exec has no pid
        return ExitStatus(check_exit_status(resp.exit_status, what), check_time_ns(resp.exited_at_ns, what),
                          check_pid(resp.pid, what, allow_zero=True))

    async def state(self, id: str, exec_id: str = "", *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> ProcessState:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id", allow_empty=True)
        r = await self._unary(SVC_CONTAINERS, "State", cpb.StateRequest(id=id, exec_id=exec_id),
                              cpb.StateResponse, timeout)
        what = f"state {id}/{exec_id}"
        if r.id != id or r.exec_id != exec_id:
            raise protocol_error(f"{what}: reply is about {r.id[:80]!r}/{r.exec_id[:80]!r}")
        if r.status not in STATUS_NAMES:
            raise protocol_error(f"{what}: unknown status {r.status}")
        return ProcessState(id, exec_id, check_pid(r.pid, what, allow_zero=True), int(r.status), r.terminal,
                            check_exit_status(r.exit_status, what), check_time_ns(r.exited_at_ns, what),
                            r.stdin, r.stdout, r.stderr)

    async def pids(self, id: str, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> list[ProcessInfo]:
        check_request_id(id, "container id")
        r = await self._unary(SVC_CONTAINERS, "Pids", cpb.PidsRequest(id=id), cpb.PidsResponse, timeout)
        if len(r.processes) > MAX_PIDS:
            raise protocol_error(f"pids {id}: {len(r.processes)} processes (limit {MAX_PIDS})")
        return [ProcessInfo(check_pid(p.pid, f"pids {id}"),
                            check_guest_id(p.exec_id, f"pids {id}", allow_empty=True)) for p in r.processes]

    async def pause(self, id: str, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        check_request_id(id, "container id")
        await self._unary(SVC_CONTAINERS, "Pause", cpb.ContainerRequest(id=id), cpb.Empty, timeout)

    async def resume(self, id: str, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        check_request_id(id, "container id")
        await self._unary(SVC_CONTAINERS, "Resume", cpb.ContainerRequest(id=id), cpb.Empty, timeout)

    async def update(self, id: str, resources: dict[str, Any] | bytes, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        check_request_id(id, "container id")
        await self._unary(SVC_CONTAINERS, "Update",
                          cpb.UpdateRequest(id=id, resources=as_json(resources)), cpb.Empty, timeout)

    async def stats(self, id: str, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> Stats:
        check_request_id(id, "container id")
        r = await self._unary(SVC_CONTAINERS, "Stats", cpb.StatsRequest(id=id), cpb.StatsResponse, timeout)
        if len(r.raw) > MAX_RAW_STATS:
            raise protocol_error(f"stats {id}: raw stats of {len(r.raw)} bytes (limit {MAX_RAW_STATS})")
        return Stats(r.cpu_usage_ns, r.cpu_user_ns, r.cpu_system_ns, r.memory_usage_bytes, r.memory_limit_bytes,
                     r.pids_current, r.pids_limit, r.oom_kills, bytes(r.raw))

    async def close_stdin(self, id: str, exec_id: str = "", *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id", allow_empty=True)
        await self._unary(SVC_CONTAINERS, "CloseStdin", cpb.CloseStdinRequest(id=id, exec_id=exec_id),
                          cpb.Empty, timeout)

    async def resize_pty(self, id: str, exec_id: str, width: int, height: int, *,
                         timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id", allow_empty=True)
        await self._unary(SVC_CONTAINERS, "ResizePty",
                          cpb.ResizePtyRequest(id=id, exec_id=exec_id, width=width, height=height),
                          cpb.Empty, timeout)

    # -- system ------------------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = PING_TIMEOUT_S) -> None:
        await self._unary(SVC_SYSTEM, "Ping", cpb.Empty(), cpb.Empty, timeout)

    async def version(self, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> GuestVersion:
        r = await self._unary(SVC_SYSTEM, "Version", cpb.Empty(), sypb.VersionResponse, timeout)
        return GuestVersion(check_string(r.agent_version, "version", 256), check_string(r.api, "version api", 256),
                            check_string(r.runtime, "version runtime"))

    async def info(self, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> GuestInfo:
        r = await self._unary(SVC_SYSTEM, "Info", cpb.Empty(), sypb.InfoResponse, timeout)
        if r.cpus_online > MAX_CPUS or r.cpus_present > MAX_CPUS:
            raise protocol_error(f"info: {r.cpus_online} cpus online / {r.cpus_present} present")
        if r.memory_available_bytes > r.memory_total_bytes:
            raise protocol_error(f"info: memory available {r.memory_available_bytes} > total {r.memory_total_bytes}")
        if not (r.uptime_s >= 0 and r.uptime_s < 1e10):    # also rejects NaN
            raise protocol_error(f"info: uptime {r.uptime_s}")
        if max(r.cpu_busy_ms, r.cpu_idle_ms) > MAX_CPU_MS:
            raise protocol_error(f"info: cpu time busy {r.cpu_busy_ms} ms / idle {r.cpu_idle_ms} ms")
        return GuestInfo(check_string(r.kernel, "info kernel", 256), r.cpus_online, r.cpus_present,
                         r.memory_total_bytes, r.memory_available_bytes, r.uptime_s, r.pid1,
                         r.cpu_busy_ms, r.cpu_idle_ms)

    async def set_time(self, unix_ns: int | None = None, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        await self._unary(SVC_SYSTEM, "SetTime", sypb.SetTimeRequest(unix_ns=unix_ns or time.time_ns()),
                          cpb.Empty, timeout)

    async def add_entropy(self, data: bytes, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        """Give the guest kernel's RNG `data` (1..512 bytes: the guest's bound, vminitd/system.py)
        and have it reseed. A vminitd that is not the VM's init accepts and ignores it.
        ValueError, before anything is sent, for an empty or too long `data`."""
        max_bytes = 512
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"add_entropy: data must be bytes, not {type(data).__name__}")
        data = bytes(data)
        if not 1 <= len(data) <= max_bytes:
            raise ValueError(f"add_entropy: {len(data)} bytes (1..{max_bytes})")
        await self._unary(SVC_SYSTEM, "AddEntropy", sypb.AddEntropyRequest(data=data), cpb.Empty, timeout)

    async def set_hostname(self, hostname: str, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        await self._unary(SVC_SYSTEM, "SetHostname", sypb.SetHostnameRequest(hostname=hostname), cpb.Empty, timeout)

    async def sync(self, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> None:
        await self._unary(SVC_SYSTEM, "Sync", cpb.Empty(), cpb.Empty, timeout)

    async def shutdown(self, reboot: bool = False, *, timeout: float | None = SHUTDOWN_TIMEOUT_S) -> None:
        """Ask the guest to kill its containers, sync and power off. Returns when the guest
        acknowledged; the VM exits shortly after (wait for QEMU's exit)."""
        await self._unary(SVC_SYSTEM, "Shutdown", sypb.ShutdownRequest(reboot=reboot), cpb.Empty, timeout)

    async def online_cpus(self, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> CpuOnline:
        r = await self._unary(SVC_SYSTEM, "OnlineCpus", cpb.Empty(), sypb.OnlineCpusResponse, timeout)
        if max(r.onlined, r.online, r.present) > MAX_CPUS or r.online > r.present:
            raise protocol_error(f"online_cpus: onlined {r.onlined} online {r.online} present {r.present}")
        return CpuOnline(r.onlined, r.online, r.present)

    async def set_online_cpus(self, online: int, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> CpuOnline:
        """Exactly `online` CPUs online in the guest (the lowest-numbered)."""
        if not 1 <= online <= MAX_CPUS:
            raise ValueError(f"set_online_cpus: {online} CPUs (1..{MAX_CPUS})")
        r = await self._unary(SVC_SYSTEM, "SetOnlineCpus", sypb.SetOnlineCpusRequest(online=online),
                              sypb.OnlineCpusResponse, timeout)
        if max(r.onlined, r.online, r.present) > MAX_CPUS or r.online > r.present:
            raise protocol_error(f"set_online_cpus: changed {r.onlined} online {r.online} present {r.present}")
        return CpuOnline(r.onlined, r.online, r.present)

    async def online_memory(self, *, timeout: float | None = AGENT_CALL_TIMEOUT_S) -> MemoryOnline:
        r = await self._unary(SVC_SYSTEM, "OnlineMemory", cpb.Empty(), sypb.OnlineMemoryResponse, timeout)
        if r.blocks_onlined > r.blocks_online:
            raise protocol_error(f"online_memory: onlined {r.blocks_onlined} > online {r.blocks_online}")
        return MemoryOnline(r.blocks_onlined, r.blocks_online, r.memory_total_bytes)

    # -- network -----------------------------------------------------------------------------

    async def configure_network(self, request: npb.ConfigureRequest, *,
                                timeout: float | None = AGENT_CALL_TIMEOUT_S) -> dict[str, str]:
        """Network.Configure; returns mac -> the guest's link name, for the requested MACs only
        (anything else in the answer is a protocol violation)."""
        r = await self._unary(SVC_NETWORK, "Configure", request, npb.ConfigureResponse, timeout)
        wanted = {i.mac.lower() for i in request.interfaces}
        out: dict[str, str] = {}
        for it in r.interfaces:
            mac = it.mac.lower()
            if mac not in wanted or mac in out:
                raise protocol_error(f"configure_network: unexpected interface {check_string(it.mac, 'mac', 64)!r}")
            out[mac] = check_link_name(it.name, "configure_network")
        return out

    # -- streams -----------------------------------------------------------------------------

    def open_output(self, id: str, exec_id: str, fd: int, *, offset: int = 0,
                    window: int = DEFAULT_OUTPUT_WINDOW) -> OutputStream:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id", allow_empty=True)
        return OutputStream(self, id, exec_id, fd, offset, window)   # the session checks fd and window

    def open_input(self, id: str, exec_id: str = "") -> InputStream:
        check_request_id(id, "container id")
        check_request_id(exec_id, "exec id", allow_empty=True)
        return InputStream(self, id, exec_id)

    async def events(self, after_seq: int = 0) -> AsyncIterator[AgentEvent]:
        """Every event with seq > after_seq, in order. One subscription: if the connection is
        lost (the VM is lost with it), the iterator ends when the client is closed."""
        last = after_seq
        try:
            client = self.stream_client()
        except AgentUnavailable:
            return
        try:
            stream = await client.open_stream(SVC_EVENTS, "Subscribe", epb.Event,
                                              request=epb.SubscribeRequest(after_seq=last),
                                              server_streaming=True)
            try:
                async for msg in stream:
                    if msg.seq <= last:
                        # a replay (or a lie): never acted on twice, and never a reason to
                        # drop the stream (a resubscribe would be served the same again)
                        _EVENT_LOG.warning("replay", "agent event seq %d not after %d: ignored", msg.seq, last)
                        continue
                    try:
                        ev = _event_from(msg)
                    except AgentProtocolError as e:
                        # One malformed event must not wedge the stream: failing it would
                        # resubscribe after `last` and be served the same event forever, so
                        # every later exit would be stuck behind it. It is refused and counts
                        # as lost (gap): the follower then asks the guest for the state of its
                        # live processes, which is how a real exit hidden in it still surfaces.
                        _EVENT_LOG.warning("refused", "agent event %d refused: %s", msg.seq, e)
                        ev = AgentEvent(msg.seq, 0, True, "refused", "")
                    last = ev.seq if ev is not None else msg.seq
                    if ev is not None:
                        yield ev
            finally:
                await stream.aclose()
        except ttrpc.ConnectionClosed:
            pass
        except AgentProtocolError:
            raise
        except ttrpc.TTRPCError as e:   # DEADLINE_EXCEEDED too: this stream has no timeout of ours
            raise ttrpc.error_from_status(int(e.code), f"guest: events: {sanitize(e.message)}") from None
        await self._channel.wait_closed()


# lines caused by the guest's events: throttled per kind (shim.ratelimit)
_EVENT_LOG = LogThrottle(log)


def _event_from(msg: epb.Event) -> AgentEvent | None:
    """The event in `msg` (its seq already checked by the caller), or None for a kind we do not
    know; AgentProtocolError if a field breaks the contract."""
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

