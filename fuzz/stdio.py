"""Target `stdio`: both ends of the stdio stream protocol (api/stdio_session.py) fed a hostile
peer, and the shim's `OutputStream` (shim/agent/streams.py) over a real connection.

Each input is one of:

* host output receiver (`OutputReceiver`, what the shim runs for stdout/stderr) against a
  hostile guest: chunks at the wrong offset (duplicates, gaps, back), beyond the window, over
  the chunk limit, empty, EOF twice, data after EOF, EOF carrying data; the consumer takes
  bytes at random and the acks go out as the session says;
* host input sender (`InputSender`, stdin) against a guest whose acks lie: offsets back or
  beyond what was sent, windows of 0 or over the limit, EOF acks before the EOF;
* guest output sender (`OutputSender`, vminitd) against a hostile host's acks, and guest input
  buffer (`InputBuffer`/`InputReceiver`) against a hostile host's stdin data;
* the shim's `OutputStream` reading from a scripted guest (fuzz/guest.py) that sends the same
  hostile chunks as ttrpc DATA frames, then an error status, a hang-up or nothing;
* the shim's `InputStream` writing to a scripted guest whose acks lie (offsets, windows over
  the limit, early EOF acks), which then ends the stream or goes quiet;
* `shim.stdio.fifo_path` on hostile stdio URIs.

Invariants: bytes held (received, not consumed) never exceed the window granted; data goes
out only inside the credit granted; delivered bytes are exactly the contiguous stream the
peer sent, never twice; an EOF is acknowledged only at the stream's end; a peer breaking a
rule gets `StdioProtocolError` (the shim's stream: our AgentError or a sanitised TTRPCError)
and nothing else; no read waits past its bound once the guest stopped.
"""
from __future__ import annotations

import asyncio
from typing import Any

import ttrpc
from ttrpc.frame import Flags, MessageType

from spinbox.api import stdio_session as ss
from spinbox.api._pb.spinbox.agent.v1 import stdio_pb2 as spb
from spinbox.shim import stdio as shim_stdio
from spinbox.shim.agent import AgentError
from spinbox.shim.errors import SpinboxError

from .data import Input
from .driver import AsyncHarness, Finding, Target
from .guest import GuestLink, next_request, response
from .replies import CODES, MESSAGES, check_error

WINDOWS = (1, 7, 4096, 65536, ss.DEFAULT_OUTPUT_WINDOW, ss.MAX_WINDOW)
SMALL_CHUNK = 8192                      # the receiver's chunk limit in the pure modes (cheap to pass)
READ_BOUND_S = 0.5
FRAME_WAIT_S = 0.002                    # the guest reads what the shim sent after an ack (on a unix
                                        # socket it is there at once; waiting longer only slows)
URIS = ("", "/run/x.fifo", "fifo:///run/x", "file:///var/log/x", "binary:///bin/logger", "fifo://",
        "file://", "://", "fifo://host/../../etc/passwd", "FILE:///x", "file:///a\0b", "relative",
        "http://example.com/x", "fifo:///" + "a" * 5000)


def _size(inp: Input, window: int) -> int:
    return inp.pick((0, 1, 2, 100, window - 1, window, window + 1, SMALL_CHUNK, SMALL_CHUNK + 1,
                     inp.below(3 * window + 2)))


def _offset(inp: Input, expected: int) -> int:
    return min(max(0, inp.pick((expected, expected, expected, expected - 1, expected + 1, 0,
                                expected - 4096, expected + 4096, (1 << 64) - 1))), (1 << 64) - 1)


# --- host output receiver ------------------------------------------------------------------

def output_receiver(inp: Input) -> None:
    window = inp.pick(WINDOWS[:4])
    rx = ss.OutputReceiver("c1", inp.pick(("", "e1")), inp.pick((1, 2)), window=window, max_chunk=SMALL_CHUNK)
    rx.open()
    sent = bytearray()            # what the guest sent at the offsets we accepted
    delivered = bytearray()
    held = bytearray()            # received, not yet consumed
    eof_sent_at: int | None = None
    for _ in range(inp.below(40) + 1):
        action = inp.below(8)
        if action <= 3:
            n = min(_size(inp, window), 3 * ss.MAX_CHUNK)
            eof = inp.chance(6)
            if eof:
                n = 0 if not inp.chance(4) else n
            msg = spb.OutputServer(offset=_offset(inp, rx.received), data=bytes([len(sent) & 0xFF]) * n, eof=eof)
            try:
                events = rx.receive(msg)
            except ss.StdioProtocolError:
                return             # the stream is dead: the shim fails it
            for ev in events:
                if isinstance(ev, ss.Data):
                    if ev.offset != len(delivered) + len(held):
                        raise Finding(f"data at {ev.offset}, expected {len(delivered) + len(held)}")
                    held += ev.data
                    sent += ev.data
                elif isinstance(ev, ss.EndOfStream):
                    if eof_sent_at is not None:
                        raise Finding("EOF reported twice")
                    eof_sent_at = ev.offset
            if len(held) > window:
                raise Finding(f"{len(held)} bytes held, window {window}")
        elif action <= 5 and held:
            n = inp.below(len(held)) + 1
            delivered += held[:n]
            del held[:n]
            rx.consumed(n)
        else:
            msg_out = rx.next_message()
            if msg_out is not None:
                ack = msg_out.ack
                if ack.offset > rx.offset:
                    raise Finding(f"ack at {ack.offset} beyond the {rx.offset} bytes consumed")
                if ack.eof and (eof_sent_at is None or ack.offset != eof_sent_at or held):
                    raise Finding(f"EOF acked at {ack.offset} (EOF at {eof_sent_at}, {len(held)} held)")
    if bytes(delivered + held) != bytes(sent):
        raise Finding("delivered bytes differ from the bytes accepted")


# --- host input sender ---------------------------------------------------------------------

def input_sender(inp: Input) -> None:
    tx = ss.InputSender("c1", "", chunk=inp.pick((1, 100, ss.INPUT_CHUNK)))
    tx.open()
    queued = 0
    limit: int | None = None        # offset + window the guest granted this session
    next_out: int | None = None
    for _ in range(inp.below(40) + 1):
        action = inp.below(6)
        if action == 0 and not tx.eof_requested:
            n = inp.below(5000)
            tx.send_data(b"x" * n)
            queued += n
        elif action == 1:
            tx.send_eof()
        elif action <= 3:
            top = next_out if next_out is not None else tx.end
            msg = spb.InputServer(offset=_offset(inp, inp.pick((tx.acked, top, tx.end))),
                                  window=inp.pick((0, 1, 4096, ss.INPUT_WINDOW, ss.MAX_WINDOW, ss.MAX_WINDOW + 1,
                                                   (1 << 32) - 1)),
                                  eof=inp.chance(6))
            try:
                tx.receive(msg)
            except ss.StdioProtocolError:
                return
            if not msg.eof:
                limit = max(limit or 0, msg.offset + msg.window)
                if next_out is None:
                    next_out = msg.offset
        else:
            out = tx.next_message()
            if out is None:
                continue
            d = out.data
            if limit is None or next_out is None:
                raise Finding("data sent before the guest told its position")
            if d.offset != next_out:
                raise Finding(f"data at {d.offset}, expected {next_out}")
            if d.offset + len(d.data) > limit:
                raise Finding(f"data up to {d.offset + len(d.data)} beyond the granted {limit}")
            next_out += len(d.data)
            if d.eof and (not tx.eof_requested or d.offset != tx.end):
                raise Finding("EOF sent before everything or unasked")
        if tx.buffered > queued or tx.end != queued:
            raise Finding(f"buffered {tx.buffered} / end {tx.end} for {queued} bytes queued")


# --- guest side: output sender and input buffer ----------------------------------------------

def output_sender(inp: Input) -> None:
    buf = ss.OutputBuffer(capacity=inp.pick((4096, ss.OUTPUT_CAPACITY)))
    for _ in range(inp.below(4)):
        buf.append(b"y" * min(buf.room, inp.below(20000)))
    offset, window = _offset(inp, 0), inp.pick((0, 1, 4096, (1 << 32) - 1))
    try:
        tx = ss.OutputSender(buf, offset, window, chunk=inp.pick((1, 1000, ss.OUTPUT_CHUNK)))
    except ss.StdioProtocolError:
        return
    limit = offset + ss.clamp_window(window)
    for _ in range(inp.below(30) + 1):
        action = inp.below(5)
        if action == 0 and not buf.eof:
            buf.append(b"z" * min(buf.room, inp.below(5000)))
        elif action == 1:
            buf.finish()
        elif action == 2:
            ack = spb.OutputAck(offset=_offset(inp, inp.pick((buf.acked, tx.sent, buf.produced))),
                                window=inp.pick((0, 1, 4096, (1 << 32) - 1)), eof=inp.chance(6))
            try:
                tx.receive(ack)
            except ss.StdioProtocolError:
                return
            if not ack.eof:
                limit = max(limit, ack.offset + ss.clamp_window(ack.window))
        else:
            chunk = tx.next_message()
            if chunk is not None and chunk.offset + len(chunk) > limit:
                raise Finding(f"guest chunk up to {chunk.offset + len(chunk)} beyond the granted {limit}")
        if buf.produced - buf.acked > buf.capacity:
            raise Finding(f"guest holds {buf.produced - buf.acked} bytes, capacity {buf.capacity}")


def input_buffer(inp: Input) -> None:
    window = inp.pick((1, 4096, ss.INPUT_WINDOW))
    buf = ss.InputBuffer(window)
    rx = ss.InputReceiver(buf)
    granted = 0
    for _ in range(inp.below(30) + 1):
        action = inp.below(5)
        if action <= 1:
            msg = spb.InputData(offset=_offset(inp, buf.received), data=b"i" * _size(inp, window),
                                eof=inp.chance(6))
            try:
                rx.receive(msg)
            except ss.StdioProtocolError:
                return
        elif action == 2:
            buf.wrote(min(buf.pending, inp.below(window + 1)))
        elif action == 3 and inp.chance(4):
            buf.mark_broken()
        else:
            out = rx.next_message()
            if out is not None and not out.eof:
                granted = max(granted, out.offset + out.window)
        if buf.pending > window:
            raise Finding(f"guest holds {buf.pending} stdin bytes, window {window}")
        if granted and buf.received > max(granted, buf.granted_limit):
            raise Finding(f"guest accepted {buf.received} bytes, granted {granted}")


# --- stdio URIs ------------------------------------------------------------------------------

def uris(inp: Input) -> None:
    uri = inp.pick(URIS) if inp.flag() else inp.blob(80).decode("utf-8", "replace")
    try:
        kind, path = shim_stdio.fifo_path(uri)
    except (ValueError, SpinboxError):
        return
    if kind not in ("fifo", "file"):
        raise Finding(f"{uri!r}: kind {kind!r}")


PURE = (output_receiver, output_receiver, input_sender, output_sender, input_buffer, uris)


# --- the shim's OutputStream and InputStream over a real connection ----------------------------

class StdioHarness(AsyncHarness):
    def __init__(self) -> None:
        super().__init__(time_bound_s=3.0)
        self.link: GuestLink | None = None

    async def run(self, inp: Input) -> None:
        mode = inp.below(9)
        if mode < 7:
            PURE[mode % len(PURE)](inp)
        elif mode == 7:
            await self._output_stream(inp)
        else:
            await self._input_stream(inp)

    async def _input_stream(self, inp: Input) -> None:
        """The shim's InputStream writing to a guest whose acks lie: what reaches the guest
        stays inside the credit the guest gave, in order; the writer ends once the guest did."""
        if self.link is None:
            self.link = GuestLink()
        agent, guest = await self.link.connect()
        stdin = agent.open_input("c1", inp.pick(("", "e1")))
        sizes = [inp.pick((1, 100, 5000, ss.INPUT_CHUNK + 1, 300_000)) for _ in range(inp.below(4))]
        eof = inp.flag() or not sizes          # something to do: the stream opens on first use

        async def write() -> None:
            try:
                for n in sizes:
                    await stdin.write(b"i" * n)
                if eof:
                    await stdin.close(timeout=READ_BOUND_S)
            except (AgentError, ttrpc.TTRPCError) as e:
                check_error(e, "input")
            except TimeoutError:
                pass             # the guest never acknowledged the EOF: close's own bound

        writer = asyncio.ensure_future(write())
        try:
            got = await next_request(guest)
            if got is None:
                raise Finding("the input stream was never opened")
            frame, _ = got
            sid = frame.stream_id
            limit = received = 0
            for i in range(inp.below(6) + 1):
                offset = _offset(inp, inp.pick((received, received, 0, limit)))
                if i == 0:
                    # A session starts where the guest says it is: bytes before it count as
                    # received in a lost session (the resume rule), so data starts there.
                    received = offset
                window = inp.pick((0, 1, 4096, ss.INPUT_WINDOW, ss.MAX_WINDOW, ss.MAX_WINDOW + 1, (1 << 32) - 1))
                ack = spb.InputServer(offset=offset, window=window, eof=inp.chance(8))
                guest.send(sid, MessageType.DATA, 0, ack.SerializeToString())
                await guest.drain()
                if offset <= received and window <= ss.MAX_WINDOW and not ack.eof:
                    limit = max(limit, offset + window)     # what an honest client may use
                while (f := await guest.next_frame(FRAME_WAIT_S)) is not None:
                    if f.type != MessageType.DATA or f.flags & Flags.NO_DATA:
                        continue
                    d = spb.InputClient.FromString(f.data).data
                    if d.offset != received:
                        raise Finding(f"stdin data at {d.offset}, {received} received")
                    received += len(d.data)
                    if received > limit:
                        raise Finding(f"stdin data up to {received} beyond the granted {limit}")
            end = inp.below(3)
            if end == 0:
                code = inp.pick(CODES)
                guest.send(sid, MessageType.RESPONSE, 0, response(code, inp.pick(MESSAGES) if code else "", b""))
            elif end == 1:
                guest.close()
            await guest.drain()
            if end != 2:
                try:
                    await asyncio.wait_for(asyncio.shield(writer), READ_BOUND_S * 2)
                except TimeoutError:
                    raise Finding("stdin writer still waiting after the guest ended the stream") from None
        finally:
            writer.cancel()
            try:
                await writer
            except asyncio.CancelledError:
                pass
            await stdin.aclose()
            await agent.close()
            guest.close()

    async def _output_stream(self, inp: Input) -> None:
        if self.link is None:
            self.link = GuestLink()
        agent, guest = await self.link.connect()
        window = inp.pick((1, 4096, 65536))
        out = agent.open_output("c1", "", 1, window=window)
        reader = asyncio.ensure_future(self._read_all(out, window))
        try:
            got = await next_request(guest)
            if got is None:
                raise Finding("the output stream was never opened")
            frame, req = got
            sid = frame.stream_id
            offset = 0
            for _ in range(inp.below(12)):
                n = min(_size(inp, window), 3 * ss.MAX_CHUNK)
                msg = spb.OutputServer(offset=_offset(inp, offset), data=b"o" * n, eof=inp.chance(8))
                guest.send(sid, MessageType.DATA, 0, msg.SerializeToString())
                if msg.offset == offset and not msg.eof:
                    offset += n
            end = inp.below(4)
            if end == 0:
                code = inp.pick(CODES)
                guest.send(sid, MessageType.RESPONSE, 0, response(code, inp.pick(MESSAGES) if code else "", b""))
            elif end == 1:
                guest.close()
            elif end == 2:
                guest.send(sid, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"")
            await guest.drain()
            if end != 3:                       # the guest ended the stream: reads must end
                try:
                    await asyncio.wait_for(asyncio.shield(reader), READ_BOUND_S * 2)
                except TimeoutError:
                    raise Finding("output stream still reading after the guest ended it") from None
        finally:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass
            await out.aclose()
            await agent.close()
            guest.close()

    @staticmethod
    async def _read_all(out: Any, window: int) -> None:
        try:
            while True:
                data = await out.read()
                if data is None:
                    return
                if len(out._pending) + len(data) > window:
                    raise Finding(f"the stream held {len(out._pending) + len(data)} bytes, window {window}")
                if set(data) - {ord("o")}:
                    raise Finding("bytes the guest never sent")
        except (AgentError, ttrpc.TTRPCError) as e:
            check_error(e, "output")

    def close(self) -> None:
        if self.link is not None:
            self.loop.run_until_complete(self.link.close())
        super().close()


def seeds() -> list[bytes]:
    return [b"", bytes(range(64)), bytes([0]) + bytes(range(1, 80, 3)), bytes([1]) + b"\x00\x01\x02" * 20,
            bytes([2]) + b"\x03\x00\x02\x05" * 15, bytes([3]) + b"\x00\x03\x04" * 20, bytes([4]) + b"\x01\x00" * 30,
            bytes([5, 1, 3]), bytes([7]) + b"\x01\x00\x02\x00\x00" * 12, bytes([7, 0, 2, 0]) + b"\x00" * 40]


TARGET = Target("stdio", "the stdio stream protocol's four roles against a hostile peer, the shim's "
                "OutputStream and InputStream over a real connection, and stdio URIs",
                StdioHarness, seeds, weight=5.0, time_bound_s=3.0, memory_bound_mb=64)
