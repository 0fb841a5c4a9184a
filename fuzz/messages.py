"""Hostile protobuf messages for a message class: most are well-formed with values chosen to
sit on the edges of every rule (ids, pids, statuses, lengths, offsets), some are mutated wire
bytes, a few are raw bytes. Built from the descriptor, so a new field is fuzzed unasked."""
from __future__ import annotations

from typing import Any

from google.protobuf import message as _message
from google.protobuf.descriptor import FieldDescriptor

from spinbox.api import contract

from .data import Input

F = FieldDescriptor
_PID_MAX = contract.PID_MAX

INTS = (0, 1, 2, 7, 15, 64, 65, 127, 128, 255, 256, 4096, 65535, 65536, 1 << 20, (1 << 20) + 1,
        4 << 20, 16 << 20, (16 << 20) + 1, _PID_MAX - 1, _PID_MAX, _PID_MAX + 1, (1 << 31) - 1,
        1 << 31, (1 << 32) - 1, (1 << 63) - 1)
NEGATIVE = (-1, -2, -(1 << 31), -(1 << 63))
STRINGS = ("", "c1", "c2", "e1", "init", "a" * 76, "a" * 77, ".x", "../etc", "a/b", "a\nb", "a\rb", "a\0b",
           "é", "\u202e", " ", "x" * 4097, "runc", "spinbox.agent.v1", "eth0", "aa:bb:cc:dd:ee:ff",
           "10.88.0.5/16", "::/0", "virtiofs", "/run/rootfs", "/", "relative", "-", "lo", "a" * 16)
FLOATS = (0.0, -0.0, 1.0, -1.0, 1e10, float("inf"), float("-inf"), float("nan"), 3.5)
ENUM_EXTRA = (-1, 3, 99, (1 << 31) - 1)

_INT_TYPES = {F.TYPE_INT32: 32, F.TYPE_SINT32: 32, F.TYPE_SFIXED32: 32, F.TYPE_INT64: 64,
              F.TYPE_SINT64: 64, F.TYPE_SFIXED64: 64}
_UINT_TYPES = {F.TYPE_UINT32: 32, F.TYPE_FIXED32: 32, F.TYPE_UINT64: 64, F.TYPE_FIXED64: 64}


def _int(inp: Input, bits: int, signed: bool) -> int:
    choice = inp.below(4)
    if choice == 0:
        value = inp.uint(bits // 8)          # anything
        if signed and value >= 1 << (bits - 1):
            value -= 1 << bits
    elif choice == 1 and signed:
        value = inp.pick(NEGATIVE)
    else:
        value = inp.pick(INTS)
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    return max(lo, min(hi, value))


def _string(inp: Input, pool: tuple[str, ...]) -> str:
    if inp.chance(4):
        return inp.blob(96).decode("utf-8", errors="replace")
    if pool and inp.flag():
        return inp.pick(pool)
    return inp.pick(STRINGS)


def _scalar(inp: Input, field: Any, pool: tuple[str, ...]) -> Any:
    t = field.type
    if t in _INT_TYPES:
        return _int(inp, _INT_TYPES[t], True)
    if t in _UINT_TYPES:
        return _int(inp, _UINT_TYPES[t], False)
    if t == F.TYPE_BOOL:
        return inp.flag()
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return inp.pick(FLOATS) if inp.flag() else float(inp.uint(2))
    if t == F.TYPE_STRING:
        return _string(inp, pool)
    if t == F.TYPE_BYTES:
        return inp.blob(256)
    if t == F.TYPE_ENUM:
        assert field.enum_type is not None  # an enum field has its type
        numbers = [v.number for v in field.enum_type.values]
        return inp.pick(numbers) if not inp.chance(4) else inp.pick(ENUM_EXTRA)
    raise AssertionError(f"unhandled field type {t}")


def fill(msg: _message.Message, inp: Input, *, pool: tuple[str, ...] = (), depth: int = 0) -> _message.Message:
    """Set some fields of `msg` from `inp` (one member of each oneof; up to 3 repeated values;
    nested messages to depth 3). `pool`: strings worth trying first (the ids in play)."""
    desc = msg.DESCRIPTOR
    chosen_oneofs: dict[str, str] = {}
    for o in desc.oneofs:
        members: list[Any] = list(o.fields)
        if members:
            chosen_oneofs[o.name] = inp.pick(members).name
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen_oneofs.get(oneof.name) != field.name:
            continue
        if not inp.flag() and oneof is None:
            continue
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if field.is_repeated:
                for _ in range(inp.below(4)):
                    fill(getattr(msg, field.name).add(), inp, pool=pool, depth=depth + 1)
            else:
                sub = getattr(msg, field.name)
                sub.SetInParent()
                fill(sub, inp, pool=pool, depth=depth + 1)
        elif field.is_repeated:
            getattr(msg, field.name).extend(_scalar(inp, field, pool) for _ in range(inp.below(4)))
        else:
            setattr(msg, field.name, _scalar(inp, field, pool))
    return msg


def mutate(wire: bytes, inp: Input) -> bytes:
    """Byte-level damage to a serialized message: truncation, a flipped byte, garbage appended,
    a duplicated field (a later field wins, repeated ones grow)."""
    kind = inp.below(5)
    if kind == 0 and wire:
        return wire[:inp.below(len(wire))]
    if kind == 1 and wire:
        i = inp.below(len(wire))
        return wire[:i] + bytes([wire[i] ^ (inp.byte() | 1)]) + wire[i + 1:]
    if kind == 2:
        return wire + inp.blob(32)
    if kind == 3:
        return wire + wire
    return inp.blob(64) + wire


def hostile(cls: type[_message.Message], inp: Input, *, pool: tuple[str, ...] = ()) -> bytes:
    """Wire bytes claiming to be a `cls`: 3 in 4 well-formed, then mutated, then raw."""
    choice = inp.below(8)
    if choice == 0:
        return inp.blob(128)
    wire = fill(cls(), inp, pool=pool).SerializeToString()
    if choice == 1:
        return mutate(wire, inp)
    return wire
