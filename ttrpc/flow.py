"""Credit-based flow control for one direction of a bidi stream.

TTRPC has no flow control of its own, and the receive buffers are bounded, so a producer that
outruns its consumer would fail its stream. With credits it cannot: the sender spends credits
before sending; the receiver counts what it has consumed and says when to send a grant. The
grant itself is an application message on the reverse direction of the same bidi stream (the
library does not define it), so a consumer that stops reading stops only its own stream.

The accounting is sans-IO (no asyncio, no sockets, like `frame.py`), so protocols built on it
can be tested as plain state machines:

    SendCredit      the sender's side: bytes sent so far and the limit the receiver granted
    ReceiveWindow   the receiver's side: bytes received / consumed, when to grant, overrun check
    SendWindow      SendCredit plus `await acquire(n)` for asyncio senders

Positions are absolute byte offsets and may start anywhere (`start=`), so a stream resumed at an
offset after a reconnect keeps one coordinate system. Both relative grants (`grant(n)`) and
absolute positions (`update(acked_offset, window)`, as in an ack carrying "consumed up to X,
window W") are supported; a grant is never taken back.
"""
from __future__ import annotations

import asyncio
import collections

from .status import Cancelled, ResourceExhausted


class FlowControlError(ResourceExhausted):
    """The peer sent more than the window it was granted."""


class SendCredit:
    """Credits the sender may still spend (sans-IO). `offset` counts every byte spent so far."""

    def __init__(self, initial: int = 0, *, start: int = 0) -> None:
        if initial < 0 or start < 0:
            raise ValueError("ttrpc: initial window and start offset must be >= 0")
        self.offset = start  # bytes spent (sent) so far
        self.limit = start + initial  # may send while offset < limit

    @property
    def available(self) -> int:
        return max(0, self.limit - self.offset)

    def grant(self, n: int) -> None:
        """Relative grant: the receiver consumed `n` more bytes."""
        if n < 0:
            raise ValueError("ttrpc: negative credit grant")
        self.limit += n

    def update(self, acked_offset: int, window: int) -> None:
        """Absolute form: the receiver consumed everything before `acked_offset` and accepts
        `window` bytes beyond it. A stale (smaller) limit never takes credits back."""
        self.limit = max(self.limit, acked_offset + window)

    def spend(self, n: int) -> None:
        """Record `n` bytes sent; sending beyond the credits is a bug of the caller."""
        if n < 0 or n > self.available:
            raise ValueError(f"ttrpc: spending {n} credits with {self.available} available")
        self.offset += n


class SendWindow(SendCredit):
    """SendCredit for an asyncio sender: `acquire()` waits until the receiver grants credits."""

    def __init__(self, initial: int = 0, *, start: int = 0) -> None:
        super().__init__(initial, start=start)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._error: BaseException | None = None

    @property
    def closed(self) -> bool:
        return self._error is not None

    def grant(self, n: int) -> None:
        super().grant(n)
        self._wake()

    def update(self, acked_offset: int, window: int) -> None:
        old = self.limit
        super().update(acked_offset, window)
        if self.limit > old:
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
                self.spend(take)
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
    """The receiver's accounting (sans-IO): bytes in flight must stay within the window it
    granted.

    received(n) when a message arrives (raises FlowControlError if the peer overran);
    consumed(n) when the application has really used the bytes (written them to a FIFO, ...):
    returns how many credits to grant now (0 until `threshold` bytes accumulated, so grants
    are batched rather than one per message). `start` is the offset the stream begins at (a
    resumed stream): the peer may first send up to start + window."""

    def __init__(self, window: int, *, threshold: int | None = None, start: int = 0) -> None:
        if window <= 0:
            raise ValueError("ttrpc: window must be > 0")
        if start < 0:
            raise ValueError("ttrpc: start offset must be >= 0")
        self.window = window
        self.threshold = max(1, window // 2 if threshold is None else threshold)
        self.received_offset = start  # bytes that arrived
        self.offset = start  # bytes consumed
        self._granted_limit = start + window  # peer may send up to here
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
