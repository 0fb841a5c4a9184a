"""An asyncio write transport for one fd that never copies or shifts what it was given.

asyncio's pipe transport keeps unwritten data in one bytearray: a short write copies the rest in
and every later write deletes the written head (a memmove of everything behind it). A
virtio-serial port takes at most 32 KiB per write(2), so one 256 KiB frame cost about four times
its size in memmoves before the kernel copied it once; under TCG emulation in the guest, memory
bandwidth is what stdio throughput is made of. This transport queues the caller's buffers as
memoryviews and writes slices of them: the kernel's copy is the only one.

The caller hands over its buffers: they must not change until written (bytes always qualify).
Flow control is asyncio's (pause_writing above the high-water mark, so StreamWriter.drain waits).
"""
from __future__ import annotations

import asyncio
import collections
import os
from typing import Any

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024


class FdWriteTransport(asyncio.WriteTransport):
    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._pending: collections.deque[memoryview] = collections.deque()
        self._size = 0
        self._closing = False
        self._closed = False
        self._writer_added = False
        self._paused = False
        self._high, self._low = HIGH_WATER, LOW_WATER
        os.set_blocking(fd, False)
        loop.call_soon(protocol.connection_made, self)

    # -- asyncio.WriteTransport -------------------------------------------------------------

    def write(self, data: Any) -> None:
        if self._closing:
            raise RuntimeError("write on a closing transport")
        view = memoryview(data).cast("B")
        if not view:
            return
        if not self._pending:
            try:
                n = os.write(self._fd, view)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if n == len(view):
                return
            view = view[n:]
        self._pending.append(view)
        self._size += len(view)
        if not self._writer_added:
            self._loop.add_writer(self._fd, self._write_ready)
            self._writer_added = True
        self._maybe_pause()

    def _write_ready(self) -> None:
        while self._pending:
            view = self._pending[0]
            try:
                n = os.write(self._fd, view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fatal(exc)
                return
            self._size -= n
            if n == len(view):
                self._pending.popleft()
            else:
                self._pending[0] = view[n:]
                break   # short write: the fd is full for now
        if not self._pending:
            self._remove_writer()
            if self._closing:
                self._finish(None)
                return
        self._maybe_resume()

    def get_write_buffer_size(self) -> int:
        return self._size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = HIGH_WATER if high is None else high
        self._low = self._high // 4 if low is None else low
        self._maybe_pause()

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._pending:
            self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        self._finish(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._fd if name == "fd" else default

    # -- internals --------------------------------------------------------------------------

    def _maybe_pause(self) -> None:
        if not self._paused and self._size > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def _maybe_resume(self) -> None:
        if self._paused and self._size <= self._low:
            self._paused = False
            self._protocol.resume_writing()

    def _remove_writer(self) -> None:
        if self._writer_added:
            self._loop.remove_writer(self._fd)
            self._writer_added = False

    def _fatal(self, exc: OSError) -> None:
        # EPIPE/EIO: the other side is gone; drain() and later writes say so.
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._remove_writer()
        self._pending.clear()
        self._size = 0
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._protocol.connection_lost(exc)
