"""The stdio stream protocol of `stdio.proto`, sans-IO (h11 style): no asyncio, no sockets.

One class per role; each takes the peer's messages with `receive(msg) -> [events]` and says what
to send with `next_message()` (None: nothing until something changes), so the shim and vminitd
are short asyncio pumps around them and the rules live here once:

    role                      side   durable state (survives a reconnect)   per session
    output sender             guest  OutputBuffer                          OutputSender
    output receiver           host   OutputReceiver (offset consumed)      OutputReceiver.open()
    input sender              host   InputSender (bytes not yet received)  InputSender.open()
    input receiver            guest  InputBuffer                           InputReceiver

Rules (the properties tests/unit/test_stdio_session.py checks on random interleavings):

* Offsets are absolute byte positions in the process's stream, so a session cut short by a lost
  connection is replaced by a new one that resumes at an offset: nothing is lost (the sender
  keeps every byte the receiver has not acknowledged) or duplicated (data before the receiver's
  position is skipped or refused).
* Credit: the receiver grants `offset + window`; a sender never sends beyond it, and a peer
  that does is a protocol error. The accounting is ttrpc.flow's (SendCredit / ReceiveWindow).
* End of data is an explicit message the other side acknowledges. A closed stream or a lost
  connection never means "no more data"; the stream is final only once the EOF is acked.

A peer that breaks a rule raises `StdioProtocolError`; each side maps it to its own error tree
(vminitd: a status code for the host; the shim: a guest protocol error).

Imported by vminitd in the guest image: stdlib, ttrpc.flow and the generated stdio_pb2 only.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol, Union

from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb
from ttrpc.flow import FlowControlError, ReceiveWindow, SendCredit

log = logging.getLogger(__name__)

MAX_WINDOW = 16 << 20             # largest window either side grants or accepts
MAX_CHUNK = 1 << 20               # largest output data message the host accepts
# Output moves in few, large messages: under TCG every message costs the guest milliseconds of
# Python, whatever its size. The host acks every quarter window (1 MiB), so a sender waiting
# for credit gets 1 MiB at once; the guest holds at most 2 MiB unacknowledged per stream.
OUTPUT_CAPACITY = 2 << 20         # guest: unacknowledged output kept per stream
OUTPUT_CHUNK = 1 << 20            # guest: largest output message, and largest pipe read
DEFAULT_OUTPUT_WINDOW = 4 << 20   # host: guest bytes in flight per output stream
INPUT_WINDOW = 256 << 10          # guest: stdin bytes the host may have in flight
INPUT_CHUNK = 64 << 10            # host: largest stdin data message


class StdioProtocolError(Exception):
    """The peer broke the stdio protocol. `data_loss`: continuing would lose bytes (a resume
    before what was acknowledged and discarded, a gap in the offsets)."""

    def __init__(self, message: str, *, data_loss: bool = False) -> None:
        super().__init__(message)
        self.data_loss = data_loss


# --- events: what receive() tells the caller ---------------------------------------------

@dataclass(frozen=True)
class Data:
    """New bytes at [offset, offset + len(data)) (never bytes already reported)."""
    offset: int
    data: bytes


@dataclass(frozen=True)
class EndOfStream:
    """The sender's EOF arrived: `offset` is the stream's total length."""
    offset: int


@dataclass(frozen=True)
class Acked:
    """The receiver consumed everything before `offset` and may take `window` bytes beyond."""
    offset: int
    window: int


@dataclass(frozen=True)
class EofAcked:
    """The receiver acknowledged our EOF: the stream is final."""
    offset: int


Event = Union[Data, EndOfStream, Acked, EofAcked]


class AckMessage(Protocol):
    """What an output ack carries (spb.OutputAck, or vminitd's decoded form)."""
    offset: int
    window: int
    eof: bool


class DataMessage(Protocol):
    """What a stdin data message carries (spb.InputData, or vminitd's decoded form)."""
    offset: int
    data: bytes
    eof: bool


def clamp_window(window: int) -> int:
    """A window of 0 would stall the stream for good; one beyond MAX_WINDOW is capped."""
    return max(1, min(int(window), MAX_WINDOW))


def _quarter(window: int) -> int:
    # Grant credit back in quarters of the window (or at once when the receiver is drained):
    # few acks, and the sender rarely waits.
    return max(1, window // 4)


# --- output, guest side ------------------------------------------------------------------

class OutputBuffer:
    """A process's output in the guest: every byte the host has not acknowledged, up to
    `capacity` (the reader stops at `room == 0`: back-pressure on the process).

    Kept as the chunks the reads returned, never joined or shifted: under TCG emulation every
    pass over the bytes costs (guest memory bandwidth is what stdio throughput is made of), so a
    big read is kept as it came and sent as views of it (`views`). Small reads go into a
    bytearray tail of at most TAIL_MAX, so a process writing a byte at a time costs bytes, not
    an object per byte."""

    DIRECT = 8 << 10         # reads at least this big are kept as they came
    TAIL_MAX = 64 << 10      # small reads are gathered into bytearrays of up to this

    def __init__(self, capacity: int = OUTPUT_CAPACITY) -> None:
        self.capacity = capacity
        self.acked = 0              # the host has consumed everything before this offset
        self._chunks: deque[bytes | bytearray] = deque()   # bytes [acked - _skip, produced)
        self._skip = 0              # bytes of _chunks[0] already acknowledged
        self._size = 0              # unacknowledged bytes held
        self._tail: bytearray | None = None   # the last chunk, while small reads still extend it
        self.eof = False            # the process side reached EOF
        self.eof_acked = False      # the host acknowledged our EOF message: final
        self.generation = 0         # bumps when a new host session takes over

    @property
    def produced(self) -> int:
        return self.acked + self._size

    @property
    def room(self) -> int:
        return self.capacity - self._size

    def append(self, data: bytes) -> None:
        if self.eof:
            raise ValueError("output appended after EOF")
        n = len(data)
        if not n:
            return
        if n >= self.DIRECT:
            self._chunks.append(bytes(data))    # bytes(b) is b itself: no copy
            self._tail = None
        else:
            if self._tail is None or len(self._tail) + n > self.TAIL_MAX:
                self._tail = bytearray()
                self._chunks.append(self._tail)
            self._tail += data
        self._size += n

    def finish(self) -> None:
        self.eof = True

    def ack(self, offset: int) -> None:
        if offset < self.acked or offset > self.produced:
            raise StdioProtocolError(f"output ack at offset {offset} outside [{self.acked}, {self.produced}]",
                                     data_loss=offset < self.acked)
        drop = offset - self.acked
        self.acked = offset
        self._size -= drop
        while drop:
            left = len(self._chunks[0]) - self._skip
            if drop < left:
                self._skip += drop
                break
            drop -= left
            if self._chunks.popleft() is self._tail:
                self._tail = None
            self._skip = 0

    def views(self, offset: int, size: int) -> list[bytes | memoryview]:
        """The bytes [offset, offset + size) as pieces: views of the chunks read, copies of
        the (small) tail, which later reads may still extend."""
        pos = offset - self.acked + self._skip
        out: list[bytes | memoryview] = []
        for chunk in self._chunks:
            if size <= 0:
                break
            if pos >= len(chunk):
                pos -= len(chunk)
                continue
            piece = chunk[pos:pos + size] if isinstance(chunk, bytearray) else memoryview(chunk)[pos:pos + size]
            out.append(bytes(piece) if isinstance(piece, bytearray) else piece)
            size -= len(piece)
            pos = 0
        return out

    def read(self, offset: int, size: int) -> bytes:
        return b"".join(self.views(offset, size))

    def mark_eof_acked(self) -> None:
        self.eof_acked = True


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class OutputChunk:
    """One OutputServer message as the guest sends it: the data as views of the buffer, and
    `encode()` the protobuf wire form in pieces, so the bytes are never joined on the way
    (`to_proto()` / `data` join them, for tests and slow paths)."""

    __slots__ = ("offset", "pieces", "eof")

    def __init__(self, offset: int, pieces: list[bytes | memoryview], eof: bool = False) -> None:
        self.offset = offset
        self.pieces = pieces
        self.eof = eof

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)

    def __len__(self) -> int:
        return sum(len(p) for p in self.pieces)

    def to_proto(self) -> spb.OutputServer:
        return spb.OutputServer(offset=self.offset, data=self.data, eof=self.eof)

    def encode(self) -> list[bytes | memoryview]:
        # stdio.proto OutputServer: offset = 1 (varint), data = 2 (bytes), eof = 3 (bool)
        head = b"\x08" + _varint(self.offset) if self.offset else b""
        n = len(self)
        if n:
            return [head + b"\x12" + _varint(n), *self.pieces]
        return [head + (b"\x18\x01" if self.eof else b"")]

    def __repr__(self) -> str:
        return f"OutputChunk(offset={self.offset}, {len(self)} bytes, eof={self.eof})"


class OutputSender:
    """One host session (an Output stream) on an OutputBuffer, from the host's open(offset,
    window): chunks inside the window, then the EOF message once the buffer is finished and
    everything was sent. A newer session on the same buffer supersedes this one."""

    def __init__(self, buffer: OutputBuffer, offset: int, window: int, *, chunk: int = OUTPUT_CHUNK) -> None:
        if offset < buffer.acked:
            raise StdioProtocolError(f"output resume at offset {offset} but bytes before {buffer.acked} "
                                     "were already acknowledged and discarded", data_loss=True)
        if offset > buffer.produced:
            raise StdioProtocolError(f"output resume at offset {offset} beyond produced {buffer.produced}")
        buffer.ack(offset)          # the host has every byte before its resume offset
        buffer.generation += 1
        self.buffer = buffer
        self.chunk = chunk
        self._generation = buffer.generation
        self._credit = SendCredit(clamp_window(window), start=offset)
        self._eof_sent = False

    @property
    def superseded(self) -> bool:
        return self.buffer.generation != self._generation

    @property
    def sent(self) -> int:
        return self._credit.offset

    @property
    def done(self) -> bool:
        """Nothing more to do: the EOF was acknowledged, or a newer session took over."""
        return self.buffer.eof_acked or self.superseded

    def receive(self, ack: AckMessage) -> list[Event]:
        if self.done:
            return []               # a replaced session's late acks change nothing
        if ack.eof:
            if self._eof_sent and ack.offset == self.buffer.produced:
                self.buffer.ack(ack.offset)
                self.buffer.mark_eof_acked()
                return [EofAcked(ack.offset)]
            raise StdioProtocolError(f"EOF ack at {ack.offset} before the EOF was sent")
        if ack.offset > self.sent:
            raise StdioProtocolError(f"ack at {ack.offset} beyond the {self.sent} bytes sent")
        self.buffer.ack(ack.offset)
        window = clamp_window(ack.window)
        self._credit.update(ack.offset, window)
        return [Acked(ack.offset, window)]

    def next_message(self) -> OutputChunk | None:
        if self.done:
            return None
        n = min(self.buffer.produced - self.sent, self._credit.available, self.chunk)
        if n > 0:
            msg = OutputChunk(self.sent, self.buffer.views(self.sent, n))
            self._credit.spend(n)
            return msg
        if self.buffer.eof and self.sent == self.buffer.produced and not self._eof_sent:
            self._eof_sent = True
            return OutputChunk(self.sent, [], eof=True)
        return None


# --- output, host side -------------------------------------------------------------------

class OutputReceiver:
    """The host side of one process's output stream. `open()` starts a session (again after a
    lost connection: it resumes at `offset`, what the consumer has; bytes received but not
    consumed are dropped by the caller and sent again). `consumed(n)` when the consumer took
    bytes; the ack, and finally the EOF ack, come out of `next_message()`."""

    def __init__(self, id: str, exec_id: str, fd: int, *, offset: int = 0,
                 window: int = DEFAULT_OUTPUT_WINDOW, max_chunk: int = MAX_CHUNK) -> None:
        if fd not in (spb.STDOUT, spb.STDERR):
            raise ValueError(f"output fd must be 1 (stdout) or 2 (stderr), not {fd}")
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"output window {window} outside 1..{MAX_WINDOW}")
        self.id, self.exec_id, self.fd = id, exec_id, fd
        self.window = window
        self.max_chunk = max_chunk
        self.offset = offset                 # consumed (delivered to our consumer)
        self.eof_acked = False               # we acknowledged the guest's EOF: final
        self._credit = ReceiveWindow(window, threshold=_quarter(window), start=offset)
        self._eof_at: int | None = None      # the guest's EOF offset, once received
        self._ack_due = False

    @property
    def name(self) -> str:
        return f"{self.id}/{self.exec_id or 'init'}/{'stdout' if self.fd == spb.STDOUT else 'stderr'}"

    @property
    def received(self) -> int:
        return self._credit.received_offset

    @property
    def eof_received(self) -> bool:
        return self._eof_at is not None

    def open(self) -> spb.OutputClient:
        if self.eof_acked:
            raise ValueError(f"output {self.name}: the stream is over")
        self._credit = ReceiveWindow(self.window, threshold=_quarter(self.window), start=self.offset)
        self._eof_at = None
        self._ack_due = False
        return spb.OutputClient(open=spb.OutputOpen(id=self.id, exec_id=self.exec_id, fd=self.fd,  # type: ignore[arg-type]
                                                    offset=self.offset, window=self.window))

    def receive(self, msg: spb.OutputServer) -> list[Event]:
        where = f"output {self.name}"
        if self._eof_at is not None:
            raise StdioProtocolError(f"{where}: data after EOF")
        if msg.offset != self.received:
            raise StdioProtocolError(f"{where}: chunk at offset {msg.offset}, expected {self.received}")
        n = len(msg.data)
        if msg.eof:
            if n:
                raise StdioProtocolError(f"{where}: EOF message carries {n} bytes")
            self._eof_at = msg.offset
            return [EndOfStream(msg.offset)]
        if n == 0:
            raise StdioProtocolError(f"{where}: empty data message")
        if n > self.max_chunk:
            raise StdioProtocolError(f"{where}: chunk of {n} bytes (limit {self.max_chunk})")
        try:
            self._credit.received(n)
        except FlowControlError:
            limit = self._credit.granted_limit
            raise StdioProtocolError(f"{where}: chunk [{msg.offset}, {msg.offset + n}) beyond the window "
                                     f"(acked {limit - self.window} + {self.window})") from None
        return [Data(msg.offset, bytes(msg.data))]

    def consumed(self, n: int) -> None:
        """The consumer took `n` more bytes: credit goes back in quarters of the window, or at
        once when nothing received is left (the guest may be waiting for exactly this)."""
        if n <= 0:
            return
        if self._credit.consumed(n) or (self._credit.in_flight == 0 and self._credit.flush()):
            self._ack_due = True
        self.offset += n

    def next_message(self) -> spb.OutputClient | None:
        if self.eof_acked:
            return None
        if self._eof_at is not None and self.offset == self._eof_at:
            self.eof_acked = True
            return spb.OutputClient(ack=spb.OutputAck(offset=self.offset, window=self.window, eof=True))
        if self._ack_due:
            self._ack_due = False
            offset, window = self._credit.ack()
            return spb.OutputClient(ack=spb.OutputAck(offset=offset, window=window))
        return None

    def end_of_session(self) -> None:
        """The session's stream ended: an error unless we acknowledged the EOF."""
        if not self.eof_acked:
            raise StdioProtocolError(f"output {self.name}: stream ended at offset {self.received} without EOF")


# --- input, host side --------------------------------------------------------------------

class InputSender:
    """The host side of a process's stdin. `send_data()` queues bytes (the caller bounds what
    it queues by `buffered` against `window`), `send_eof()` asks to close stdin after them.
    `open()` starts a session (again after a lost connection); the guest answers with its
    position and window, and data goes out from that position, inside that window."""

    def __init__(self, id: str, exec_id: str = "", *, chunk: int = INPUT_CHUNK,
                 max_window: int = MAX_WINDOW) -> None:
        self.id, self.exec_id = id, exec_id
        self.chunk = chunk
        self.max_window = max_window
        self.acked = 0                        # the guest confirmed everything before this
        self.window = 0                       # the guest's last window
        self.eof_acked = False                # the guest closed stdin after all our bytes: final
        self._buf = bytearray()               # bytes [acked, end) the guest has not confirmed
        self._credit: SendCredit | None = None   # this session's, once the guest answered
        self._eof_requested = False
        self._eof_sent = False                # in this session
        self._eof_ever_sent = False           # in any session

    @property
    def name(self) -> str:
        return f"{self.id}/{self.exec_id or 'init'}/stdin"

    @property
    def end(self) -> int:
        return self.acked + len(self._buf)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def eof_requested(self) -> bool:
        return self._eof_requested

    def open(self) -> spb.InputClient:
        if self.eof_acked:
            raise ValueError(f"input {self.name}: the stream is over")
        self._credit = None
        self._eof_sent = False
        return spb.InputClient(open=spb.InputOpen(id=self.id, exec_id=self.exec_id))

    def send_data(self, data: bytes) -> None:
        if self._eof_requested:
            raise ValueError(f"{self.name}: write after close")
        self._buf += data

    def send_eof(self) -> None:
        self._eof_requested = True

    def receive(self, msg: spb.InputServer) -> list[Event]:
        where = f"input {self.name}"
        if msg.offset < self.acked:
            raise StdioProtocolError(f"{where}: guest offset went back from {self.acked} to {msg.offset}")
        # The first answer of a session may confirm bytes a lost session sent: anything queued.
        top = self._credit.offset if self._credit is not None else self.end
        if msg.offset > top:
            raise StdioProtocolError(f"{where}: guest acknowledged {msg.offset} bytes but only {top} were sent")
        if msg.window > self.max_window:
            raise StdioProtocolError(f"{where}: window {msg.window} (limit {self.max_window})")
        if msg.eof:
            # The guest may acknowledge an EOF that a lost session sent (it closed stdin on
            # it): an EOF sent in any session counts.
            if not self._eof_ever_sent or msg.offset != self.end:
                raise StdioProtocolError(f"{where}: EOF acknowledged at {msg.offset} before we sent it "
                                         f"(end {self.end})")
            self._buf.clear()
            self.acked = msg.offset
            self.eof_acked = True
            return [EofAcked(msg.offset)]
        del self._buf[:msg.offset - self.acked]
        self.acked = msg.offset
        self.window = msg.window
        if self._credit is None:      # a new session resumes at the guest's position
            self._credit = SendCredit(msg.window, start=msg.offset)
        else:
            self._credit.update(msg.offset, msg.window)
        return [Acked(msg.offset, msg.window)]

    def next_message(self) -> spb.InputClient | None:
        credit = self._credit
        if credit is None or self.eof_acked:
            return None
        n = min(self.end - credit.offset, credit.available, self.chunk)
        if n > 0:
            start = credit.offset - self.acked
            msg = spb.InputClient(data=spb.InputData(offset=credit.offset, data=bytes(self._buf[start:start + n])))
            credit.spend(n)
            return msg
        if self._eof_requested and not self._eof_sent and credit.offset == self.end:
            self._eof_sent = self._eof_ever_sent = True
            return spb.InputClient(data=spb.InputData(offset=self.end, eof=True))
        return None


# --- input, guest side -------------------------------------------------------------------

class InputBuffer:
    """A process's stdin in the guest: bytes the host sent (at absolute offsets, inside the
    window granted) until the writer puts them into the process (`take` / `wrote`)."""

    def __init__(self, window: int = INPUT_WINDOW) -> None:
        self.window = window
        self._credit = ReceiveWindow(window, threshold=_quarter(window))
        self._pending = bytearray()
        self.eof_requested = False   # the host sent EOF (or CloseStdin): close after pending
        self.closed = False          # stdin is closed in the process: final
        self.broken = False          # the process closed its stdin: further data is dropped

    @property
    def received(self) -> int:
        return self._credit.received_offset

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def available(self) -> int:
        """Bytes the host may still send under the window granted so far."""
        return self._credit.granted_limit - self.received

    @property
    def granted_limit(self) -> int:
        return self._credit.granted_limit

    def accept(self, msg: DataMessage) -> list[Event]:
        if self.eof_requested and msg.data and msg.offset + len(msg.data) > self.received:
            raise StdioProtocolError("stdin data after EOF")
        if msg.offset > self.received:
            raise StdioProtocolError(f"stdin data at offset {msg.offset} but only {self.received} "
                                     "bytes were received (a gap)", data_loss=True)
        start = self.received
        data = bytes(msg.data[start - msg.offset:])
        events: list[Event] = []
        if data:
            try:
                self._credit.received(len(data))
            except FlowControlError:
                raise StdioProtocolError(f"stdin data beyond the granted window "
                                         f"({len(data)} > {self.available})") from None
            if self.broken:
                self._consumed(len(data))
            else:
                self._pending += data
            events.append(Data(start, data))
        if msg.eof and not self.eof_requested:
            self.eof_requested = True
            events.append(EndOfStream(self.received))
        return events

    def request_eof(self) -> None:
        """CloseStdin: EOF after everything received so far."""
        self.eof_requested = True

    def take(self, size: int) -> bytes:
        """The next bytes for the writer (still pending until `wrote`)."""
        return bytes(self._pending[:size])

    def wrote(self, n: int) -> None:
        del self._pending[:n]
        self._consumed(n)

    def mark_broken(self) -> None:
        """The process closed its stdin: drop what is pending, and what comes later."""
        self.broken = True
        self._consumed(len(self._pending))
        self._pending.clear()

    def mark_closed(self) -> None:
        self.closed = True

    def flush_grant(self) -> None:
        self._credit.flush()

    def _consumed(self, n: int) -> None:
        # Credit in quarters of the window, or all at once when nothing is left to write.
        if n > 0 and not self._credit.consumed(n) and self._credit.in_flight == 0:
            self._credit.flush()


class InputReceiver:
    """One host session (an Input stream) on an InputBuffer: the first message tells the host
    our position and window, later ones grant the credit the writer frees, the last one
    acknowledges the EOF once stdin is closed in the process."""

    def __init__(self, buffer: InputBuffer) -> None:
        self.buffer = buffer
        self.done = False            # EOF acknowledged
        self._told: int | None = None   # the limit the host knows

    def receive(self, msg: DataMessage) -> list[Event]:
        return self.buffer.accept(msg)

    def next_message(self) -> spb.InputServer | None:
        b = self.buffer
        if self.done:
            return None
        if b.closed:
            self.done = True
            return spb.InputServer(offset=b.received, window=b.window - b.pending, eof=True)
        if self._told is None:
            b.flush_grant()          # a new session starts with the whole window
        limit = b.granted_limit
        if self._told is None or limit > self._told:
            self._told = limit
            return spb.InputServer(offset=b.received, window=limit - b.received)
        return None
