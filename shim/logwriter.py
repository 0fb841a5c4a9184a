"""The daemon's log handler: never blocks the event loop on the log's reader.

The shim logs into containerd's `<bundle>/log` FIFO, which containerd drains at its own pace (or
not at all while it restarts). A blocking write from the event loop would stall every RPC and
the guest's streams behind one slow reader. So a record is formatted by the caller, queued in
memory (bounded in bytes), and written by one thread, which is the only one that waits on the
fd. When the queue is full the record is dropped and counted; the count goes out as a line of
its own once there is room again, so a gap in the log says how big it is.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time

MAX_QUEUED_BYTES = 4 << 20     # log text waiting for the reader, at most
MAX_LINE_BYTES = 16 << 10      # one record, cut beyond (a guest-supplied string can be long)
WRITE_BATCH_BYTES = 256 << 10  # one write(2) at most this much


class NonBlockingHandler(logging.Handler):
    """`emit` queues and returns at once; a writer thread writes the queue to `fd`."""

    def __init__(self, fd: int, *, max_queued_bytes: int = MAX_QUEUED_BYTES,
                 level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.fd = fd
        self.max_queued_bytes = max_queued_bytes
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closing = False
        self.dropped = 0           # records dropped (queue full), since the start
        self._dropped_unreported = 0
        self.write_errors = 0
        self._thread = threading.Thread(target=self._write_loop, name="spinbox-log-writer", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread, the event loop included) --------------------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
        except Exception:
            self.handleError(record)
            return
        if len(data) > MAX_LINE_BYTES:
            data = data[:MAX_LINE_BYTES - 5] + b" ...\n"
        with self._cond:
            if self._closing or self._queued + len(data) > self.max_queued_bytes:
                self.dropped += 1
                self._dropped_unreported += 1
                return
            self._queue.append(data)
            self._queued += len(data)
            self._cond.notify()

    @property
    def queued_bytes(self) -> int:
        return self._queued

    # -- the writer thread ----------------------------------------------------------------
    def _take(self) -> bytes | None:
        """The next batch to write (None: closing and nothing left)."""
        with self._cond:
            while not self._queue and not self._dropped_unreported and not self._closing:
                self._cond.wait()
            parts: list[bytes] = []
            size = 0
            while self._queue and size < WRITE_BATCH_BYTES:
                part = self._queue.popleft()
                self._queued -= len(part)
                parts.append(part)
                size += len(part)
            if self._dropped_unreported:
                parts.append(f"spinbox-shim: {self._dropped_unreported} log lines dropped "
                             "(the log's reader was too slow)\n".encode())
                self._dropped_unreported = 0
            if not parts:
                return None
            return b"".join(parts)

    def _write_loop(self) -> None:
        while True:
            data = self._take()
            if data is None:
                return
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except InterruptedError:
                    continue
                except OSError:
                    self.write_errors += 1      # a gone reader: nothing to tell it
                    break
                view = view[n:]

    # -- shutdown ---------------------------------------------------------------------------
    def flush(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until what is queued was written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._queue:
                    return
            time.sleep(0.01)

    def close(self) -> None:
        """Write what is queued (bounded: the reader may never come), then stop the thread."""
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(1.0)
        super().close()
