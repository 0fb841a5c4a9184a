"""Helpers around containerd's wire types that every part of spinbox needs.

* `pack_any` / `unpack_any`: google.protobuf.Any the way containerd writes it. containerd (Go
  typeurl) uses the *bare* message full name as type_url ("containerd.events.TaskExit");
  containerd 1.6 cannot resolve "type.googleapis.com/..." so Python's `Any.Pack` must not be used
  for anything that goes to containerd.
* `envelope`: a containerd.types.Envelope for Events.Forward (timestamp set, event packed).
* `TOPICS` / `topic_for`: the event topic <-> event message table of the runtime v2 protocol.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TypeVar

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from spinbox.api._pb.containerd.events import task_pb2 as events
from spinbox.api._pb.containerd.types import event_pb2

M = TypeVar("M", bound=Message)

# TTRPC service names containerd calls on a shim (v3 = containerd 2.x) and the one a shim calls.
TASK_SERVICE_V2 = "containerd.task.v2.Task"
TASK_SERVICE_V3 = "containerd.task.v3.Task"
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"

# Type URLs of the JSON-encoded OCI types containerd puts into Anys (Exec spec, Update resources).
OCI_PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
OCI_LINUX_RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"

# containerd's task event topics and the message each carries (containerd core/runtime/events.go).
TOPICS: dict[str, type[Message]] = {
    "/tasks/create": events.TaskCreate,
    "/tasks/start": events.TaskStart,
    "/tasks/delete": events.TaskDelete,
    "/tasks/exit": events.TaskExit,
    "/tasks/oom": events.TaskOOM,
    "/tasks/exec-added": events.TaskExecAdded,
    "/tasks/exec-started": events.TaskExecStarted,
    "/tasks/paused": events.TaskPaused,
    "/tasks/resumed": events.TaskResumed,
    "/tasks/checkpointed": events.TaskCheckpointed,
}
_TOPIC_OF: dict[str, str] = {cls.DESCRIPTOR.full_name: t for t, cls in TOPICS.items()}


def type_url(msg_or_cls: Message | type[Message]) -> str:
    """The bare type URL containerd uses for a protobuf message: its full proto name."""
    return msg_or_cls.DESCRIPTOR.full_name


def pack_any(msg: Message) -> any_pb2.Any:
    """Wrap `msg` in an Any with a bare type_url (containerd 1.6 rejects URL prefixes)."""
    return any_pb2.Any(type_url=type_url(msg), value=msg.SerializeToString())


def _name_of(url: str) -> str:
    # Accept what other writers produce too: "type.googleapis.com/x.Y" and "/x.Y" name x.Y.
    return url.rsplit("/", 1)[-1]


def unpack_any(value: any_pb2.Any, expected_types: Iterable[type[Message]] | type[Message]) -> Message:
    """Decode an Any into whichever of `expected_types` its type_url names.

    Raises ValueError naming the type_url and what was expected when it names none of them or
    the bytes do not parse (the peer may be untrusted: no silent fallbacks).
    """
    if isinstance(expected_types, type):
        expected_types = (expected_types,)
    by_name = {cls.DESCRIPTOR.full_name: cls for cls in expected_types}
    cls = by_name.get(_name_of(value.type_url))
    if cls is None:
        raise ValueError(f"unexpected Any type_url {value.type_url!r}; expected one of "
                         f"{sorted(by_name)}")
    msg = cls()
    try:
        msg.ParseFromString(value.value)
    except DecodeError as e:
        raise ValueError(f"Any of type {value.type_url!r} does not decode: {e}") from e
    return msg


def topic_for(event: Message | type[Message]) -> str:
    """The containerd topic of a task event message ("/tasks/exit" for TaskExit)."""
    name = event.DESCRIPTOR.full_name
    try:
        return _TOPIC_OF[name]
    except KeyError:
        raise ValueError(f"{name} is not a containerd task event") from None


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def envelope(namespace: str, topic: str, event: Message,
             timestamp: timestamp_pb2.Timestamp | None = None) -> event_pb2.Envelope:
    """An Envelope for Events.Forward: `event` packed with a bare type_url, timestamp = now.

    A task event under the wrong topic is refused here: containerd would accept it, but its
    subscribers (CRI, ctr) decode by topic and would drop or misread it.
    """
    expected = TOPICS.get(topic)
    if expected is not None and event.DESCRIPTOR.full_name != expected.DESCRIPTOR.full_name:
        raise ValueError(f"topic {topic} carries {expected.DESCRIPTOR.full_name}, "
                         f"not {event.DESCRIPTOR.full_name}")
    return event_pb2.Envelope(
        timestamp=timestamp if timestamp is not None else now_timestamp(),
        namespace=namespace,
        topic=topic,
        event=pack_any(event),
    )


def unpack_event(env: event_pb2.Envelope) -> Message:
    """The task event inside an Envelope, checked against the envelope's topic."""
    cls = TOPICS.get(env.topic)
    if cls is None:
        raise ValueError(f"unknown task event topic {env.topic!r}")
    return unpack_any(env.event, cls)
