"""Named network namespaces (the `ip netns` layout: a bind mount of a netns file under
/run/netns/<name>) without forking, and running code inside one.

The network namespace is per thread, so everything here happens in a fresh thread that is thrown
away afterwards: the event loop's threads never change namespace, and no thread is ever reused
in the wrong one. Python 3.11 has no os.setns/os.unshare, hence ctypes.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from spinbox.shim import mounts
from spinbox.shim.errors import HostError
from spinbox.shim.mounts import MS_BIND, MS_REC, MS_SHARED

log = logging.getLogger(__name__)

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703          # _IO(0xb7, 0x3): which kind of namespace an nsfs fd is
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

T = TypeVar("T")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsError(HostError):
    """A netns name or path is refused."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src: str, dst: str, flags: int) -> None:
    mounts.mount_syscall(src, dst, flags, fstype="none")


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace `fd` refers to."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")


def path_of(name: str, run_dir: str = NETNS_RUN_DIR) -> str:
    if not _NAME_RE.fullmatch(name):
        raise NetnsError(f"invalid netns name {name!r}: must match {_NAME_RE.pattern}")
    return os.path.join(run_dir, name)


def _share_run_dir(run_dir: str) -> None:
    """Make run_dir a shared mount (iproute2's netns_add does the same), so a netns bind-mounted
    here is seen from other mount namespaces (containerd's, a restarted shim's)."""
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    try:
        _mount("", run_dir, MS_SHARED | MS_REC)
    except OSError as e:
        if e.errno != errno.EINVAL:          # EINVAL: run_dir is not a mount point yet
            raise
        _mount(run_dir, run_dir, MS_BIND | MS_REC)
        _mount("", run_dir, MS_SHARED | MS_REC)


def _run_in_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if fut.done():
            return
        (fut.set_result if ok else fut.set_exception)(value)

    def body() -> None:
        try:
            result = fn()
        except BaseException as e:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(deliver, False, e)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    threading.Thread(target=body, name="netns", daemon=True).start()
    return fut


def _create_sync(path: str) -> None:
    _share_run_dir(os.path.dirname(path))
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    os.close(fd)
    try:
        # This thread only: it gets the new netns and dies afterwards.
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        _mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", path, MS_BIND)
    except BaseException:
        os.unlink(path)
        raise


async def create(name: str, run_dir: str = NETNS_RUN_DIR) -> str:
    """Create the persistent netns `name` (like `ip netns add`); returns its path. Fails with
    FileExistsError if it exists already."""
    path = path_of(name, run_dir)
    await _run_in_thread(lambda: _create_sync(path))
    return path


def delete_sync(path: str) -> bool:
    """Unmount and remove a netns file (like `ip netns delete`). Idempotent; True if it existed.
    The namespace itself dies with its last user (QEMU holds none: it has only a TAP fd)."""
    existed = os.path.lexists(path)
    mounts.detach(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return existed


async def delete(path: str) -> bool:
    return await asyncio.to_thread(delete_sync, path)


def is_netns(path: str) -> bool:
    """True if path is a bound network namespace (not just the empty mount-point file)."""
    try:   # nsfs files all live on the one nsfs device
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def _ns_type(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return None
    finally:
        os.close(fd)


# The host's own network namespaces: init's, and the shim's (the same unless the shim runs in a
# container). Joining one would move every host interface into the VM.
HOST_NETNS_FILES = ("/proc/1/ns/net", "/proc/self/ns/net", "/proc/thread-self/ns/net")


def check_not_host(path: str, host_files: tuple[str, ...] = HOST_NETNS_FILES) -> None:
    """Refuse a netns path (CRI's pod netns, from the spec) that is not a network namespace
    file, or is the host's own network namespace however it is spelled (a /proc link, a bind
    mount or a symlink of it): compared by the namespace's identity, st_dev and st_ino."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise NetnsError(f"network namespace {path!r}: {e.strerror}") from None
    if not is_netns(path) or _ns_type(path) != CLONE_NEWNET:
        raise NetnsError(f"network namespace {path!r} is not a network namespace file")
    for host in host_files:
        try:
            h = os.stat(host)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (h.st_dev, h.st_ino):
            raise NetnsError(f"network namespace {path!r} is the host's own ({host}): refused, the "
                             "sandbox would take over every host network interface")


def run_in_sync(path: str, fn: Callable[[], T]) -> T:
    """Enter the netns at `path` in the calling thread and run fn. Only for threads that die
    afterwards (see run_in)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)
    return fn()


async def run_in(path: str, fn: Callable[[], T]) -> T:
    """Run the blocking fn inside the netns at `path`, in a fresh thread that is discarded
    afterwards. Sockets and TAP fds created there stay bound to that netns."""
    return await _run_in_thread(lambda: run_in_sync(path, fn))
