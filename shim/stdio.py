"""containerd's stdio FIFOs <-> the guest's stdio streams, one task per direction.

containerd (ctr, CRI) creates the FIFOs and opens its own ends; the shim must never block on
an open or a write (one stalled reader must stall only its own stream):

* output FIFOs (stdout/stderr) are opened O_RDWR|O_NONBLOCK: that open never blocks and,
  holding a read end ourselves, a client that has not opened yet (or reopens) loses nothing
  and no write ever fails with EPIPE (containerd's runc shim keeps a reader open for the same
  reason). Writes wait for writability on the event loop; the guest stream gets its credit
  back only after the bytes are in the FIFO, so a FIFO nobody reads stops that stream only.
* the stdin FIFO is opened O_RDONLY|O_NONBLOCK, which never blocks either. Linux reports
  EOF/HUP on it only after a writer connected and left, so "no writer yet" is not an EOF;
  EOF closes the process's stdin in the guest.

URIs: a plain path or fifo://path is a FIFO; file://path is a regular file (appended);
other schemes (binary://) are refused with UNIMPLEMENTED.

The guest side is abstract (`OutputStream`/`InputStream` protocols below) so this module does
not care how the agent client implements its credit flow; `shim.containers` adapts the
agent client's streams (`shim.agent.streams`) to these with AgentOutput / AgentInput below.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from typing import Protocol
from urllib.parse import urlparse

from .counters import STDIO
from .errors import InvalidArgument, NotFound, Unimplemented

log = logging.getLogger(__name__)
CHUNK = 64 << 10


class OutputStream(Protocol):
    """Guest -> host bytes of one process fd."""

    async def read(self) -> bytes | None:
        """Next chunk; None at the (acknowledged) end of the stream."""

    async def consumed(self, n: int) -> None:
        """`n` bytes were written out: the guest may send that many more (credit)."""

    async def close(self) -> None: ...


class InputStream(Protocol):
    """Host -> guest bytes into a process's stdin (credit-controlled by the guest)."""

    async def write(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None:
        """EOF: close the process's stdin (after everything written so far)."""

    async def close(self) -> None: ...


def fifo_path(uri: str) -> tuple[str, str]:
    """(kind, path) for a containerd stdio URI: kind is "fifo" or "file"."""
    if not uri:
        raise ValueError("empty stdio path")
    if "://" not in uri:
        return "fifo", uri
    u = urlparse(uri)
    if u.scheme == "fifo":
        return "fifo", u.path
    if u.scheme == "file":
        return "file", u.path
    raise Unimplemented(f"stdio URI scheme {u.scheme!r} is not supported ({uri}); use a FIFO or file://")


def open_output(uri: str) -> int:
    """A non-blocking fd to write a process's output into (see module docstring)."""
    kind, path = fifo_path(uri)
    if kind == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"stdio FIFO {path} does not exist") from None
    if not stat.S_ISFIFO(st.st_mode):
        raise InvalidArgument(f"stdio path {path} is not a FIFO")
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def open_input(uri: str) -> int:
    kind, path = fifo_path(uri)
    if kind == "file":
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"stdin FIFO {path} does not exist") from None
    if not stat.S_ISFIFO(st.st_mode):
        raise InvalidArgument(f"stdin path {path} is not a FIFO")
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


async def _wait_fd(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, ready)
    try:
        await fut
    finally:
        remove(fd)


async def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _wait_fd(fd, writable=True)
            continue
        view = view[n:]


async def read_some(fd: int, size: int = CHUNK) -> bytes:
    """Next bytes from a non-blocking fd; b"" at EOF."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            await _wait_fd(fd, writable=False)


async def pump_output(source: OutputStream, fd: int) -> int:
    """Copy a guest output stream into fd until the stream's end. Returns bytes copied.
    A write error (EPIPE, EIO) drops further output but keeps consuming the stream, so the
    guest is never stuck on a dead reader."""
    total = 0
    broken = False
    while True:
        chunk = await source.read()
        if chunk is None:
            return total
        if chunk and not broken:
            try:
                await write_all(fd, chunk)
            except OSError as e:
                broken = True
                log.warning("stdio: writing output failed (%s); discarding the rest", e)
        total += len(chunk)
        STDIO.out += len(chunk)
        await source.consumed(len(chunk))


async def _pump_unless_refused(stream: OutputStream, fd: int) -> None:
    """pump_output, ended at once (the stream's error raised) when the guest breaks the
    stream's contract, even while the pump waits on a FIFO nobody reads: otherwise the exit
    would wait out the drain bound for output the guest lied about."""
    refused = getattr(stream, "refused", None)
    if refused is None:
        await pump_output(stream, fd)
        return
    pump = asyncio.ensure_future(pump_output(stream, fd))
    watch = asyncio.ensure_future(refused())
    try:
        await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (pump, watch):   # the loser, or both when we are cancelled
            t.cancel()
        await asyncio.gather(pump, watch, return_exceptions=True)
    if not pump.cancelled():
        pump.result()           # its own end (or error)
        return
    raise watch.result()


async def pump_input(fd: int, sink: InputStream) -> int:
    """Copy a stdin FIFO into the guest until EOF, then close the process's stdin."""
    total = 0
    while True:
        try:
            # Wait for readiness before every read: a read on a FIFO no writer ever opened
            # returns 0 at once, but epoll reports HUP only after a writer came and went.
            await _wait_fd(fd, writable=False)
            data = await read_some(fd)
        except OSError as e:
            if e.errno != errno.EIO:
                log.warning("stdio: reading stdin failed: %s", e)
            data = b""
        if not data:
            await sink.close_stdin()
            return total
        await sink.write(data)
        total += len(data)
        STDIO.into += len(data)


class ProcessIO:
    """The stdio of one process: FIFO fds and the pump tasks.

    `drained(timeout)` is what the exit path waits on: True once every output pump reached the
    end of its guest stream (so all output is in the FIFOs)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fds: list[int] = []
        self.output_tasks: list[asyncio.Task] = []
        self.input_task: asyncio.Task | None = None
        self.input_sink: InputStream | None = None
        self._streams: list = []
        self.closed = False

    def open_fifos(self, stdin: str, stdout: str, stderr: str, terminal: bool) -> dict[str, int]:
        """Open containerd's ends now (Create/Exec time: a missing FIFO fails the RPC).
        Returns {"stdin"/"stdout"/"stderr": fd} for the connected ones; with a terminal there
        is one output stream (stderr, if given, stays unused as in runc)."""
        out: dict[str, int] = {}
        try:
            if stdin:
                out["stdin"] = open_input(stdin)
            if stdout:
                out["stdout"] = open_output(stdout)
            if stderr and not terminal:
                out["stderr"] = open_output(stderr) if stderr != stdout else os.dup(out["stdout"])
        except BaseException:
            for fd in out.values():
                os.close(fd)
            raise
        self.fds.extend(out.values())
        self._fd = out
        return out

    def wanted(self) -> dict[str, bool]:
        fds = getattr(self, "_fd", {})
        return {k: k in fds for k in ("stdin", "stdout", "stderr")}

    def start_output(self, which: str, stream: OutputStream) -> None:
        fd = self._fd[which]
        self._streams.append(stream)
        self.output_tasks.append(asyncio.ensure_future(self._output(which, stream, fd)))

    async def _output(self, which: str, stream: OutputStream, fd: int) -> None:
        try:
            await _pump_unless_refused(stream, fd)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("%s %s: output stream failed: %s", self.name, which, e)
        # The guest stream has ended: close our write end now, so the FIFO's reader sees EOF.
        # CRI's ExecSync waits for that EOF before it deletes the exec (runc's shim gives it
        # the same way); waiting for Delete would hang it.
        self._close_fd(fd)

    def _close_fd(self, fd: int) -> None:
        if fd in self.fds:
            self.fds.remove(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def start_input(self, sink: InputStream) -> None:
        self.input_sink = sink
        self._streams.append(sink)
        self.input_task = asyncio.ensure_future(self._input(sink, self._fd["stdin"]))

    async def _input(self, sink: InputStream, fd: int) -> None:
        try:
            await pump_input(fd, sink)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("%s stdin: input stream failed: %s", self.name, e)

    async def close_stdin(self) -> None:
        """CloseIO: stop reading the FIFO and close the process's stdin."""
        if self.input_task is not None and not self.input_task.done():
            self.input_task.cancel()
            try:
                await self.input_task
            except (asyncio.CancelledError, Exception):
                pass
            if self.input_sink is not None:
                await self.input_sink.close_stdin()

    async def drained(self, timeout: float) -> bool:
        if not self.output_tasks:
            return True
        done, pending = await asyncio.wait(self.output_tasks, timeout=timeout)
        return not pending

    async def close(self) -> None:
        """Stop every pump and close every fd (Delete)."""
        if self.closed:
            return
        self.closed = True
        tasks = [t for t in self.output_tasks + [self.input_task] if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for s in self._streams:
            try:
                await s.close()
            except Exception as e:
                log.debug("%s: closing a stream: %s", self.name, e)
        for fd in list(self.fds):
            self._close_fd(fd)


# --- the guest side: shim.agent.streams' credit-controlled streams -------------------------

class AgentOutput:
    """OutputStream over shim.agent.streams.OutputStream, which grants credit as we take
    chunks; we take the next chunk only after the previous one is in the FIFO, so a stalled
    FIFO holds at most one chunk plus the window, and stops only this stream."""

    def __init__(self, stream) -> None:
        self._s = stream

    async def read(self) -> bytes | None:
        return await self._s.read()

    async def consumed(self, n: int) -> None:
        pass

    async def refused(self) -> BaseException:
        """Returns once the guest broke the stream's contract (ProcessIO stops the pump)."""
        return await self._s.refused()

    async def close(self) -> None:
        await self._s.aclose()


class AgentInput:
    """InputStream over shim.agent.streams.InputStream (the guest grants the window)."""

    def __init__(self, stream, eof_timeout: float = 10.0) -> None:
        self._s = stream
        self.eof_timeout = eof_timeout
        self._eof = False

    async def write(self, data: bytes) -> None:
        await self._s.write(data)

    async def close_stdin(self) -> None:
        if self._eof:
            return
        self._eof = True
        try:
            await self._s.close(timeout=self.eof_timeout)
        except Exception as e:
            log.warning("closing stdin in the guest: %s", e)

    async def close(self) -> None:
        await self._s.aclose()
