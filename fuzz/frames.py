"""Target `frames`: ttrpc's frame decoder (`ttrpc/frame.py`) and the channel's reader
(`ttrpc/channel.py`) fed arbitrary byte streams, cut into arbitrary reads.

The stream is a run of well-formed frames, oversized headers and raw bytes. Invariants: the
decoder returns only Frame/Oversized events, no frame longer than the limit, never holds more
than one header plus one frame's data; the events do not depend on how the stream was cut
(fed at once, in the fuzzer's chunks, byte by byte); the well-formed frames decode to what
was encoded; the channel reader yields the same events and raises its ProtocolError exactly
when EOF cuts a frame.
"""
from __future__ import annotations

import asyncio
from typing import cast

from ttrpc.channel import Channel, ProtocolError
from ttrpc.frame import HEADER_SIZE, MAX_DATA, Frame, FrameDecoder, Oversized, encode_frame, encode_header

from .data import Input
from .driver import Finding, Target

LIMITS = (0, 1, 16, 1024, MAX_DATA)


def build_stream(inp: Input, max_data: int) -> tuple[bytes, list[Frame | Oversized] | None]:
    """A byte stream and, while it is made of whole frames only, the events it must decode
    to (None once raw bytes make that unknowable)."""
    out = bytearray()
    expected: list[Frame | Oversized] | None = []
    for _ in range(inp.below(8) + 1):
        kind = inp.below(6)
        sid, typ, flags = inp.uint(4), inp.pick((1, 2, 3, 0, 4, 255)), inp.byte()
        if kind <= 2:
            data = inp.blob(64 if max_data >= 64 else max_data)[:max_data]
            out += encode_frame(sid, typ, flags, data, max_data=max_data)
            if expected is not None:
                expected.append(Frame(sid, typ, flags, data))
        elif kind == 3:
            # declares more than the limit; its body (partly) follows and must be skipped
            length = max_data + 1 + inp.below(64)
            body = inp.take(inp.below(length + 1))
            out += encode_header(sid, typ, flags, length) + body
            if expected is not None:
                expected.append(Oversized(sid, typ, flags, length))
                if len(body) < length:
                    expected = None      # the stream ends inside the skipped body
        else:
            out += inp.blob(32)
            expected = None
    return bytes(out), expected


def cuts(inp: Input, n: int) -> list[int]:
    """Where the reads end: arbitrary sizes, often tiny (a header split anywhere)."""
    points, pos = [], 0
    while pos < n:
        pos += 1 + inp.below(HEADER_SIZE * 3 if inp.flag() else 256)
        points.append(min(pos, n))
    return points


def decode(stream: bytes, points: list[int], max_data: int) -> tuple[list[Frame | Oversized], FrameDecoder]:
    dec = FrameDecoder(max_data)
    events: list[Frame | Oversized] = []
    start = 0
    for end in points:
        events.extend(dec.feed(memoryview(stream)[start:end]))
        start = end
        if dec.buffered > HEADER_SIZE + max_data:
            raise Finding(f"decoder holds {dec.buffered} bytes (limit {max_data})")
    return events, dec


class FramesHarness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __call__(self, data: bytes) -> None:
        inp = Input(data)
        max_data = inp.pick(LIMITS)
        stream, expected = build_stream(inp, max_data)
        if inp.flag():
            stream += inp.rest()                 # whatever the fuzzer appended
            expected = None if len(stream) else expected
        points = cuts(inp, len(stream))
        events, dec = decode(stream, points, max_data)
        for ev in events:
            if type(ev) is Frame:
                if len(ev.data) > max_data:
                    raise Finding(f"frame of {len(ev.data)} bytes passed the limit {max_data}")
            elif type(ev) is Oversized:
                if ev.length <= max_data:
                    raise Finding(f"Oversized event for {ev.length} bytes (limit {max_data})")
            else:
                raise Finding(f"decoder returned {type(ev).__name__}")
        whole, whole_dec = decode(stream, [len(stream)] if stream else [], max_data)
        if whole != events or whole_dec.at_boundary != dec.at_boundary:
            raise Finding("events depend on how the stream was cut into reads")
        if len(stream) <= 512:
            single, _ = decode(stream, list(range(1, len(stream) + 1)), max_data)
            if single != events:
                raise Finding("byte-by-byte feed decodes differently")
        if expected is not None and events != expected:
            raise Finding(f"well-formed frames decoded as {events[:3]}..., expected {expected[:3]}...")
        self.loop.run_until_complete(self._channel(stream, points, max_data, events, dec.at_boundary))

    async def _channel(self, stream: bytes, points: list[int], max_data: int,
                       events: list[Frame | Oversized], at_boundary: bool) -> None:
        reader = asyncio.StreamReader()
        start = 0
        for end in points:
            reader.feed_data(stream[start:end])
            start = end
        reader.feed_eof()
        # the reader only reads: no writer is ever touched by events()
        channel = Channel(reader, cast(asyncio.StreamWriter, None), max_data=max_data)
        got: list[Frame | Oversized] = []
        try:
            async for batch in channel.events():
                got.extend(batch)
        except ProtocolError:
            if at_boundary:
                raise Finding("ProtocolError at a frame boundary") from None
        else:
            if not at_boundary:
                raise Finding("EOF inside a frame went unnoticed")
        if got != events:
            raise Finding("the channel reader's events differ from the decoder's")

    def close(self) -> None:
        self.loop.close()


def seeds() -> list[bytes]:
    return [b"", b"\x04" + b"\x00" * 40, bytes(range(64)), b"\x03\x01" + b"\xff" * 30,
            b"\x04\x01\x05\x00\x00\x00\x02\x00\x00\x00\x00" + b"abc" * 10]


TARGET = Target("frames", "ttrpc FrameDecoder + Channel.events on arbitrary byte streams and reads",
                FramesHarness, seeds, weight=11.0, time_bound_s=2.0, memory_bound_mb=32)
