"""Property tests for the frame decoder: any chunking decodes to the same frames; garbage never
crashes it and never makes it hold more than one header plus one maximal frame."""
from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

import ttrpc
from ttrpc.frame import HEADER_SIZE, Frame, FrameDecoder, Oversized, encode_frame

SMALL_MAX = 512  # a small limit keeps examples fast; the logic does not depend on its value

frames_st = st.lists(
    st.builds(Frame,
              stream_id=st.integers(0, 2**32 - 1),
              type=st.integers(0, 255),
              flags=st.integers(0, 255),
              data=st.binary(max_size=SMALL_MAX)),
    max_size=20)


def _encode(frames):
    return b"".join(encode_frame(f.stream_id, f.type, f.flags, f.data, max_data=SMALL_MAX)
                    for f in frames)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


@settings(max_examples=300, deadline=None)
@given(frames=frames_st, cuts=st.lists(st.integers(0, 1 << 16), max_size=30))
def test_any_chunking_gives_the_same_frames(frames, cuts):
    wire = _encode(frames)
    dec = FrameDecoder(max_data=SMALL_MAX)
    out = []
    for piece in _split(wire, cuts):
        out += dec.feed(piece)
        assert dec.buffered <= SMALL_MAX + HEADER_SIZE
    assert out == frames
    assert dec.at_boundary


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 1 << 16), max_size=20))
def test_garbage_never_crashes_and_memory_stays_bounded(garbage, cuts):
    dec = FrameDecoder(max_data=SMALL_MAX)
    for piece in _split(garbage, cuts):
        for ev in dec.feed(piece):
            assert isinstance(ev, (Frame, Oversized))
            if isinstance(ev, Frame):
                assert len(ev.data) <= SMALL_MAX
            else:
                assert ev.length > SMALL_MAX
        assert dec.buffered <= SMALL_MAX + HEADER_SIZE


@settings(max_examples=200, deadline=None)
@given(before=frames_st, after=frames_st, sid=st.integers(0, 2**32 - 1),
       excess=st.integers(1, 5000), cuts=st.lists(st.integers(0, 1 << 16), max_size=20))
def test_oversized_frame_between_valid_frames_is_skipped_exactly(before, after, sid, excess, cuts):
    length = SMALL_MAX + excess
    big = struct.pack(">IIBB", length, sid, 1, 0) + bytes(length)
    wire = _encode(before) + big + _encode(after)
    dec = FrameDecoder(max_data=SMALL_MAX)
    out = []
    for piece in _split(wire, cuts):
        out += dec.feed(piece)
        assert dec.buffered <= SMALL_MAX + HEADER_SIZE
    assert out == before + [Oversized(sid, 1, 0, length)] + after


@given(code=st.integers(0, 40), message=st.text(max_size=50))
def test_status_round_trip(code, message):
    err = ttrpc.error_from_status(code, message)
    assert int(err.code) == code and err.message == message
    back = ttrpc.error_from_status(err.to_status().code, err.to_status().message)
    assert type(back) is type(err)
