"""The VM's bounded log files (shim/vm/logsink.py) and the console lines (shim/vm/console.py):
whatever the guest, QEMU or virtiofsd write, the files on the host stay within their cap, the
newest output is kept, and the console keeps its lines and marks."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
import tracemalloc

import pytest

from spinbox.shim.vm.config import VMConfig, VMConfigError
from spinbox.shim.vm.console import ConsoleLog
from spinbox.shim.vm.logsink import ChildOutput, FdReader, RotatingFile, rotated, tail_bytes, tail_lines

pytestmark = pytest.mark.timeout(60)
CAP = 256 << 10


def on_disk(path) -> int:
    return sum(p.stat().st_size for p in (path, rotated(path)) if p.exists())


def test_a_rotating_file_keeps_the_newest_bytes_within_its_cap(tmp_path):
    path = tmp_path / "console.log"
    f = RotatingFile(path, CAP)
    data = b"".join(b"line %07d\n" % i for i in range(200_000))     # 2.4 MB
    for i in range(0, len(data), 10_000):
        f.write(data[i:i + 10_000])
        assert on_disk(path) <= CAP
    f.close()
    assert f.written == len(data) and f.rotations > 0
    kept = rotated(path).read_bytes() + path.read_bytes()
    assert CAP // 2 <= len(kept) <= CAP
    assert data.endswith(kept)                                 # the newest, in order, nothing lost
    assert tail_bytes(path, 1000) == data[-1000:]
    assert tail_bytes(path, 2 * CAP) == kept                    # across both halves
    assert tail_lines(path, 2) == ["line 0199998", "line 0199999"]


def test_a_new_rotating_file_starts_empty(tmp_path):
    path = tmp_path / "q.log"
    path.write_bytes(b"old")
    rotated(path).write_bytes(b"older")
    RotatingFile(path, CAP).close()
    assert path.read_bytes() == b"" and not rotated(path).exists()
    with pytest.raises(ValueError):
        RotatingFile(path, 1000)


def test_console_lines_and_file_under_a_flood_of_short_lines(tmp_path):
    path = tmp_path / "console.log"
    con = ConsoleLog(0.0, keep=100, file=RotatingFile(path, CAP))
    con.feed(b"vminitd: ready in 1.00s\n")
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        for _ in range(200):
            con.feed(b"\n" * 65536)                              # 13 M lines, 13 MB
        took = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    con.feed(b"last line\npartial")
    assert con.line_count == 1 + 200 * 65536 + 1
    assert [ln.text for ln in con.lines()][-2:] == ["", "last line"]
    assert con.lines()[-1].index == con.line_count - 1
    assert len(con.lines()) == 100
    assert con.tail(2) == ["last line", "partial"]
    assert on_disk(path) <= CAP
    assert took < 5.0, f"13 M console lines took {took:.1f} s"
    assert peak < 2 << 20, peak


async def test_fd_reader_takes_everything_and_ends_at_eof():
    ours, theirs = socket.socketpair()
    got = bytearray()
    ended = []
    reader = FdReader(ours.detach(), got.extend, on_eof=lambda: ended.append(True))
    payload = os.urandom(1 << 20)

    def write() -> None:
        theirs.sendall(payload)
        theirs.close()

    await asyncio.gather(asyncio.to_thread(write), reader.wait_eof(10))
    assert await reader.wait_eof(5)
    assert bytes(got) == payload and ended == [True] and reader.fd is None
    reader.close()                                               # idempotent


async def test_a_child_writing_without_end_gets_a_bounded_file(tmp_path):
    path = tmp_path / "qemu.log"
    out = ChildOutput(path, CAP)
    # 8 MiB of "qemu: warning" lines, as a guest-provoked error flood would make
    script = "import sys\nfor i in range(200000): sys.stderr.write('qemu: warning: bogus descriptor %08d\\n' % i)\n"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=out.child_fd, stderr=asyncio.subprocess.STDOUT)
    out.started()
    assert await proc.wait() == 0
    assert await out.wait_eof(10)
    assert on_disk(path) <= CAP
    assert out.file.written > 7 << 20
    assert out.tail(1) == ["qemu: warning: bogus descriptor 00199999"]
    out.close()


def test_the_console_cap_is_a_validated_vm_config_key(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"x")
    assert VMConfig(kernel=k).validate().console_log_max_bytes == 4 << 20
    assert VMConfig.from_dict({"kernel": str(k), "console_log_max_bytes": 1 << 20}).console_log_max_bytes == 1 << 20
    for bad in (0, 1000, 2 << 30, "4M", True):
        with pytest.raises(VMConfigError, match="console_log_max_bytes"):
            VMConfig(kernel=k, console_log_max_bytes=bad).validate()


async def test_close_after_started_does_not_close_a_reused_fd_number(tmp_path):
    # started() closed our copy of the child's end; the number can be reused at once (an
    # accepted connection): close() must not close it a second time
    out = ChildOutput(tmp_path / "child.log", CAP)
    number = out.child_fd
    out.started()
    r, w = os.pipe()
    try:
        reused = r if r == number else w if w == number else None
        assert reused is not None, f"the lowest free fd {number} was reused by the pipe ({r}, {w})"
        out.close()
        os.fstat(reused)                     # still open: it is not the sink's any more
    finally:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)
