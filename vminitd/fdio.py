"""Small asyncio helpers on raw file descriptors (pipes, pty masters, unix sockets)."""
from __future__ import annotations

import asyncio
import os


async def wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def read_all(fd: int) -> bytes:
    """Read a pipe to EOF without blocking the loop."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            await wait_readable(fd)
            continue
        if not data:
            return b"".join(chunks)
        chunks.append(data)
