"""Request metadata (a multimap with lower-cased keys, as Go ttrpc's metadata.go) and the
per-call context handed to server handlers."""
from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping

from .request_pb2 import KeyValue

MetadataLike = Mapping[str, str | Iterable[str]] | Iterable[tuple[str, str]] | None


class Metadata:
    """Ordered multimap of string keys (lower-cased) to string values."""

    def __init__(self, items: MetadataLike = None) -> None:
        self._items: list[tuple[str, str]] = []
        if items is None:
            return
        pairs = items.items() if isinstance(items, Mapping) else items
        for key, value in pairs:
            if isinstance(value, str):
                self.add(key, value)
            else:
                for v in value:
                    self.add(key, v)

    @classmethod
    def from_proto(cls, kvs: Iterable[KeyValue]) -> Metadata:
        return cls((kv.key, kv.value) for kv in kvs)

    def to_proto(self) -> list[KeyValue]:
        return [KeyValue(key=k, value=v) for k, v in self._items]

    def add(self, key: str, value: str) -> None:
        self._items.append((key.lower(), value))

    def get(self, key: str, default: str | None = None) -> str | None:
        key = key.lower()
        for k, v in self._items:
            if k == key:
                return v
        return default

    def get_all(self, key: str) -> list[str]:
        key = key.lower()
        return [v for k, v in self._items if k == key]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for k, _ in self._items))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and any(k == key.lower() for k, _ in self._items)

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Metadata) and other._items == self._items

    def __repr__(self) -> str:
        return f"Metadata({self._items!r})"


class CallContext:
    """What a server handler knows about its call. Written out rather than a dataclass: a
    dataclass compiles its methods at import, which costs guest boot time (see __init__.py)."""

    def __init__(self, service: str, method: str, stream_id: int, metadata: Metadata | None = None,
                 deadline: float | None = None, peer: object = None) -> None:
        self.service = service
        self.method = method
        self.stream_id = stream_id
        self.metadata = Metadata() if metadata is None else metadata
        self.deadline = deadline  # event-loop time (loop.time()) or None for no deadline
        self.peer = peer  # connection info (e.g. SO_PEERCRED triple) where known

    def _values(self) -> tuple[object, ...]:
        return (self.service, self.method, self.stream_id, self.metadata, self.deadline, self.peer)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CallContext) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value, as a dataclass would be

    def __repr__(self) -> str:
        return (f"CallContext(service={self.service!r}, method={self.method!r}, "
                f"stream_id={self.stream_id!r}, metadata={self.metadata!r}, "
                f"deadline={self.deadline!r}, peer={self.peer!r})")

    @property
    def full_method(self) -> str:
        return f"/{self.service}/{self.method}"

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())
