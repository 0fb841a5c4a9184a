"""Sans-IO frame codec and the status/error model (no sockets)."""
from __future__ import annotations

import struct

import pytest

import ttrpc
from ttrpc.frame import (HEADER_SIZE, MAX_DATA, Flags, Frame, FrameDecoder, MessageType,
                         Oversized, OversizedMessage, encode_frame)


def test_header_layout_is_big_endian_length_id_type_flags():
    raw = encode_frame(0x01020304, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"ab")
    assert raw[:HEADER_SIZE] == bytes([0, 0, 0, 2, 1, 2, 3, 4, 3, 5])
    assert raw[HEADER_SIZE:] == b"ab"
    assert HEADER_SIZE == 10 and MAX_DATA == 4 * 1024 * 1024


def test_round_trip_including_empty_and_max_size():
    frames = [Frame(1, MessageType.REQUEST, 0, b"hello"), Frame(3, MessageType.DATA, 0, b""),
              Frame(3, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b""),
              Frame(5, MessageType.RESPONSE, 0, b"\xff" * MAX_DATA)]
    wire = b"".join(encode_frame(f.stream_id, f.type, f.flags, f.data) for f in frames)
    assert FrameDecoder().feed(wire) == frames


def test_byte_at_a_time_feeding():
    wire = encode_frame(7, 1, 2, b"xyz") + encode_frame(9, 2, 0, b"")
    dec = FrameDecoder()
    out = []
    for i in range(len(wire)):
        out += dec.feed(wire[i:i + 1])
        assert dec.buffered <= HEADER_SIZE + 3
    assert out == [Frame(7, 1, 2, b"xyz"), Frame(9, 2, 0, b"")]
    assert dec.at_boundary


def test_partial_frame_is_not_at_boundary():
    dec = FrameDecoder()
    assert dec.feed(encode_frame(1, 1, 0, b"abcdef")[:-2]) == []
    assert not dec.at_boundary


def test_unknown_message_type_is_decoded_not_rejected():
    assert FrameDecoder().feed(encode_frame(1, 0x7F, 0xFF, b"?")) == [Frame(1, 0x7F, 0xFF, b"?")]


def test_oversized_frame_is_reported_and_skipped_without_buffering():
    dec = FrameDecoder(max_data=100)
    header = struct.pack(">IIBB", 1000, 11, MessageType.REQUEST, 0)
    events = dec.feed(header)
    assert events == [Oversized(11, MessageType.REQUEST, 0, 1000)]
    assert "exceed maximum message size of 100" in events[0].message(100)
    for _ in range(10):  # the 1000 bytes arrive in chunks and are dropped as they come
        assert dec.feed(b"\0" * 100) == []
        assert dec.buffered == 0
    assert dec.feed(encode_frame(13, MessageType.REQUEST, 0, b"ok")) == [Frame(13, 1, 0, b"ok")]


def test_real_limit_oversized_frame_keeps_memory_bounded():
    dec = FrameDecoder()
    header = struct.pack(">IIBB", MAX_DATA + 1, 1, MessageType.REQUEST, 0)
    assert dec.feed(header + b"\0" * (1 << 20)) == [Oversized(1, 1, 0, MAX_DATA + 1)]
    assert dec.buffered == 0
    rest = dec.feed(b"\0" * (MAX_DATA + 1 - (1 << 20)) + encode_frame(3, 1, 0, b""))
    assert rest == [Frame(3, 1, 0, b"")]


def test_encode_refuses_oversized_data():
    with pytest.raises(OversizedMessage) as err:
        encode_frame(1, 1, 0, b"\0" * (MAX_DATA + 1))
    assert err.value.code == ttrpc.Code.RESOURCE_EXHAUSTED
    assert isinstance(err.value, ttrpc.ResourceExhausted)


# -- status / errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [ttrpc.NotFound, ttrpc.AlreadyExists, ttrpc.InvalidArgument,
                                 ttrpc.FailedPrecondition, ttrpc.Unimplemented,
                                 ttrpc.DeadlineExceeded, ttrpc.Cancelled, ttrpc.Unavailable,
                                 ttrpc.ResourceExhausted, ttrpc.Internal, ttrpc.Unknown,
                                 ttrpc.PermissionDenied, ttrpc.OutOfRange, ttrpc.Aborted,
                                 ttrpc.DataLoss, ttrpc.Unauthenticated])
def test_error_from_status_gives_the_typed_subclass(cls):
    err = ttrpc.error_from_status(int(cls.code), "msg")
    assert type(err) is cls
    assert isinstance(err, ttrpc.TTRPCError)
    assert err.message == "msg"
    assert err.to_status().code == cls.code


def test_unknown_code_keeps_its_number():
    err = ttrpc.error_from_status(77, "future code")
    assert type(err) is ttrpc.TTRPCError and err.code == 77


def test_generic_error_takes_a_code():
    err = ttrpc.TTRPCError(ttrpc.Code.ABORTED, "x")
    assert err.code == ttrpc.Code.ABORTED and str(err) == "ABORTED: x"


def test_connection_closed_is_unavailable():
    err = ttrpc.ConnectionClosed("gone")
    assert isinstance(err, ttrpc.Unavailable) and err.code == ttrpc.Code.UNAVAILABLE


@pytest.mark.parametrize("exc,code", [
    (FileNotFoundError(2, "no such file"), ttrpc.Code.NOT_FOUND),
    (ProcessLookupError(3, "no such process"), ttrpc.Code.NOT_FOUND),
    (FileExistsError(17, "exists"), ttrpc.Code.ALREADY_EXISTS),
    (PermissionError(13, "denied"), ttrpc.Code.PERMISSION_DENIED),
    (TimeoutError(), ttrpc.Code.DEADLINE_EXCEEDED),
    (ValueError("bad"), ttrpc.Code.INVALID_ARGUMENT),
    (NotImplementedError(), ttrpc.Code.UNIMPLEMENTED),
    (EOFError(), ttrpc.Code.OUT_OF_RANGE),
    (BrokenPipeError(), ttrpc.Code.FAILED_PRECONDITION),
    (RuntimeError("bug"), ttrpc.Code.UNKNOWN),
    (KeyError("k"), ttrpc.Code.UNKNOWN),
    (ttrpc.Aborted("typed wins"), ttrpc.Code.ABORTED),
])
def test_exception_mapping(exc, code):
    assert ttrpc.code_for_exception(exc) == code
    status = ttrpc.status_from_exception(exc)
    assert status.code == code and status.message
