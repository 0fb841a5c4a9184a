"""Bounded host copies of what the guest, QEMU and virtiofsd write: the VM's log files.

The guest writes its serial console as fast as it likes, and QEMU and virtiofsd log errors the
guest can provoke (a bad virtio descriptor, a failing file operation). Their files live under
/run/spinbox, a tmpfs: host memory. So none of them writes a file itself: each writes into a
socket or pipe that the shim reads (`FdReader`, on the event loop), and the shim keeps a
`RotatingFile`, the newest bytes in at most `max_bytes` on disk: `<name>` and the previous
half in `<name>.1`. A reader that falls behind makes QEMU's serial retry and then drop bytes
(the guest's problem), never the host grow.

File-size rlimits are no fit: QEMU also writes the RAM and state files of VM templates, and
virtiofsd writes the guest's files, both far beyond any log's size.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

READ_CHUNK = 64 << 10          # one read per readiness callback: the loop stays fair
QEMU_LOG_MAX_BYTES = 1 << 20
VIRTIOFSD_LOG_MAX_BYTES = 1 << 20
MIN_MAX_BYTES = 2 * READ_CHUNK


def rotated(path: Path) -> Path:
    """The older half of a rotating log."""
    return path.with_name(path.name + ".1")


class RotatingFile:
    """Appends to `path`; when it holds `max_bytes // 2`, it becomes `path.1` (replacing the
    one before) and `path` starts again: at most `max_bytes` on disk, the newest kept."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"a rotating log needs max_bytes >= {MIN_MAX_BYTES} (got {max_bytes})")
        self.path = path
        self.half = max_bytes // 2
        rotated(path).unlink(missing_ok=True)        # an earlier VM's, in this dir
        self._fd: int | None = self._open()
        self._size = 0
        self.written = 0                              # bytes, since the start
        self.rotations = 0

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view and self._fd is not None:
            if self._size >= self.half:
                self._rotate()
                continue
            part = view[:self.half - self._size]
            try:
                n = os.write(self._fd, part)
            except OSError as e:           # ENOSPC: the copy stops, the VM goes on
                log.warning("%s: writing the log failed (%s); not writing it any more", self.path, e)
                self.close()
                return
            self._size += n
            self.written += n
            view = view[n:]

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        try:
            os.replace(self.path, rotated(self.path))
            self._fd = self._open()
        except OSError as e:
            log.warning("%s: rotating the log failed (%s); not writing it any more", self.path, e)
            return
        self._size = 0
        self.rotations += 1

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def tail_bytes(path: Path, max_bytes: int = 16384) -> bytes:
    """The last `max_bytes` of a rotating log (`path.1` then `path`); b"" if there is none."""
    out = b""
    for p in (path, rotated(path)):
        try:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - (max_bytes - len(out))))
                out = f.read() + out
        except OSError:
            continue
        if len(out) >= max_bytes:
            break
    return out


def tail_lines(path: Path, n: int = 20, max_bytes: int = 16384) -> list[str]:
    data = tail_bytes(path, max_bytes)
    return [ln.decode(errors="replace").rstrip("\r") for ln in data.splitlines()[-n:]]


class FdReader:
    """Reads a non-blocking fd on the event loop and hands each chunk to `on_data`; at EOF (the
    writer is gone) or a read error the fd is closed and `on_eof` runs. The fd is ours."""

    def __init__(self, fd: int, on_data: Callable[[bytes], object], *,
                 on_eof: Callable[[], None] | None = None) -> None:
        self.fd: int | None = fd
        self._on_data = on_data
        self._on_eof = on_eof
        self.eof = asyncio.Event()
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def _read_once(self) -> bool:
        """One read; False when nothing more is there now (or ever)."""
        if self.fd is None:
            return False
        try:
            data = os.read(self.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            self.close()
            return False
        self._on_data(data)
        return True

    def _readable(self) -> None:
        self._read_once()

    def read_available(self, limit: int = 16) -> None:
        """Read what is there now (at most `limit` chunks), without waiting for the loop."""
        for _ in range(limit):
            if not self._read_once():
                return

    async def wait_eof(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.eof.wait(), timeout)
        return self.eof.is_set()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        self._loop.remove_reader(fd)
        os.close(fd)
        self.eof.set()
        if self._on_eof is not None:
            self._on_eof()


class ChildOutput:
    """A child process's stdout+stderr into a `RotatingFile` at `path`: pass `child_fd` to the
    child, then `started()` (closes our copy, so its exit is our EOF)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.file = RotatingFile(path, max_bytes)
        r, self.child_fd = os.pipe2(os.O_CLOEXEC)
        self.reader = FdReader(r, self.file.write, on_eof=self.file.close)

    def started(self) -> None:
        # once only: close() calls this again, and by then the fd number may belong to
        # something else (seen: containerd's connection, accepted after a restart)
        fd, self.child_fd = self.child_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def tail(self, n: int = 20) -> list[str]:
        self.reader.read_available()
        return tail_lines(self.path, n)

    async def wait_eof(self, timeout: float) -> bool:
        return await self.reader.wait_eof(timeout)

    def close(self) -> None:
        """Read what is left, then stop (the file stays)."""
        self.started()
        self.reader.read_available()
        self.reader.close()
