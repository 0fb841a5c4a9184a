"""Target `replies`: every unary reply the shim decodes, as the real `AgentClient`
(shim/agent/client.py, shim/agent/validate.py) gets it from a hostile guest over a real
connection: hostile reply messages of each call's type (fuzz/messages.py: pids around
PID_MAX, statuses 255/256, ids with `..` or newlines, huge counts), damaged wire bytes, error
statuses with hostile codes and messages, stale replies on other stream ids, a hang-up.

Invariants: each call either returns a value that satisfies the contract (api/contract.py:
pids 1..PID_MAX-1, 0 only where "no process" is allowed, exit statuses 0..255, times >= 0,
ids valid, strings bounded and without control characters, counts within the client's
limits, answers about what was asked), or raises from our error tree (AgentError) or a
`ttrpc.TTRPCError` carrying the guest's code, whose message is sanitised and bounded.
Anything else escaping is a crash.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ttrpc
from ttrpc.frame import MessageType

from spinbox.api import contract
from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb
from spinbox.api._pb.spinbox.agent.v1 import network_pb2 as npb
from spinbox.api._pb.spinbox.agent.v1 import system_pb2 as sypb
from spinbox.shim.agent import AgentClient, AgentError
from spinbox.shim.agent import client as agent_client
from spinbox.shim.agent import records as r
from spinbox.shim.agent import validate

from . import messages
from .data import Input
from .driver import AsyncHarness, Finding, Target
from .guest import GuestLink, next_request, response

IDS = ("c1", "e1", "", "c2", "..", "c1\n")
MACS = ("aa:bb:cc:dd:ee:01", "AA:BB:CC:DD:EE:01", "aa:bb:cc:dd:ee:02")
POOL = IDS + MACS + ("eth0", "eth1", "lo", "x" * 16)
CALL_TIMEOUT_S = 1.0
MAX_MESSAGE = validate.MAX_ERROR_MESSAGE + 200     # "guest: ..." around a sanitised message


def _pid(pid: Any, what: str, *, allow_zero: bool = False) -> None:
    if not contract.is_valid_pid(pid, allow_zero=allow_zero):
        raise Finding(f"{what}: accepted pid {pid}")


def _status(s: int, what: str) -> None:
    if not 0 <= s <= 255:
        raise Finding(f"{what}: accepted exit status {s}")


def _time(t: int, what: str) -> None:
    if t < 0:
        raise Finding(f"{what}: accepted time {t}")


def _text(s: str, what: str, limit: int = validate.MAX_STRING) -> None:
    if len(s) > limit or any(c in s for c in "\0\r\n"):
        raise Finding(f"{what}: accepted string {s[:40]!r} ({len(s)} characters)")


def _exit(x: r.ExitStatus, what: str, allow_zero: bool = False) -> None:
    _status(x.exit_status, what)
    _time(x.exited_at_ns, what)
    _pid(x.pid, what, allow_zero=allow_zero)


def _state(x: r.ProcessState) -> None:
    if (x.id, x.exec_id) != ("c1", "e1"):
        raise Finding(f"state: accepted a reply about {x.id!r}/{x.exec_id!r}")
    if x.status not in r.STATUS_NAMES:
        raise Finding(f"state: accepted status {x.status}")
    _pid(x.pid, "state", allow_zero=True)
    _status(x.exit_status, "state")
    _time(x.exited_at_ns, "state")


def _pids(x: list[r.ProcessInfo]) -> None:
    if len(x) > agent_client.MAX_PIDS:
        raise Finding(f"pids: accepted {len(x)} processes")
    for p in x:
        _pid(p.pid, "pids")
        if p.exec_id and not contract.is_valid_id(p.exec_id):
            raise Finding(f"pids: accepted exec id {p.exec_id!r}")


def _stats(x: r.Stats) -> None:
    if len(x.raw) > agent_client.MAX_RAW_STATS:
        raise Finding(f"stats: accepted {len(x.raw)} raw bytes")


def _version(x: r.GuestVersion) -> None:
    _text(x.agent_version, "version", 256)
    _text(x.api, "version api", 256)
    _text(x.runtime, "version runtime")


def _info(x: r.GuestInfo) -> None:
    if max(x.cpus_online, x.cpus_present) > agent_client.MAX_CPUS:
        raise Finding(f"info: accepted {x.cpus_online}/{x.cpus_present} cpus")
    if x.memory_available_bytes > x.memory_total_bytes:
        raise Finding("info: accepted more memory available than total")
    if not (math.isfinite(x.uptime_s) and 0 <= x.uptime_s < 1e10):
        raise Finding(f"info: accepted uptime {x.uptime_s}")
    _text(x.kernel, "info kernel", 256)


def _cpus(x: r.CpuOnline) -> None:
    if max(x.onlined, x.online, x.present) > agent_client.MAX_CPUS or x.online > x.present:
        raise Finding(f"online_cpus: accepted {x}")


def _memory(x: r.MemoryOnline) -> None:
    if x.blocks_onlined > x.blocks_online:
        raise Finding(f"online_memory: accepted {x}")


NETWORK_REQUEST = npb.ConfigureRequest(interfaces=[npb.Interface(mac=MACS[0]), npb.Interface(mac=MACS[2])])


def _network(x: dict[str, str]) -> None:
    wanted = {i.mac.lower() for i in NETWORK_REQUEST.interfaces}
    for mac, name in x.items():
        if mac not in wanted:
            raise Finding(f"configure_network: accepted interface {mac!r}")
        if not validate._IFNAME_RE.fullmatch(name):
            raise Finding(f"configure_network: accepted link name {name!r}")


def _none(x: Any) -> None:
    if x is not None:
        raise Finding(f"returned {x!r} for a call without a result")


@dataclass(frozen=True)
class Call:
    method: str
    response_type: type
    invoke: Callable[[AgentClient], Awaitable[Any]]
    check: Callable[[Any], None]


T = CALL_TIMEOUT_S
CALLS = (
    Call("Create", cpb.CreateResponse, lambda a: a.create("c1", b"{}", rootfs_path="/r", timeout=T),
         lambda x: _pid(x, "create")),
    Call("Start", cpb.StartResponse, lambda a: a.start("c1", "e1", timeout=T), lambda x: _pid(x, "start")),
    Call("Wait", cpb.WaitResponse, lambda a: a.wait("c1", timeout=T), lambda x: _exit(x, "wait")),
    Call("Delete", cpb.DeleteResponse, lambda a: a.delete("c1", "e1", timeout=T),
         lambda x: _exit(x, "delete", allow_zero=True)),
    Call("State", cpb.StateResponse, lambda a: a.state("c1", "e1", timeout=T), _state),
    Call("Pids", cpb.PidsResponse, lambda a: a.pids("c1", timeout=T), _pids),
    Call("Stats", cpb.StatsResponse, lambda a: a.stats("c1", timeout=T), _stats),
    Call("Kill", cpb.Empty, lambda a: a.kill("c1", "e1", 9, timeout=T), _none),
    Call("Version", sypb.VersionResponse, lambda a: a.version(timeout=T), _version),
    Call("Info", sypb.InfoResponse, lambda a: a.info(timeout=T), _info),
    Call("OnlineCpus", sypb.OnlineCpusResponse, lambda a: a.online_cpus(timeout=T), _cpus),
    Call("OnlineMemory", sypb.OnlineMemoryResponse, lambda a: a.online_memory(timeout=T), _memory),
    Call("Configure", npb.ConfigureResponse, lambda a: a.configure_network(NETWORK_REQUEST, timeout=T), _network),
)
CODES = (0, 0, 0, 2, 5, 13, 14, 4, 16, 17, -1, 1 << 30)
MESSAGES = ("", "no such container", "a\nb\x1b[2J", "x" * 5000, "\u202e", "é" * 3000)


def check_error(e: BaseException, what: str) -> None:
    """What a refused reply may raise, and how its message must look."""
    if isinstance(e, AgentError):
        if len(str(e)) > MAX_MESSAGE:
            raise Finding(f"{what}: error message of {len(str(e))} characters")
        return
    if isinstance(e, ttrpc.TTRPCError):
        msg = e.message
        if len(msg) > MAX_MESSAGE or not msg.isprintable():
            raise Finding(f"{what}: guest error message passed on unsanitised: {msg[:60]!r}")
        return
    raise e


class RepliesHarness(AsyncHarness):
    def __init__(self) -> None:
        super().__init__(time_bound_s=3.0)
        self.link: GuestLink | None = None

    async def run(self, inp: Input) -> None:
        if self.link is None:
            self.link = GuestLink()
        agent, guest = await self.link.connect()
        try:
            for _ in range(inp.below(4) + 1):
                call = inp.pick(CALLS)
                task = asyncio.ensure_future(call.invoke(agent))
                got = await next_request(guest)
                answered_code = None
                if got is not None:
                    frame, req = got
                    if req.method != call.method:
                        raise Finding(f"{call.method} sent as {req.method}")
                    answered_code, hang_up = self._answer(inp, guest, frame.stream_id, call)
                    if hang_up:
                        guest.close()
                    await guest.drain()
                try:
                    result = await task
                except BaseException as e:
                    check_error(e, call.method)
                    if isinstance(e, ttrpc.DeadlineExceeded) and answered_code not in (None, 4):
                        raise Finding(f"{call.method}: timed out though the guest answered") from e
                    continue
                call.check(result)
                if guest.eof:
                    break
        finally:
            await agent.close()
            guest.close()

    def _answer(self, inp: Input, guest: Any, sid: int, call: Call) -> tuple[int | None, bool]:
        """Send the reply (and sometimes stale ones first): (its status code or None when
        there was none, whether to hang up after it)."""
        if inp.chance(8):
            return None, True                             # no reply at all: the guest hangs up
        if inp.chance(8):                                 # a stale reply for another stream first
            guest.send(sid + inp.pick((2, -2, 1)) & 0xFFFFFFFF, MessageType.RESPONSE, 0,
                       response(0, "", messages.hostile(call.response_type, inp, pool=POOL)))
        picked: int = inp.pick(CODES)
        code: int | None = picked
        payload = messages.hostile(call.response_type, inp, pool=POOL)
        data = response(picked, inp.pick(MESSAGES) if picked else "", payload)
        if inp.chance(10):
            data = messages.mutate(data, inp)             # the Response wrapper itself damaged
            code = None
        guest.send(sid, MessageType.RESPONSE, inp.pick((0, 0, 1, 4, 255)), data)
        return code, inp.chance(16)

    def close(self) -> None:
        if self.link is not None:
            self.loop.run_until_complete(self.link.close())
        super().close()


def seeds() -> list[bytes]:
    return [b"", bytes(range(48)), b"\x00\x02" + b"\x01" * 40, b"\x05\x03\x00\x03" + b"\xff" * 30,
            bytes(range(255, 0, -3))]


TARGET = Target("replies", "AgentClient's unary calls fed hostile replies by a scripted guest",
                RepliesHarness, seeds, weight=1.0, time_bound_s=3.0, memory_bound_mb=48)
