"""Crash-safe record of what one sandbox's shim created on the host.

Layout under `paths.state_dir` (default /run/spinbox):

    <state_dir>/<namespace>/<group>/state.json   what exists (this module)
    <state_dir>/<namespace>/<group>/options.pb   runtime options handed over by `start`
    <state_dir>/<namespace>/<group>.lock         serializes start / delete / daemon exit
    <state_dir>/vm/<hash16>/                     the VM's own dir (short: unix socket paths)

Trust: `delete` releases what a state file names (unmounts, kills, removes), so nobody but
root may be able to write one. Every directory from / down to the group dir must be owned by
root (or the shim's own user) and not writable by group or others (`check_dir_chain`, before
any state file is read or written, and before the lock is taken); a sticky, root-owned
directory such as /tmp is accepted above the state dir only. Anything else is refused with an
error naming the directory.

Rule: a resource is recorded *before* it is created (`state.record(...)`, or
`async with state.recording(...)`), and forgotten only after it was released. So whatever moment
the daemon is SIGKILLed at, `await cleanup_all()` (run by the `delete` subcommand and by the
daemon on its way out) finds every resource that may exist and releases it; releasing one that
was never created is a no-op. Writes are atomic (tmp + fsync + rename + fsync of the dir).

Single writer: while the shim daemon lives it is the only writer of its group's state; `start`
writes before it spawns the daemon and `delete` only after the daemon is gone (both under the
group lock).

This module is only the record store: a record is `{"kind", "key", "owner", ...data}`, and how a
kind is released is up to the module that creates it (the table in shim.releasers). A record
is refused unless its kind has a releaser, so nothing can be recorded that `delete` could not
release. The file format is unchanged from the first version: a record that names its own
releaser (`"release": "spinbox.shim.<mod>:<func>"`, written by older shims) still works for a
kind nobody registers.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinbox.shim import releasers
from spinbox.shim.errors import HostError
from spinbox.shim.vm import procinfo

log = logging.getLogger(__name__)

STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# where things live

@dataclass(frozen=True)
class GroupPaths:
    """The files of one sandbox group (one shim daemon) under the state dir."""
    state_dir: Path
    namespace: str
    group: str

    @property
    def dir(self) -> Path:
        return self.state_dir / self.namespace / self.group

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def options_file(self) -> Path:
        return self.dir / "options.pb"

    @property
    def log_file(self) -> Path:
        """The daemon's log when containerd's log FIFO has no reader."""
        return self.dir / "shim.log"

    @property
    def lock_file(self) -> Path:
        # beside the group dir, so the dir can be removed while the lock is held
        return self.state_dir / self.namespace / f"{self.group}.lock"

    @property
    def vm_dir(self) -> Path:
        """Short, fixed-length dir for the VM's sockets (namespace + group ids may be 76 bytes
        each; unix socket paths are limited to 107)."""
        h = hashlib.sha256(f"{self.namespace}/{self.group}".encode()).hexdigest()[:16]
        return self.state_dir / "vm" / h


class StateError(HostError):
    """The state file is unreadable, its directory is not root's alone, or a record names a
    releaser that is refused."""


def _dir_problem(d: Path, st: os.stat_result, *, sticky_ok: bool) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX and st.st_uid == 0):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_dir_chain(paths: GroupPaths) -> None:
    """Refuse a state dir that someone other than root could change (see the module docstring):
    each existing directory of the chain / .. state_dir / namespace / group is checked; what
    does not exist yet is made by the shim itself (0700)."""
    top = Path(os.path.realpath(paths.state_dir))      # symlinks resolved: their targets count
    chain = [(d, True) for d in reversed(top.parents)] + [
        (top, False), (top / paths.namespace, False), (top / paths.namespace / paths.group, False)]
    for d, sticky_ok in chain:
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            return
        problem = _dir_problem(d, st, sticky_ok=sticky_ok)
        if problem is not None:
            raise StateError(f"state dir {paths.state_dir}: {d} {problem}: refused (state files "
                             "decide what `delete` removes; only root may write there)")


class GroupLock:
    """An exclusive flock on the group's lock file, safe against the file being removed by the
    previous holder (re-open until the locked inode is the one at the path)."""

    def __init__(self, paths: GroupPaths, timeout: float = 30.0) -> None:
        self.paths = paths
        self.path = paths.lock_file
        self.timeout = timeout
        self.fd: int | None = None

    def acquire(self) -> GroupLock:
        deadline = time.monotonic() + self.timeout
        while True:
            # (re)made each round: the previous holder may have removed the namespace dir
            check_dir_chain(self.paths)
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue   # removed between mkdir and open: again
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise TimeoutError(f"lock {self.path} held by another spinbox process "
                                           f"for more than {self.timeout:.0f} s") from None
                    time.sleep(0.02)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)   # the holder removed the file: lock the new one

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()   # the namespace dir, once nothing else is in it
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> GroupLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# the record

def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(data, indent=1, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Record:
    """One recorded resource (a view on the dict inside the state document)."""

    def __init__(self, state: State, data: dict[str, Any]) -> None:
        self._state = state
        self.data = data

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def key(self) -> str:
        return self.data["key"]

    def update(self, **data: Any) -> Record:
        """Add what became known during creation (a pid, an inode) and persist it."""
        self.data.update(data)
        self._state.save()
        return self

    def __repr__(self) -> str:
        return f"Record({self.data!r})"


class State:
    """state.json of one group: daemon identity, tasks, and resources in creation order."""

    def __init__(self, paths: GroupPaths, doc: dict[str, Any] | None = None) -> None:
        self.paths = paths
        self.doc: dict[str, Any] = doc or {
            "version": STATE_VERSION, "namespace": paths.namespace, "group": paths.group,
            "daemon": None, "tasks": {}, "resources": [],
        }

    # -- load / save --------------------------------------------------------------------------
    @classmethod
    def load(cls, paths: GroupPaths) -> State | None:
        """The recorded state, or None if there is none."""
        check_dir_chain(paths)
        try:
            raw = paths.state_file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise StateError(f"corrupt state file {paths.state_file}: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise StateError(f"state file {paths.state_file}: unsupported version")
        doc.setdefault("tasks", {})
        doc.setdefault("resources", [])
        return cls(paths, doc)

    @classmethod
    def open(cls, paths: GroupPaths) -> State:
        """Load or create (and persist) the group's state."""
        st = cls.load(paths)
        if st is None:
            paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = cls(paths)
            st.save()
        return st

    def save(self) -> None:
        check_dir_chain(self.paths)
        self.paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(self.paths.state_file, self.doc)

    # -- daemon + tasks -----------------------------------------------------------------------
    def set_daemon(self, pid: int, address: str) -> None:
        self.doc["daemon"] = {"pid": pid, "start_time": procinfo.start_time(pid), "address": address}
        self.save()

    @property
    def daemon(self) -> dict[str, Any] | None:
        return self.doc.get("daemon")

    def daemon_alive(self) -> bool:
        d = self.daemon
        return bool(d and isinstance(d.get("pid"), int) and isinstance(d.get("start_time"), int)
                    and procinfo.is_same_process(d["pid"], d["start_time"]))

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.doc["tasks"]

    def set_task(self, task_id: str, **info: Any) -> None:
        """Record (or update) what `delete` must answer for a task: bundle, pid, exit_status."""
        self.tasks.setdefault(task_id, {}).update(info)
        self.save()

    def remove_task(self, task_id: str) -> None:
        if self.tasks.pop(task_id, None) is not None:
            self.save()

    # -- resources ----------------------------------------------------------------------------
    @property
    def records(self) -> list[Record]:
        return [Record(self, r) for r in self.doc["resources"]]

    def find(self, kind: str, key: str) -> Record | None:
        for r in self.doc["resources"]:
            if r["kind"] == kind and r["key"] == key:
                return Record(self, r)
        return None

    def record(self, kind: str, key: str, *, owner: str = "", **data: Any) -> Record:
        """Persist a resource that is about to be created (kind + key identify it)."""
        if releasers.lookup(kind) is None and not str(data.get("release", "")).startswith("spinbox.shim."):
            raise ValueError(f"unknown resource kind {kind!r} (no releaser; pass "
                             f"release='spinbox.shim.<module>:<function>')")
        existing = self.find(kind, key)
        if existing is not None:
            existing.data.update(data, owner=owner)
            self.save()
            return existing
        entry = {"kind": kind, "key": key, "owner": owner, **data}
        self.doc["resources"].append(entry)
        self.save()
        return Record(self, entry)

    @contextlib.asynccontextmanager
    async def recording(self, kind: str, key: str, *, owner: str = "",
                        **data: Any) -> AsyncIterator[Record]:
        """`async with state.recording("mount", path, path=path): mount(...)` — recorded before
        the body runs; if the body fails, the (maybe half-made) resource is released and
        forgotten."""
        rec = self.record(kind, key, owner=owner, **data)
        try:
            yield rec
        except BaseException:
            try:
                await release(rec.data)
                self.forget(kind, key)
            except Exception as e:  # keep it recorded: delete will retry
                log.warning("releasing %s %s after a failed create: %s", kind, key, e)
            raise

    def forget(self, kind: str, key: str) -> None:
        """The resource is gone (released by its owner): drop the record."""
        before = len(self.doc["resources"])
        self.doc["resources"] = [r for r in self.doc["resources"]
                                 if not (r["kind"] == kind and r["key"] == key)]
        if len(self.doc["resources"]) != before:
            self.save()

    def remove_files(self) -> None:
        """Remove state.json and the group dir (what it holds: options, fallback log)."""
        shutil.rmtree(self.paths.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.paths.dir.parent.rmdir()   # the namespace dir, if now empty


# ---------------------------------------------------------------------------------------------
# releasing (how is up to each kind's owner: shim.releasers)

def _named_releaser(target: str) -> Callable[[dict[str, Any]], Any]:
    """A record's own `release = "spinbox.shim.<module>:<function>"` (older shims wrote one for
    their network records): only functions of the shim itself, never one a state file names."""
    mod, _, func = target.partition(":")
    if not mod.startswith("spinbox.shim.") or not func:
        raise StateError(f"refusing releaser {target!r}: must be spinbox.shim.<module>:<function>")
    fn: Callable[[dict[str, Any]], Any] = getattr(importlib.import_module(mod), func)
    return fn


async def release(r: dict[str, Any]) -> str:
    """Release one recorded resource (idempotent); returns what was done. The kind's registered
    releaser wins; a `release` field is used only for a kind that nobody registers."""
    fn = releasers.lookup(str(r.get("kind", "")))
    if fn is not None:
        return await fn(r)
    target = r.get("release")
    if target:
        res = _named_releaser(str(target))(r)
        if inspect.isawaitable(res):
            res = await res
        return str(res)
    raise StateError(f"no releaser for resource kind {r.get('kind')!r}")


@dataclass
class CleanupReport:
    done: list[str]
    failed: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed


async def cleanup_all(state: State, *, owner: str | None = None) -> CleanupReport:
    """Release every recorded resource (or only `owner`'s), newest first, each independently:
    one failure does not stop the others. Released ones are forgotten; failed ones stay recorded
    so a later `delete` can retry."""
    report = CleanupReport([], [])
    for entry in reversed(list(state.doc["resources"])):
        if owner is not None and entry.get("owner", "") != owner:
            continue
        what = f"{entry.get('kind')} {entry.get('key')}"
        try:
            report.done.append(await release(entry))
        except Exception as e:
            report.failed.append(f"{what}: {e}")
            log.warning("cleanup of %s failed: %s", what, e)
            continue
        state.doc["resources"].remove(entry)
        if state.paths.state_file.exists():
            state.save()
    return report
