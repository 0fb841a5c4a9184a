"""Small asyncio helpers on raw file descriptors (pipes, pty masters, unix sockets)."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


def _waker(fut: asyncio.Future[None]) -> Callable[[], None]:
    # The loop may call a reader/writer callback again before the waiting task runs.
    def wake() -> None:
        if not fut.done():
            fut.set_result(None)
    return wake


async def wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _waker(fut))
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, _waker(fut))
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def read_all(fd: int) -> bytes:
    """Read a pipe to EOF without blocking the loop."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            await wait_readable(fd)
            continue
        if not data:
            return b"".join(chunks)
        chunks.append(data)
