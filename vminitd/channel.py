"""Where the agent's ttrpc server listens: vsock, the virtio-serial port, or a unix socket.

How a virtio-serial port behaves in the guest: it opens only once (EBUSY on a second open);
while the host side is disconnected every read returns EOF at once and poll() reports POLLHUP,
so after a disconnect we close, wait for the host (short sleeps) and serve a new connection on a
fresh open. Containers and their buffered output live in the Agent, not in the connection.
"""
from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
from collections.abc import Awaitable, Callable

import logging

log = logging.getLogger(__name__)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

VSOCK_PORT = 1024
PORT_NAME = "spinbox.agent"
RECONNECT_POLL = 0.1


def vsock_available(drivers: str = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport") -> bool:
    """A virtio-vsock device is bound (/dev/vsock exists whenever the module is there, even
    without any device, so it says nothing)."""
    if not hasattr(socket, "AF_VSOCK"):
        return False
    try:
        return any(e.startswith("virtio") for e in os.listdir(drivers))
    except OSError:
        return False


def find_virtio_port(name: str = PORT_NAME, sys_root: str = "/sys/class/virtio-ports",
                     dev_root: str = "/dev") -> str | None:
    by_name = os.path.join(dev_root, "virtio-ports", name)
    if os.path.exists(by_name):
        return by_name
    try:
        entries = sorted(os.listdir(sys_root))
    except OSError:
        return None
    for port in entries:
        try:
            with open(os.path.join(sys_root, port, "name")) as f:
                if f.read().strip() == name:
                    return os.path.join(dev_root, port)
        except OSError:
            continue
    return None


def choose_transport(params: dict[str, str]) -> tuple[str, str]:
    """(kind, address) from `spinbox.transport=` / `spinbox.vsock_port=` (default auto)."""
    kind = params.get("spinbox.transport", "auto")
    port = params.get("spinbox.vsock_port", str(VSOCK_PORT))
    if kind not in ("auto", "vsock", "virtio-serial"):
        log.warning(f"unknown spinbox.transport={kind!r}; using auto")
        kind = "auto"
    if kind == "auto":
        # The host attached one of the two: the named port if it is there, else vsock.
        if find_virtio_port(PORT_NAME) is not None:
            kind = "virtio-serial"
        else:
            kind = "vsock" if vsock_available() else "virtio-serial"
    return (kind, port) if kind == "vsock" else (kind, PORT_NAME)


async def serve_unix(path: str, handler: Handler) -> asyncio.AbstractServer:
    from pathlib import Path  # not at the top: vminitd in a VM never listens on a unix socket
    p = Path(path)
    if p.is_socket():
        p.unlink()
    p.parent.mkdir(parents=True, exist_ok=True)
    return await asyncio.start_unix_server(handler, path=str(p))


async def serve_vsock(port: int, handler: Handler) -> asyncio.AbstractServer:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(16)
    sock.setblocking(False)
    return await asyncio.start_server(handler, sock=sock)


def _host_connected(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    for _, ev in p.poll(0):
        if ev & select.POLLHUP:
            return False
    return True


async def serve_virtio_serial(name: str, serve_fd: Callable[[int], Awaitable[None]], stop: asyncio.Event) -> None:
    """Serve one connection at a time on the named port until `stop` is set."""
    announced = False
    while not stop.is_set():
        path = find_virtio_port(name)
        if path is None:
            if not announced:
                log.info(f"waiting for virtio-serial port {name!r}")
                announced = True
            await asyncio.sleep(RECONNECT_POLL)
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EBUSY:
                log.warning(f"open {path}: {e}")
            await asyncio.sleep(RECONNECT_POLL)
            continue
        if not _host_connected(fd):
            os.close(fd)
            await asyncio.sleep(RECONNECT_POLL)
            continue
        log.debug(f"host connected on {path}")
        try:
            await serve_fd(fd)      # returns at EOF (host gone) or error
        except Exception as e:  # one broken connection must not end the agent
            log.info(f"connection on {path} ended: {e!r}")
        finally:
            os.close(fd)
        log.debug(f"host disconnected from {path}")
