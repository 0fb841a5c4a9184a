"""Driver for the OCI runtime binary (runc; crun takes the same arguments).

Every runc child is started with subprocess.Popen and its exit is collected by our Reaper (we
are PID 1 / a subreaper, and the reaper's waitpid(-1) would otherwise race any other waiter).
Errors come from runc's JSON log file (`--log ... --log-format json`) so runc never writes its
own messages into a container's stderr pipe.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import NotFound, RuntimeFailed
from .reaper import Reaper
from .fdio import read_all


class Runc:
    def __init__(self, reaper: Reaper, root: Path, binary: str = "runc", log_dir: Path | None = None):
        self.reaper = reaper
        self.root = Path(root)
        self.binary = binary
        self.log_dir = Path(log_dir or root)

    def _log_path(self, id: str) -> Path:
        return self.log_dir / f"{id}.log.json"

    def _argv(self, id: str, args: Sequence[str]) -> list[str]:
        return [self.binary, "--root", str(self.root), "--log", str(self._log_path(id)),
                "--log-format", "json", *args]

    async def _run(self, id: str, args: Sequence[str], *, input: bytes | None = None,
                   stdio: tuple[int | None, int | None, int | None] | None = None,
                   capture: bool = True) -> bytes:
        """Run runc; return its stdout (when captured). Raises RuntimeFailed with runc's error."""
        log = self._log_path(id)
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            log.unlink()
        except FileNotFoundError:
            pass
        if stdio is not None:
            stdin, stdout, stderr = stdio
            stdin = subprocess.DEVNULL if stdin is None else stdin
            stdout = subprocess.DEVNULL if stdout is None else stdout
            stderr = subprocess.DEVNULL if stderr is None else stderr
            capture = False
        else:
            stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
            stdout = subprocess.PIPE if capture else subprocess.DEVNULL
            stderr = subprocess.PIPE
        argv = self._argv(id, args)
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, close_fds=True)
        # Register synchronously: the reaper runs on this loop, it cannot take the exit first.
        exited = self.reaper.watch(proc.pid)
        out, err = b"", b""
        try:
            if input is not None and proc.stdin is not None:
                # Small payloads (resources JSON, process.json is a file): fits in the pipe.
                os.write(proc.stdin.fileno(), input)
                proc.stdin.close()
            readers = []
            if proc.stdout is not None:
                readers.append(read_all(proc.stdout.fileno()))
            if proc.stderr is not None:
                readers.append(read_all(proc.stderr.fileno()))
            results = await asyncio.gather(*readers)
            ex = await exited
        finally:
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
        proc.returncode = ex.status  # Popen must never waitpid() itself
        if proc.stdout is not None:
            out = results[0]
        if proc.stderr is not None:
            err = results[-1]
        if ex.status != 0:
            msg = self._error_message(log) or err.decode(errors="replace").strip() or f"exit status {ex.status}"
            cmd = args[0]
            if "does not exist" in msg or "container not found" in msg.lower():
                raise NotFound(f"runc {cmd} {id}: {msg}")
            raise RuntimeFailed(f"runc {cmd} {id}: {msg}")
        return out

    @staticmethod
    def _error_message(log: Path) -> str:
        try:
            lines = log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        msgs = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") in ("error", "fatal"):
                msgs.append(str(entry.get("msg", "")))
        return "; ".join(m for m in msgs if m)

    # --- lifecycle -------------------------------------------------------------------------

    async def create(self, id: str, bundle: Path, pid_file: Path, *, console_socket: Path | None,
                     stdio: tuple[int | None, int | None, int | None]) -> None:
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self._run(id, [*args, id], stdio=stdio)

    async def start(self, id: str) -> None:
        await self._run(id, ["start", id])

    async def exec(self, id: str, process_json: Path, pid_file: Path, *, console_socket: Path | None,
                   stdio: tuple[int | None, int | None, int | None]) -> None:
        args = ["exec", "--detach", "--process", str(process_json), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self._run(id, [*args, id], stdio=stdio)

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        await self._run(id, ["kill", *(["--all"] if all else []), id, str(signal)])

    async def delete(self, id: str, force: bool = False) -> None:
        await self._run(id, ["delete", *(["--force"] if force else []), id])

    async def state(self, id: str) -> dict:
        return json.loads(await self._run(id, ["state", id]))

    async def ps(self, id: str) -> list[int]:
        out = await self._run(id, ["ps", "--format", "json", id])
        return [int(p) for p in (json.loads(out or b"[]") or [])]

    async def pause(self, id: str) -> None:
        await self._run(id, ["pause", id])

    async def resume(self, id: str) -> None:
        await self._run(id, ["resume", id])

    async def update(self, id: str, resources: dict) -> None:
        await self._run(id, ["update", "--resources", "-", id], input=json.dumps(resources).encode())

    async def stats(self, id: str) -> dict:
        out = await self._run(id, ["events", "--stats", id])
        return json.loads(out)

    async def version(self) -> str:
        out = await self._run("version", ["--version"])
        return out.decode(errors="replace").splitlines()[0] if out else ""


def read_pid_file(path: Path) -> int:
    text = Path(path).read_text().strip()
    pid = int(text)
    if pid <= 1:
        raise RuntimeFailed(f"runc wrote an invalid pid {text!r} to {path}")
    return pid


def monotonic() -> float:
    return time.monotonic()
