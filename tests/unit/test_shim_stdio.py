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
