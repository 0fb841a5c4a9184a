"""qemu.qmp's client with bounded event listeners.

qemu.qmp's `QMPClient` registers a default listener for every event, whose queue and history
grow without bound, and nothing of ours reads it; every other `EventListener` keeps a full
history too. The guest raises QMP events at will (ACPI OST, RTC_CHANGE, serial and NIC state
changes, ...), so on the host each listener keeps at most `maxlen` events, drops the oldest
beyond that (counted), and keeps no history. What we wait for (DEVICE_DELETED in
shim.vm.devices) uses `client.listener(...)`, bounded the same way, filtered to its names.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from qemu.qmp import EventListener
from qemu.qmp import QMPClient as _LibraryClient
from qemu.qmp.events import EventFilter, EventNames
from qemu.qmp.message import Message

DEFAULT_KEPT = 64       # the default listener: the last events, for a look when debugging
LISTENER_KEPT = 256     # a listener something waits on (it reads as events come)


class BoundedListener(EventListener):
    """An `EventListener` of at most `maxlen` pending events (the oldest dropped, counted in
    `dropped`) and no history. `put` never waits: QMP's reader (our command replies) must not
    stall behind a listener nobody reads."""

    def __init__(self, names: EventNames = None, event_filter: EventFilter | None = None, *,
                 maxlen: int = LISTENER_KEPT) -> None:
        super().__init__(names, event_filter)
        self.maxlen = maxlen
        self.dropped = 0
        self.received = 0       # events accepted, over the listener's life

    async def put(self, event: Message) -> None:
        if not self.accept(event):
            return
        self.received += 1
        while self._queue.qsize() >= self.maxlen:
            try:
                self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self.dropped += 1
        self._queue.put_nowait(event)

    @property
    def pending(self) -> int:
        return self._queue.qsize()


class QMPClient(_LibraryClient):
    """`qemu.qmp.QMPClient` whose default listener (`events`) and new listeners are bounded."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        # the library refuses to remove its default listener: swap it in place
        self._listeners.remove(self.events)
        self.events: BoundedListener = BoundedListener(maxlen=DEFAULT_KEPT)
        self._listeners.append(self.events)

    @contextmanager
    def listener(self, names: EventNames = (), event_filter: EventFilter | None = None
                 ) -> Iterator[EventListener]:
        listener = BoundedListener(names, event_filter)
        with self.listen(listener):
            yield listener
