"""shim/stdio.py ProcessIO against real FIFOs (no guest: a scripted output stream)."""
from __future__ import annotations

import asyncio
import os

from spinbox.shim.stdio import ProcessIO


class Scripted:
    """An OutputStream that yields fixed chunks, then the end."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def read(self) -> bytes | None:
        return self.chunks.pop(0) if self.chunks else None

    async def consumed(self, n: int) -> None:
        pass

    async def close(self) -> None:
        pass


def test_fifo_reader_sees_eof_when_the_guest_stream_ends_before_delete(tmp_path):
    """CRI's ExecSync reads stdout/stderr to EOF before it deletes the exec: the shim must
    close its write ends when the output ends, not only at Delete (io.close())."""
    out, err = tmp_path / "out", tmp_path / "err"
    os.mkfifo(out)
    os.mkfifo(err)

    async def main() -> tuple[bytes, bytes, int]:
        rd_out = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        rd_err = os.open(err, os.O_RDONLY | os.O_NONBLOCK)
        io = ProcessIO("exec1")
        io.open_fifos("", str(out), str(err), terminal=False)
        io.start_output("stdout", Scripted([b"hello ", b"world\n"]))
        io.start_output("stderr", Scripted([b"oops\n"]))
        assert await io.drained(5)
        got = {}
        loop = asyncio.get_running_loop()
        for name, fd in (("out", rd_out), ("err", rd_err)):
            data, deadline = b"", loop.time() + 3
            while True:                       # until EOF (b""), or give up: no EOF came
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    assert loop.time() < deadline, f"no EOF on {name} after {data!r}"
                    await asyncio.sleep(0.01)
                    continue
                if not chunk:
                    break
                data += chunk
            got[name] = data
            os.close(fd)
        left = len(io.fds)
        await io.close()
        return got["out"], got["err"], left

    stdout, stderr, left = asyncio.run(asyncio.wait_for(main(), 10))
    assert (stdout, stderr) == (b"hello world\n", b"oops\n")
    assert left == 0, "both write ends were closed when their streams ended"


class Lying(Scripted):
    """A guest stream that hands over a chunk bigger than a pipe, then turns out to have broken
    the stream's contract (as shim.agent.streams.OutputStream reports with `refused()`)."""

    def __init__(self, chunk: bytes, after: float) -> None:
        super().__init__([chunk, chunk])
        self.after = after

    async def refused(self) -> BaseException:
        from spinbox.shim.agent.errors import AgentProtocolError
        await asyncio.sleep(self.after)
        return AgentProtocolError("guest agent protocol violation: chunk beyond the window")


def test_a_guest_that_breaks_the_stream_contract_does_not_hold_the_exit_on_an_unread_fifo(tmp_path, caplog):
    """Nobody reads the FIFO (a detached ctr is gone): the pump waits on it with a 1 MiB
    chunk. When the guest is found lying (data beyond its window), the stream ends at once:
    the exit path's drain returns instead of waiting out its bound (30 s in the shim)."""
    out = tmp_path / "out"
    os.mkfifo(out)

    async def main() -> tuple[bool, float, int]:
        io = ProcessIO("init")
        io.open_fifos("", str(out), "", terminal=False)
        io.start_output("stdout", Lying(b"x" * (1 << 20), after=0.2))
        t0 = asyncio.get_running_loop().time()
        drained = await io.drained(5)
        took = asyncio.get_running_loop().time() - t0
        left = len(io.fds)
        await io.close()
        return drained, took, left

    drained, took, left = asyncio.run(main())
    assert drained and took < 2, took
    assert left == 0                      # the write end is closed: a late reader sees EOF
    assert "output stream failed: guest agent protocol violation" in caplog.text


def test_an_honest_stream_on_an_unread_fifo_is_still_waited_for(tmp_path):
    """Without a lie, output nobody reads yet is kept waiting (bounded by the exit path's
    drain timeout), never dropped."""
    out = tmp_path / "out"
    os.mkfifo(out)

    async def main() -> bool:
        io = ProcessIO("init")
        io.open_fifos("", str(out), "", terminal=False)
        io.start_output("stdout", Scripted([b"x" * (1 << 20)]))
        drained = await io.drained(0.5)
        await io.close()
        return drained

    assert asyncio.run(main()) is False
