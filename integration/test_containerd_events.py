"""Forwarding task events to a real containerd over its TTRPC socket, as the shim will.

Checks both ends: containerd's Events.Forward accepts our Envelope (bare type_url, timestamp,
namespace, "/topic") and a real subscriber (`ctr events`) decodes and prints exactly that event;
malformed envelopes come back as INVALID_ARGUMENT over TTRPC.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from google.protobuf import empty_pb2, timestamp_pb2

import ttrpc
from spinbox.api import types
from spinbox.api._pb.containerd.events import task_pb2 as events
from spinbox.api._pb.containerd.services.ttrpc.events.v1 import events_pb2
from spinbox.api._pb.containerd.types import event_pb2

pytestmark = pytest.mark.integration

INVALID_ARGUMENT = 3
# A fixed instant with nanoseconds, so the subscriber's RFC 3339 text can be compared exactly.
EXITED_AT = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789)


async def forward(client: ttrpc.Client, env: event_pb2.Envelope) -> None:
    await client.call(types.EVENTS_SERVICE, "Forward", events_pb2.ForwardRequest(envelope=env),
                      empty_pb2.Empty, timeout=10)


class EventSubscriber:
    """`ctr events` as a subprocess; lines are `<date> <time> <zone> <zone> <ns> <topic> <json>`."""

    def __init__(self, containerd) -> None:
        self.c = containerd
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self.seen: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> EventSubscriber:
        self.proc = await asyncio.create_subprocess_exec(
            *self.c.ctr_argv("events"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.seen.append(line)
            await self.lines.put(line)

    async def wait_for(self, match: Callable[[str], bool], timeout: float = 20) -> str:
        async def scan() -> str:
            while True:
                line = await self.lines.get()
                if match(line):
                    return line
        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(f"ctr events never printed the expected event; saw {self.seen}") from None

    async def subscribed(self, client: ttrpc.Client) -> None:
        """Return once the subscription is live: ctr prints nothing when it is, so forward probe
        events until one comes back (no sleep-and-hope)."""
        for n in range(200):
            probe = events.TaskOOM(container_id=f"subscription-probe-{n}")
            await forward(client, types.envelope(self.c.namespace, "/tasks/oom", probe))
            try:
                await asyncio.wait_for(self.wait_for(lambda l, n=n: f"subscription-probe-{n}\"" in l), 0.25)
                return
            except (AssertionError, TimeoutError):
                continue
        raise AssertionError("ctr events subscription never delivered a probe event")

    async def stderr(self) -> str:
        return (await self.proc.stderr.read()).decode(errors="replace") if self.proc else ""

    async def __aexit__(self, *exc) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()
        self._reader.cancel()


def parse_event_line(line: str) -> tuple[str, str, dict]:
    _date, _time, _off, _zone, namespace, topic, body = line.split(None, 6)
    return namespace, topic, json.loads(body)


@pytest.fixture
async def events_client(containerd_running):
    client = await ttrpc.Client.connect(containerd_running.ttrpc_address)
    try:
        yield client
    finally:
        await client.close()


async def test_forwarded_exit_event_reaches_subscriber(containerd_running, events_client):
    c = containerd_running
    async with EventSubscriber(c) as sub:
        await sub.subscribed(events_client)
        exit_ev = events.TaskExit(container_id="spinbox-exit-1", id="exec-9", pid=4242,
                                  exit_status=137, exited_at=EXITED_AT)
        env = types.envelope(c.namespace, "/tasks/exit", exit_ev)
        assert env.event.type_url == "containerd.events.TaskExit"
        await forward(events_client, env)

        line = await sub.wait_for(lambda l: '"spinbox-exit-1"' in l)
    namespace, topic, body = parse_event_line(line)
    assert (namespace, topic) == (c.namespace, "/tasks/exit")
    assert body == {"container_id": "spinbox-exit-1", "id": "exec-9", "pid": 4242, "exit_status": 137,
                    "exited_at": "2023-11-14T22:13:20.123456789Z"}


async def test_every_task_topic_is_accepted_and_decoded(containerd_running, events_client):
    """All ten task events, in one namespace, arrive in order and decode by their topic."""
    c = containerd_running
    cid = "spinbox-all-topics"
    samples = {cls.DESCRIPTOR.name: cls for cls in types.TOPICS.values()}
    async with EventSubscriber(c) as sub:
        await sub.subscribed(events_client)
        for topic, cls in types.TOPICS.items():
            await forward(events_client, types.envelope(c.namespace, topic, cls(container_id=cid)))
        got = []
        for _ in types.TOPICS:
            got.append(parse_event_line(await sub.wait_for(lambda l: f'"{cid}"' in l)))
    assert [t for _, t, _ in got] == list(types.TOPICS)
    assert all(ns == c.namespace and body["container_id"] == cid for ns, _, body in got)
    assert len(samples) == len(types.TOPICS)


def _bad_topic(env):
    env.topic = "tasks/exit"


def _no_timestamp(env):
    env.ClearField("timestamp")


def _bad_namespace(env):
    env.namespace = "not a namespace!"


@pytest.mark.parametrize("break_it,message", [
    (_bad_topic, "must start with '/'"),
    (_no_timestamp, "timestamp must be set"),
    (_bad_namespace, "invalid namespace"),
], ids=["topic-without-slash", "missing-timestamp", "invalid-namespace"])
async def test_malformed_envelope_is_invalid_argument(containerd_running, events_client, break_it, message):
    env = types.envelope(containerd_running.namespace, "/tasks/exit",
                         events.TaskExit(container_id="bad", id="bad", exited_at=EXITED_AT))
    break_it(env)
    with pytest.raises(ttrpc.TTRPCError) as err:
        await forward(events_client, env)
    assert err.value.code == INVALID_ARGUMENT
    assert message in err.value.message
    # The connection survives a refused call.
    await forward(events_client, types.envelope(containerd_running.namespace, "/tasks/oom",
                                                events.TaskOOM(container_id="after-error")))


async def test_prefixed_type_url_is_not_decodable_by_subscribers(containerd_running, events_client):
    """Why pack_any writes bare type URLs: containerd 1.6 forwards a type.googleapis.com/ Any
    without complaint, but its subscribers cannot resolve it and drop the event."""
    c = containerd_running
    async with EventSubscriber(c) as sub:
        await sub.subscribed(events_client)
        env = types.envelope(c.namespace, "/tasks/oom", events.TaskOOM(container_id="prefixed-url"))
        env.event.type_url = "type.googleapis.com/" + env.event.type_url
        await forward(events_client, env)
        # An event forwarded after it with a bare URL arrives; the prefixed one never printed.
        await forward(events_client, types.envelope(c.namespace, "/tasks/oom",
                                                    events.TaskOOM(container_id="bare-url")))
        await sub.wait_for(lambda l: '"bare-url"' in l)
        sub.proc.terminate()
        err = await sub.stderr()
    assert not any("prefixed-url" in l for l in sub.seen)
    assert "type.googleapis.com/containerd.events.TaskOOM" in err


async def test_restart_gives_a_fresh_ttrpc_socket(containerd_running):
    """The fixture's restart() (used later for shim reconnect tests): the old connection dies,
    a new one to the same .ttrpc_address works, and the subscriber sees events again."""
    c = containerd_running
    old = await ttrpc.Client.connect(c.ttrpc_address)
    try:
        c.restart()
        with pytest.raises(ttrpc.TTRPCError) as err:
            await forward(old, types.envelope(c.namespace, "/tasks/oom", events.TaskOOM(container_id="x")))
        assert err.value.code == ttrpc.Code.UNAVAILABLE
    finally:
        await old.close()
    new = await ttrpc.Client.connect(c.ttrpc_address)
    try:
        async with EventSubscriber(c) as sub:
            await sub.subscribed(new)
            await forward(new, types.envelope(c.namespace, "/tasks/paused",
                                              events.TaskPaused(container_id="after-restart")))
            _, topic, body = parse_event_line(await sub.wait_for(lambda l: '"after-restart"' in l))
        assert (topic, body) == ("/tasks/paused", {"container_id": "after-restart"})
    finally:
        await new.close()
