"""The agent's event log: a bounded ring of sequenced events that subscribers follow.

A host that reconnects subscribes with the last sequence number it saw and gets everything after
it that is still in the ring (the first event says `gap` if some were dropped)."""
from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CAPACITY = 4096


@dataclass
class Event:
    seq: int
    timestamp_ns: int
    kind: str                 # "exit" | "oom"
    fields: dict[str, Any] = field(default_factory=dict)


class EventLog:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._ring: collections.deque[Event] = collections.deque(maxlen=capacity)
        self._seq = 0
        self._changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self._seq

    def publish(self, kind: str, **fields: Any) -> Event:
        self._seq += 1
        ev = Event(self._seq, time.time_ns(), kind, fields)
        self._ring.append(ev)
        # Wake every current subscriber, then arm a fresh Event for the next publish.
        self._changed.set()
        self._changed = asyncio.Event()
        return ev

    def since(self, after_seq: int) -> tuple[list[Event], bool]:
        """Events with seq > after_seq still kept, and whether some were already dropped."""
        evs = [e for e in self._ring if e.seq > after_seq]
        first_kept = self._ring[0].seq if self._ring else self._seq + 1
        gap = after_seq + 1 < first_kept and after_seq < self._seq
        return evs, gap

    async def follow(self, after_seq: int) -> AsyncIterator[tuple[Event, bool]]:
        """Yield (event, gap) forever, starting after after_seq."""
        pos = after_seq
        while True:
            waiter = self._changed
            evs, gap = self.since(pos)
            for ev in evs:
                yield ev, gap
                gap = False
                pos = ev.seq
            if not evs:
                await waiter.wait()
