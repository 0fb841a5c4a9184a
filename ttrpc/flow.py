"""Credit-based flow control for one direction of a bidi stream.

TTRPC has no flow control of its own, and the receive buffers are bounded, so a producer that
outruns its consumer would fail its stream. With credits it cannot: the sender holds a
`SendWindow` and awaits credits before sending; the receiver holds a `ReceiveWindow`, counts
what it has consumed and tells the application when to send a grant. The grant itself is an
application message on the reverse direction of the same bidi stream (the library does not
define it), so a consumer that stops reading stops only its own stream.

Both relative grants (`grant(n)`) and absolute positions (`update(acked_offset, window)`, as in
an ack carrying "consumed up to X, window W") are supported.
"""
from __future__ import annotations

import asyncio
import collections

from .status import Cancelled, ResourceExhausted


class FlowControlError(ResourceExhausted):
    """The peer sent more than the window it was granted."""


class SendWindow:
    """Credits the sender may still spend. `offset` counts every byte acquired so far."""

    def __init__(self, initial: int = 0) -> None:
        if initial < 0:
            raise ValueError("ttrpc: initial window must be >= 0")
        self.offset = 0  # bytes acquired (sent) so far
        self.limit = initial  # may send while offset < limit
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._error: BaseException | None = None

    @property
    def available(self) -> int:
        return max(0, self.limit - self.offset)

    @property
    def closed(self) -> bool:
        return self._error is not None

    def grant(self, n: int) -> None:
        """Relative grant: the receiver consumed `n` more bytes."""
        if n < 0:
            raise ValueError("ttrpc: negative credit grant")
        self.limit += n
        self._wake()

    def update(self, acked_offset: int, window: int) -> None:
        """Absolute form: the receiver consumed everything before `acked_offset` and accepts
        `window` bytes beyond it. A stale (smaller) limit never takes credits back."""
        new_limit = acked_offset + window
        if new_limit > self.limit:
            self.limit = new_limit
            self._wake()

    async def acquire(self, n: int, *, partial: bool = False) -> int:
        """Wait for credits and spend them. Without `partial`, waits for all `n` (n must not
        exceed what the receiver can ever grant, or this waits forever); with `partial`, waits
        for at least one byte and returns min(n, available). Raises what close() was given."""
        if n <= 0:
            return 0
        while True:
            if self._error is not None:
                raise self._error
            avail = self.available
            if avail >= n or (partial and avail > 0):
                take = min(n, avail)
                self.offset += take
                return take
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def close(self, error: BaseException | None = None) -> None:
        """The stream is over: current and future acquire() calls raise `error`."""
        if self._error is None:
            self._error = error if error is not None else Cancelled("ttrpc: flow window closed")
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)


class ReceiveWindow:
    """The receiver's accounting: bytes in flight must stay within the window it granted.

    received(n) when a message arrives (raises FlowControlError if the peer overran);
    consumed(n) when the application has really used the bytes (written them to a FIFO, ...):
    returns how many credits to grant now (0 until `threshold` bytes accumulated, so grants
    are batched rather than one per message)."""

    def __init__(self, window: int, *, threshold: int | None = None) -> None:
        if window <= 0:
            raise ValueError("ttrpc: window must be > 0")
        self.window = window
        self.threshold = max(1, window // 2 if threshold is None else threshold)
        self.received_offset = 0  # bytes that arrived
        self.offset = 0  # bytes consumed
        self._granted_limit = window  # peer may send up to here
        self._pending_grant = 0

    @property
    def in_flight(self) -> int:
        """Received but not yet consumed."""
        return self.received_offset - self.offset

    @property
    def granted_limit(self) -> int:
        return self._granted_limit

    def received(self, n: int) -> None:
        if self.received_offset + n > self._granted_limit:
            raise FlowControlError(
                f"ttrpc: peer sent {self.received_offset + n - self._granted_limit} bytes beyond "
                f"its window (limit {self._granted_limit})")
        self.received_offset += n

    def consumed(self, n: int) -> int:
        if n < 0 or self.offset + n > self.received_offset:
            raise ValueError("ttrpc: consumed more than was received")
        self.offset += n
        self._pending_grant += n
        if self._pending_grant >= self.threshold:
            return self.flush()
        return 0

    def flush(self) -> int:
        """Grant whatever is pending now (e.g. when the receiver goes idle)."""
        grant, self._pending_grant = self._pending_grant, 0
        self._granted_limit += grant
        return grant

    def ack(self) -> tuple[int, int]:
        """Absolute form for an ack message: (consumed offset, window) — and mark it granted."""
        self.flush()
        self._granted_limit = self.offset + self.window
        return self.offset, self.window

