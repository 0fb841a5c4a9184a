"""Task events to containerd: `containerd.services.events.ttrpc.v1.Events/Forward`.

Mirrors containerd's own shim publisher (pkg/shim/publisher.go) and keeps one order:

* one bounded queue (2048 events) drained by one task, so events leave in the order they were
  published (create → start → exit → delete must not be reordered);
* each Forward has a 5 s timeout; a closed connection is reopened once at once, other failures
  are retried after 1 s × attempt; an event is dropped (with a log line) after 5 attempts;
* `close()` flushes what is queued, bounded by a timeout.

The address is `TTRPC_ADDRESS` (containerd passes `<grpc socket>.ttrpc`, bare path; a `unix://`
prefix is accepted). Without it, `-publish-binary` is the fallback: `<containerd> --address
<grpc> publish --topic T --namespace N` with the serialized Any on stdin (one process per event).
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from google.protobuf import empty_pb2
from google.protobuf.message import Message

import ttrpc
from spinbox.api import types
from spinbox.api._pb.containerd.services.ttrpc.events.v1 import events_pb2
from spinbox.api._pb.containerd.types import event_pb2

log = logging.getLogger(__name__)

QUEUE_SIZE = 2048
FORWARD_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 5
RETRY_STEP_S = 1.0


@dataclass
class _Item:
    envelope: event_pb2.Envelope
    attempts: int = 0


class Publisher:
    """`await publish(ns, topic, event)` queues; a single worker forwards in order."""

    def __init__(self, ttrpc_address: str | None = None, *, publish_binary: str | None = None,
                 grpc_address: str | None = None, retry_step_s: float = RETRY_STEP_S,
                 forward_timeout_s: float = FORWARD_TIMEOUT_S, max_attempts: int = MAX_ATTEMPTS,
                 queue_size: int = QUEUE_SIZE) -> None:
        addr = ttrpc_address if ttrpc_address is not None else os.environ.get("TTRPC_ADDRESS", "")
        self.address = addr[len("unix://"):] if addr.startswith("unix://") else addr
        self.publish_binary = publish_binary if not self.address else None
        self.grpc_address = grpc_address
        self.retry_step_s = retry_step_s
        self.forward_timeout_s = forward_timeout_s
        self.max_attempts = max_attempts
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self._client: ttrpc.Client | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self.forwarded = 0
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return bool(self.address or (self.publish_binary and self.grpc_address))

    # -- producer side ------------------------------------------------------------------------
    def _envelope(self, namespace: str, topic: str, event: Message) -> event_pb2.Envelope:
        return types.envelope(namespace, topic, event)

    async def publish(self, namespace: str, topic: str, event: Message) -> None:
        """Queue an event (waits while the queue is full: back-pressure, never reordering)."""
        if self._closing:
            raise RuntimeError("publisher is closed")
        await self._queue.put(_Item(self._envelope(namespace, topic, event)))
        self._ensure_worker()

    def publish_nowait(self, namespace: str, topic: str, event: Message) -> bool:
        """Queue without waiting; False (and a log line) if the queue is full or closed."""
        if self._closing:
            log.error("event %s for %s dropped: publisher closed", topic, namespace)
            return False
        try:
            self._queue.put_nowait(_Item(self._envelope(namespace, topic, event)))
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("event %s dropped: queue full (%d events)", topic, self._queue.maxsize)
            return False
        self._ensure_worker()
        return True

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="spinbox-event-publisher")

    # -- worker -------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._deliver(item)
            finally:
                self._queue.task_done()

    async def _deliver(self, item: _Item) -> None:
        env = item.envelope
        while True:
            item.attempts += 1
            try:
                await self._forward(env)
                self.forwarded += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if item.attempts >= self.max_attempts:
                    self.dropped += 1
                    log.error("event %s (ns %s) dropped after %d attempts: %s", env.topic,
                              env.namespace, item.attempts, e)
                    return
                delay = self.retry_step_s * item.attempts
                log.warning("forwarding event %s failed (attempt %d/%d), retrying in %.1f s: %s",
                            env.topic, item.attempts, self.max_attempts, delay, e)
                await asyncio.sleep(delay)

    async def _forward(self, env: event_pb2.Envelope) -> None:
        if not self.address:
            await self._forward_binary(env)
            return
        req = events_pb2.ForwardRequest(envelope=env)
        client = await self._connect()
        try:
            await client.call(types.EVENTS_SERVICE, "Forward", req, empty_pb2.Empty,
                              timeout=self.forward_timeout_s)
        except (ttrpc.ConnectionClosed, ConnectionError):
            # containerd restarted or dropped us: one immediate retry on a fresh connection
            await self._drop_client()
            client = await self._connect()
            await client.call(types.EVENTS_SERVICE, "Forward", req, empty_pb2.Empty,
                              timeout=self.forward_timeout_s)

    async def _connect(self) -> ttrpc.Client:
        if self._client is None or self._client.closed:
            self._client = await asyncio.wait_for(ttrpc.Client.connect(self.address),
                                                  self.forward_timeout_s)
        return self._client

    async def _drop_client(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            try:
                await c.close()
            except Exception:
                pass

    async def _forward_binary(self, env: event_pb2.Envelope) -> None:
        if not (self.publish_binary and self.grpc_address):
            raise RuntimeError("no TTRPC_ADDRESS and no -publish-binary: cannot publish events")
        proc = await asyncio.create_subprocess_exec(
            self.publish_binary, "--address", self.grpc_address, "publish", "--topic", env.topic,
            "--namespace", env.namespace, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(env.event.SerializeToString()),
                                            self.forward_timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise TimeoutError(f"{self.publish_binary} publish timed out") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{self.publish_binary} publish: exit {proc.returncode}: "
                               f"{err.decode(errors='replace').strip()}")

    # -- shutdown -----------------------------------------------------------------------------
    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event was forwarded or dropped; False on timeout."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self, timeout: float = 5.0) -> None:
        """Flush (bounded), then stop the worker and the connection. Left-overs are logged."""
        self._closing = True
        if not await self.flush(timeout):
            left = self._queue.qsize() + 1
            self.dropped += left
            log.error("publisher closed with ~%d event(s) not delivered after %.1f s", left, timeout)
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
            self._worker = None
        await self._drop_client()
