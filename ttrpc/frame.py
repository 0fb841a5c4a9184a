"""Sans-IO TTRPC frame codec (containerd/ttrpc `channel.go`).

A frame is a 10-byte big-endian header (data length, stream id, message type, flags) followed by
the data. Nothing here does I/O: `FrameDecoder.feed()` takes whatever bytes arrived and returns
the events they complete, so the codec is tested without sockets and shared by client and server.
"""
from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import NamedTuple, Union

from .status import ResourceExhausted

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_DATA = 4 << 20  # messageLengthMax in channel.go

# What a frame's data may be given as: one buffer, or pieces the channel writes in order.
Payload = Union[bytes, Sequence[Union[bytes, memoryview]]]


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    NONE = 0
    REMOTE_CLOSED = 1  # sender sends no more data on this stream
    REMOTE_OPEN = 2  # on a Request: the client will send Data frames (non-unary)
    NO_DATA = 4  # on a Data frame: it carries no payload


# Frame and Oversized are NamedTuples, not dataclasses: building a dataclass at import compiles
# its methods, which costs guest boot time under TCG (see __init__.py); immutable either way.
class Frame(NamedTuple):
    """One complete frame. `type` stays an int: unknown types must be ignorable, not fatal."""
    stream_id: int
    type: int
    flags: int
    data: bytes


class Oversized(NamedTuple):
    """A frame whose declared length exceeds the limit. Its data is discarded as it arrives;
    the stream id is known, so the receiver can answer RESOURCE_EXHAUSTED on that stream."""
    stream_id: int
    type: int
    flags: int
    length: int

    def message(self, limit: int = MAX_DATA) -> str:
        return f"message length {self.length} exceed maximum message size of {limit}"


class OversizedMessage(ResourceExhausted):
    """Refused to send: the data would exceed the maximum frame size."""


def encode_header(stream_id: int, type: int, flags: int, length: int) -> bytes:
    return HEADER.pack(length, stream_id, type, flags)


def encode_frame(stream_id: int, type: int, flags: int = 0, data: bytes = b"", *,
                 max_data: int = MAX_DATA) -> bytes:
    if len(data) > max_data:
        raise OversizedMessage(
            f"message length {len(data)} exceed maximum message size of {max_data}")
    return HEADER.pack(len(data), stream_id, type, flags) + data


class FrameDecoder:
    """Incremental decoder. Feed arbitrary chunks; get back complete `Frame`s and `Oversized`
    events in order. Retained memory is at most one header plus one frame's data (<= max_data):
    an oversized frame's bytes are skipped as they arrive, never buffered."""

    def __init__(self, max_data: int = MAX_DATA) -> None:
        self.max_data = max_data
        self._buf = bytearray()  # partial header or partial data of the current frame
        self._header: tuple[int, int, int, int] | None = None  # (length, sid, type, flags)
        self._discard = 0  # bytes of an oversized frame still to skip

    @property
    def buffered(self) -> int:
        """Bytes held right now (for memory-bound checks)."""
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for the stream to end)."""
        return not self._buf and self._header is None and self._discard == 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | Oversized]:
        events: list[Frame | Oversized] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        buf = self._buf
        while pos < end:
            if self._discard:
                n = min(self._discard, end - pos)
                pos += n
                self._discard -= n
                continue
            if self._header is None:
                if not buf and end - pos >= HEADER_SIZE:
                    header = HEADER.unpack_from(view, pos)
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - len(buf), end - pos)
                    buf += view[pos:pos + take]
                    pos += take
                    if len(buf) < HEADER_SIZE:
                        break
                    header = HEADER.unpack(buf)
                    buf.clear()
                length, sid, typ, flags = header
                if length > self.max_data:
                    events.append(Oversized(sid, typ, flags, length))
                    self._discard = length
                    continue
                self._header = header
                if length:
                    continue
                # zero-length frame: complete right now (also at the end of the input)
            length, sid, typ, flags = self._header
            if not buf and end - pos >= length:
                payload = bytes(view[pos:pos + length])
                pos += length
            else:
                take = min(length - len(buf), end - pos)
                buf += view[pos:pos + take]
                pos += take
                if len(buf) < length:
                    break
                payload = bytes(buf)
                buf.clear()
            self._header = None
            events.append(Frame(sid, typ, flags, payload))
        return events
