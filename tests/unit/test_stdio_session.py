"""The sans-IO stdio session (spinbox.api.stdio_session) on random interleavings.

Each direction is a hypothesis state machine: the process side produces bytes and finishes,
both peers pump messages into per-direction queues (ordered, as a ttrpc stream is), messages
are delivered one at a time in any order between the two directions, the consumer takes bytes
whenever, and a reconnect drops everything in flight and resumes at the receiver's offset.
Checked throughout: no byte lost or duplicated, no data message beyond the window the
receiver granted, no protocol error between two honest peers, and the EOF final once only
after all the data; at the end, pumping without interference finishes the stream.
"""
from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from spinbox.api import stdio_session as s
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb

SETTINGS = settings(max_examples=150, stateful_step_count=60, deadline=None)


# --- output: guest OutputBuffer/OutputSender -> host OutputReceiver -------------------------

class OutputMachine(RuleBasedStateMachine):

    @initialize(window=st.integers(1, 48), capacity=st.integers(1, 64), chunk=st.integers(1, 16))
    def setup(self, window: int, capacity: int, chunk: int) -> None:
        self.window, self.chunk = window, chunk
        self.buf = s.OutputBuffer(capacity)
        self.rx = s.OutputReceiver("c1", "", 1, window=window)
        self.produced = bytearray()        # what the process wrote
        self.consumed = bytearray()        # what the host's consumer took, in order
        self.pending = bytearray()         # received by the host, not yet consumed
        self.eof_seen = 0                  # times the host's consumer saw the end
        self.eof_acked_events = 0
        self.stale: list[s.OutputSender] = []
        self._connect()

    def _connect(self) -> None:
        self.pending.clear()               # not consumed: the guest sends it again
        self.to_host: deque[spb.OutputServer] = deque()
        self.to_guest: deque[spb.OutputAck] = deque()
        opened = self.rx.open().open
        assert opened.offset == self.rx.offset == len(self.consumed)
        self.told_limit = opened.offset + opened.window
        self.tx = s.OutputSender(self.buf, opened.offset, opened.window, chunk=self.chunk)

    # the process
    @rule(data=st.binary(min_size=1, max_size=32))
    def process_writes(self, data: bytes) -> None:
        if self.buf.eof or self.buf.room == 0:
            return
        data = data[:self.buf.room]
        self.buf.append(data)
        self.produced += data

    @rule()
    def process_exits(self) -> None:
        self.buf.finish()

    # the peers' pumps
    @rule()
    def guest_sends(self) -> None:
        msg = self.tx.next_message()
        if msg is not None:
            # never beyond what the host granted in this session
            assert msg.offset + len(msg.data) <= self.told_limit
            if msg.eof:
                assert self.buf.eof and msg.offset == len(self.produced)
            self.to_host.append(msg)

    @precondition(lambda self: self.to_host)
    @rule()
    def host_receives(self) -> None:
        for event in self.rx.receive(self.to_host.popleft()):
            if isinstance(event, s.Data):
                assert event.offset == self.rx.offset + len(self.pending)
                self.pending += event.data

    @rule(n=st.integers(1, 40))
    def host_consumes(self, n: int) -> None:
        take = bytes(self.pending[:n])
        del self.pending[:len(take)]
        self.consumed += take
        self.rx.consumed(len(take))
        assert bytes(self.consumed) == bytes(self.produced[:len(self.consumed)])

    @rule()
    def host_sends(self) -> None:
        was_final = self.rx.eof_acked
        msg = self.rx.next_message()
        if msg is None:
            return
        ack = msg.ack
        if ack.eof:
            assert not was_final
            assert bytes(self.consumed) == bytes(self.produced) and self.buf.eof
            self.eof_seen += 1
        else:
            self.told_limit = max(self.told_limit, ack.offset + ack.window)
        self.to_guest.append(ack)

    @precondition(lambda self: self.to_guest)
    @rule()
    def guest_receives(self) -> None:
        for event in self.tx.receive(self.to_guest.popleft()):
            if isinstance(event, s.EofAcked):
                self.eof_acked_events += 1
                assert event.offset == len(self.produced)

    @precondition(lambda self: not self.rx.eof_acked)
    @rule()
    def reconnect(self) -> None:
        self.stale.append(self.tx)
        self._connect()

    @precondition(lambda self: self.stale)
    @rule()
    def stale_session_gets_an_ack(self) -> None:
        old = self.stale[-1]
        assert old.superseded and old.next_message() is None
        assert old.receive(spb.OutputAck(offset=self.buf.acked, window=1)) == []

    @invariant()
    def bounded(self) -> None:
        if not hasattr(self, "buf"):
            return
        assert self.buf.produced - self.buf.acked <= self.buf.capacity
        assert self.buf.acked <= self.rx.offset   # the guest drops only what the host consumed
        assert self.eof_seen <= 1 and self.eof_acked_events <= 1
        assert self.buf.eof_acked == (self.eof_acked_events == 1)

    def teardown(self) -> None:
        if not hasattr(self, "buf"):
            return
        self.buf.finish()
        for _ in range(10_000):
            if self.buf.eof_acked:
                break
            self.guest_sends()
            while self.to_host:
                self.host_receives()
            self.host_consumes(1 << 20)
            self.host_sends()
            while self.to_guest:
                self.guest_receives()
        assert self.buf.eof_acked and self.rx.eof_acked and self.eof_seen == 1
        assert bytes(self.consumed) == bytes(self.produced)


TestOutputSession = OutputMachine.TestCase
TestOutputSession.settings = SETTINGS


# --- input: host InputSender -> guest InputBuffer/InputReceiver ----------------------------

class InputMachine(RuleBasedStateMachine):

    @initialize(window=st.integers(1, 48), chunk=st.integers(1, 16))
    def setup(self, window: int, chunk: int) -> None:
        self.tx = s.InputSender("c1", "", chunk=chunk)
        self.buf = s.InputBuffer(window)
        self.written = bytearray()         # what reached the process
        self.queued = bytearray()          # what the host's writer queued
        self.eof_acked_events = 0
        self._connect()

    def _connect(self) -> None:
        self.to_guest: deque[spb.InputData] = deque()
        self.to_host: deque[spb.InputServer] = deque()
        self.tx.open()
        self.rx = s.InputReceiver(self.buf)
        self.told_limit = -1

    @rule(data=st.binary(min_size=1, max_size=32))
    def host_writes(self, data: bytes) -> None:
        if self.tx.eof_requested:
            with pytest.raises(ValueError):
                self.tx.send_data(data)
            return
        self.tx.send_data(data)
        self.queued += data

    @rule()
    def host_closes(self) -> None:
        self.tx.send_eof()

    @rule()
    def host_sends(self) -> None:
        msg = self.tx.next_message()
        if msg is None:
            return
        d = msg.data
        assert d.offset + len(d.data) <= self.told_limit, "beyond the guest's window"
        if d.eof:
            assert d.offset == len(self.queued) and not d.data
        self.to_guest.append(d)

    @precondition(lambda self: self.to_guest)
    @rule()
    def guest_receives(self) -> None:
        before = self.buf.received
        events = self.rx.receive(self.to_guest.popleft())
        assert self.buf.received <= self.buf.granted_limit
        for event in events:
            if isinstance(event, s.Data):
                assert event.offset == before
                assert event.data == bytes(self.queued[before:before + len(event.data)])

    @rule(n=st.integers(1, 40))
    def guest_writes_into_the_process(self, n: int) -> None:
        take = self.buf.take(n)
        self.buf.wrote(len(take))
        self.written += take
        assert bytes(self.written) == bytes(self.queued[:len(self.written)])
        if self.buf.eof_requested and not self.buf.pending and not self.buf.closed:
            self.buf.mark_closed()

    @rule()
    def guest_sends(self) -> None:
        msg = self.rx.next_message()
        if msg is None:
            return
        if msg.eof:
            assert self.buf.closed and bytes(self.written) == bytes(self.queued)
        else:
            self.told_limit = max(self.told_limit, msg.offset + msg.window)
        self.to_host.append(msg)

    @precondition(lambda self: self.to_host)
    @rule()
    def host_receives(self) -> None:
        for event in self.tx.receive(self.to_host.popleft()):
            if isinstance(event, s.EofAcked):
                self.eof_acked_events += 1
                assert event.offset == len(self.queued) == len(self.written)

    @precondition(lambda self: not self.tx.eof_acked)
    @rule()
    def reconnect(self) -> None:
        self._connect()

    @invariant()
    def bounded(self) -> None:
        if not hasattr(self, "buf"):
            return
        assert self.buf.pending <= self.buf.window
        assert self.tx.acked <= self.buf.received
        assert self.eof_acked_events <= 1
        assert self.tx.eof_acked == (self.eof_acked_events == 1)

    def teardown(self) -> None:
        if not hasattr(self, "buf"):
            return
        self.tx.send_eof()
        for _ in range(10_000):
            if self.tx.eof_acked:
                break
            self.guest_sends()
            while self.to_host:
                self.host_receives()
            self.host_sends()
            while self.to_guest:
                self.guest_receives()
            self.guest_writes_into_the_process(1 << 20)
        assert self.tx.eof_acked and self.buf.closed and self.eof_acked_events == 1
        assert bytes(self.written) == bytes(self.queued)


TestInputSession = InputMachine.TestCase
TestInputSession.settings = SETTINGS


# --- peers that break the rules -------------------------------------------------------------

def test_output_receiver_rejects_gaps_overruns_and_data_after_eof() -> None:
    rx = s.OutputReceiver("c1", "", 1, window=8)
    rx.open()
    with pytest.raises(s.StdioProtocolError, match="expected 0"):
        rx.receive(spb.OutputServer(offset=3, data=b"x"))
    with pytest.raises(s.StdioProtocolError, match="beyond the window"):
        rx.receive(spb.OutputServer(offset=0, data=b"x" * 9))
    rx.receive(spb.OutputServer(offset=0, data=b"abc"))
    rx.receive(spb.OutputServer(offset=3, eof=True))
    with pytest.raises(s.StdioProtocolError, match="data after EOF"):
        rx.receive(spb.OutputServer(offset=3, data=b"d"))
    with pytest.raises(s.StdioProtocolError, match="without EOF"):
        rx.end_of_session()


def test_output_resume_before_the_acked_offset_is_data_loss() -> None:
    buf = s.OutputBuffer()
    buf.append(b"abcdef")
    s.OutputSender(buf, 4, 10)
    with pytest.raises(s.StdioProtocolError) as e:
        s.OutputSender(buf, 2, 10)
    assert e.value.data_loss
    with pytest.raises(s.StdioProtocolError) as e:
        s.OutputSender(buf, 7, 10)
    assert not e.value.data_loss


def test_output_eof_is_final_only_once_acked() -> None:
    buf = s.OutputBuffer()
    buf.append(b"ab")
    buf.finish()
    tx = s.OutputSender(buf, 0, 10)
    with pytest.raises(s.StdioProtocolError, match="before the EOF was sent"):
        tx.receive(spb.OutputAck(offset=2, window=10, eof=True))
    assert tx.next_message().to_proto() == spb.OutputServer(offset=0, data=b"ab")
    assert tx.next_message().to_proto() == spb.OutputServer(offset=2, eof=True)
    assert tx.next_message() is None and not buf.eof_acked
    assert tx.receive(spb.OutputAck(offset=2, window=10, eof=True)) == [s.EofAcked(2)]
    assert buf.eof_acked and tx.done


def test_input_buffer_rejects_gaps_overruns_and_data_after_eof() -> None:
    buf = s.InputBuffer(window=4)
    with pytest.raises(s.StdioProtocolError) as e:
        buf.accept(spb.InputData(offset=2, data=b"x"))
    assert e.value.data_loss
    with pytest.raises(s.StdioProtocolError, match="window"):
        buf.accept(spb.InputData(offset=0, data=b"12345"))
    assert buf.accept(spb.InputData(offset=0, data=b"ab", eof=True)) == [s.Data(0, b"ab"), s.EndOfStream(2)]
    assert buf.accept(spb.InputData(offset=1, data=b"b")) == []    # a resent byte is skipped
    with pytest.raises(s.StdioProtocolError, match="after EOF"):
        buf.accept(spb.InputData(offset=2, data=b"c"))


def test_input_sender_rejects_a_guest_that_lies() -> None:
    tx = s.InputSender("c1")
    tx.open()
    tx.send_data(b"abc")
    with pytest.raises(s.StdioProtocolError, match="acknowledged 10 bytes"):
        tx.receive(spb.InputServer(offset=10, window=4))
    tx.receive(spb.InputServer(offset=0, window=4))
    with pytest.raises(s.StdioProtocolError, match="window"):
        tx.receive(spb.InputServer(offset=0, window=s.MAX_WINDOW + 1))
    with pytest.raises(s.StdioProtocolError, match="before we sent it"):
        tx.receive(spb.InputServer(offset=0, window=4, eof=True))
    assert tx.next_message() == spb.InputClient(data=spb.InputData(offset=0, data=b"abc"))
    tx.receive(spb.InputServer(offset=3, window=4))
    with pytest.raises(s.StdioProtocolError, match="went back"):
        tx.receive(spb.InputServer(offset=1, window=4))


def test_a_broken_stdin_drops_data_but_keeps_granting() -> None:
    buf = s.InputBuffer(window=4)
    rx = s.InputReceiver(buf)
    assert rx.next_message() == spb.InputServer(offset=0, window=4)
    buf.accept(spb.InputData(offset=0, data=b"abcd"))
    buf.mark_broken()
    assert buf.pending == 0
    assert rx.next_message() == spb.InputServer(offset=4, window=4)
    buf.accept(spb.InputData(offset=4, data=b"efgh"))
    assert buf.pending == 0 and rx.next_message() == spb.InputServer(offset=8, window=4)


# --- the guest's buffer keeps reads as they came; messages go out in wire-form pieces ------

@given(st.lists(st.binary(min_size=0, max_size=20_000), max_size=12),
       st.lists(st.integers(0, 30_000), max_size=12), st.integers(0, 2 ** 40))
def test_output_buffer_views_and_acks_match_a_flat_copy(reads, acks, base) -> None:
    buf = s.OutputBuffer(capacity=1 << 30)
    flat = bytearray()
    for i, data in enumerate(reads):
        buf.append(data)
        flat += data
        if i < len(acks):
            to = min(buf.acked + acks[i], buf.produced)
            buf.ack(to)
        assert buf.read(buf.acked, buf.produced - buf.acked) == bytes(flat[buf.acked:])
        assert buf.room == buf.capacity - (buf.produced - buf.acked)
        # any window of what is held, in pieces that join to the same bytes
        mid = (buf.acked + buf.produced) // 2
        assert b"".join(buf.views(mid, 7_000)) == bytes(flat[mid:mid + 7_000])
        chunk = s.OutputChunk(base + mid, buf.views(mid, 7_000))
        assert spb.OutputServer.FromString(b"".join(chunk.encode())) == chunk.to_proto()


def test_output_buffer_gathers_small_reads_and_keeps_big_ones_as_they_came() -> None:
    buf = s.OutputBuffer(capacity=1 << 20)
    big = b"b" * (64 << 10)
    for _ in range(5000):
        buf.append(b"x")
    buf.append(big)
    assert len(buf._chunks) == 2                   # 5000 one-byte reads: one bytearray
    views = buf.views(5000, len(big))
    assert len(views) == 1 and views[0].obj is big  # a view of the read itself: no copy
    buf.append(b"y")                               # the tail may grow: what was sent is a copy
    assert buf.read(4999, 2) == b"xb"


def test_output_chunk_encodes_eof_and_offset_zero_like_protobuf() -> None:
    for chunk in (s.OutputChunk(0, [], eof=True), s.OutputChunk(300, [], eof=True),
                  s.OutputChunk(0, [b"a", memoryview(b"bc")]), s.OutputChunk(2 ** 63, [b"z" * 200])):
        assert spb.OutputServer.FromString(b"".join(chunk.encode())) == chunk.to_proto()
