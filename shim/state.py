"""Crash-safe record of what one sandbox's shim created on the host.

Layout under `paths.state_dir` (default /run/spinbox):

    <state_dir>/<namespace>/<group>/state.json   what exists (this module)
    <state_dir>/<namespace>/<group>/options.pb   runtime options handed over by `start`
    <state_dir>/<namespace>/<group>.lock         serializes start / delete / daemon exit
    <state_dir>/vm/<hash16>/                     the VM's own dir (short: unix socket paths)

Rule: a resource is recorded *before* it is created (`with state.recording(...)`), and forgotten
only after it was released. So whatever moment the daemon is SIGKILLed at, `cleanup_all()` (run
by the `delete` subcommand) finds every resource that may exist and releases it; releasing one
that was never created is a no-op. Writes are atomic (tmp + fsync + rename + fsync of the dir).

Single writer: while the shim daemon lives it is the only writer of its group's state; `start`
writes before it spawns the daemon and `delete` only after the daemon is gone (both under the
group lock).

Resource kinds and how they are released (`RELEASERS`):

| kind      | data                                  | release                                      |
|-----------|---------------------------------------|----------------------------------------------|
| `mount`   | path                                  | lazy unmount (every mount stacked on path)    |
| `process` | pid, start_time, tag (argv substring) | SIGKILL if pid still has that start time+tag |
| `file`    | path                                  | unlink                                       |
| `socket`  | path, dev, ino                        | unlink if it is still that inode             |
| `dir`     | path                                  | remove the tree                              |
| `netns`   | path                                  | lazy unmount + unlink                        |
| `tap`     | name, netns (path or "")              | `ip link del` (in the netns)                 |
| `vm`      | path (VM state dir)                   | `shim.vm.machine.kill_from_state` + rmdir    |
| any other | release = "spinbox.shim.<mod>:<func>" | that function(record) -> str (e.g. CNI DEL)  |
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinbox.shim.vm import procinfo

log = logging.getLogger("spinbox.shim.state")

STATE_VERSION = 1
MNT_DETACH = 2


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


class GroupLock:
    """An exclusive flock on the group's lock file, safe against the file being removed by the
    previous holder (re-open until the locked inode is the one at the path)."""

    def __init__(self, paths: GroupPaths, timeout: float = 30.0):
        self.path = paths.lock_file
        self.timeout = timeout
        self.fd: int | None = None

    def acquire(self) -> GroupLock:
        deadline = time.monotonic() + self.timeout
        while True:
            # (re)made each round: the previous holder may have removed the namespace dir
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


class StateError(RuntimeError):
    pass


class Record:
    """One recorded resource (a view on the dict inside the state document)."""

    def __init__(self, state: State, data: dict[str, Any]):
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

    def __init__(self, paths: GroupPaths, doc: dict[str, Any] | None = None):
        self.paths = paths
        self.doc: dict[str, Any] = doc or {
            "version": STATE_VERSION, "namespace": paths.namespace, "group": paths.group,
            "daemon": None, "tasks": {}, "resources": [],
        }

    # -- load / save --------------------------------------------------------------------------
    @classmethod
    def load(cls, paths: GroupPaths) -> State | None:
        """The recorded state, or None if there is none."""
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
        if kind not in RELEASERS and not str(data.get("release", "")).startswith("spinbox.shim."):
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

    @contextlib.contextmanager
    def recording(self, kind: str, key: str, *, owner: str = "", **data: Any) -> Iterator[Record]:
        """`with state.recording("mount", path, path=path): mount(...)` — recorded before the
        body runs; if the body fails, the (maybe half-made) resource is released and forgotten."""
        rec = self.record(kind, key, owner=owner, **data)
        try:
            yield rec
        except BaseException:
            try:
                release(rec.data)
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
# releasing

def _decode_mountinfo_path(p: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    return p.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounted(path: str | os.PathLike[str]) -> bool:
    p = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(_decode_mountinfo_path(line.split()[4]) == p for line in f)
    except OSError:
        return False


def unmount_all(path: str | os.PathLike[str]) -> int:
    """Lazily unmount every mount stacked on `path` and below it; returns how many."""
    libc = ctypes.CDLL(None, use_errno=True)
    p = os.path.realpath(path)
    count = 0
    for _ in range(64):   # bounded: stacked mounts
        with open("/proc/self/mountinfo") as f:
            points = [_decode_mountinfo_path(line.split()[4]) for line in f]
        under = sorted((m for m in points if m == p or m.startswith(p + "/")), key=len, reverse=True)
        if not under:
            break
        target = under[0]
        if libc.umount2(target.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                break
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
        count += 1
    return count


def _release_mount(r: dict[str, Any]) -> str:
    n = unmount_all(r["path"])
    return f"unmounted {r['path']} ({n})" if n else f"{r['path']} not mounted"


def _release_process(r: dict[str, Any]) -> str:
    pid, start = r.get("pid"), r.get("start_time")
    if not isinstance(pid, int) or not isinstance(start, int):
        return f"process {r['key']}: never started"
    if procinfo.kill_verified(pid, start, r.get("tag"), timeout=float(r.get("kill_timeout", 2.0))):
        return f"killed {r['key']} pid {pid}"
    return f"process {r['key']} pid {pid} already gone"


def _release_file(r: dict[str, Any]) -> str:
    try:
        os.unlink(r["path"])
        return f"removed {r['path']}"
    except FileNotFoundError:
        return f"{r['path']} already gone"


def _release_socket(r: dict[str, Any]) -> str:
    path = r["path"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path} already gone"
    # a new shim for the same group may have bound a new socket at the same path meanwhile
    if "ino" in r and (st.st_ino, st.st_dev) != (r["ino"], r.get("dev", st.st_dev)):
        return f"{path} belongs to someone else now (kept)"
    os.unlink(path)
    return f"removed {path}"


def _release_dir(r: dict[str, Any]) -> str:
    path = r["path"]
    if not os.path.isabs(path) or path.rstrip("/") in ("", "/run", "/tmp", "/var", "/var/run"):
        return f"refused to remove {path!r}"
    if not os.path.lexists(path):
        return f"{path} already gone"
    unmount_all(path)   # never recurse into something still mounted
    shutil.rmtree(path, ignore_errors=True)
    return f"removed {path}"


def _release_netns(r: dict[str, Any]) -> str:
    path = r["path"]
    n = unmount_all(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        return f"removed netns {path}"
    return f"netns {path} already gone" if not n else f"unmounted netns {path}"


def _release_tap(r: dict[str, Any]) -> str:
    netns = r.get("netns") or ""
    if netns and not os.path.exists(netns):
        return f"tap {r['name']}: netns {netns} gone (so is the tap)"
    argv = ["ip"] + (["-n", os.path.basename(netns)] if netns.startswith("/var/run/netns/")
                     or netns.startswith("/run/netns/") else [])
    if netns and argv == ["ip"]:
        argv = ["nsenter", f"--net={netns}", "ip"]
    res = subprocess.run(argv + ["link", "del", r["name"]], capture_output=True, text=True, timeout=5)
    if res.returncode == 0:
        return f"deleted tap {r['name']}"
    if "Cannot find device" in res.stderr:
        return f"tap {r['name']} already gone"
    raise OSError(f"ip link del {r['name']}: {res.stderr.strip()}")


def _release_vm(r: dict[str, Any]) -> str:
    from spinbox.shim.vm.machine import kill_from_state

    d = Path(r["path"])
    done = kill_from_state(d, timeout=float(r.get("kill_timeout", 2.0)),
                           keep_console_log=bool(r.get("keep_console_log", False)))
    with contextlib.suppress(OSError):
        d.rmdir()
    with contextlib.suppress(OSError):
        d.parent.rmdir()
    return f"vm {d}: " + (", ".join(done) if done else "nothing left")


RELEASERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "mount": _release_mount,
    "process": _release_process,
    "file": _release_file,
    "socket": _release_socket,
    "dir": _release_dir,
    "netns": _release_netns,
    "tap": _release_tap,
    "vm": _release_vm,
}


def release(r: dict[str, Any]) -> str:
    """Release one recorded resource (idempotent); returns what was done."""
    target = r.get("release")
    if target:
        mod, _, func = str(target).partition(":")
        if not mod.startswith("spinbox.shim.") or not func:
            raise StateError(f"refusing releaser {target!r}: must be spinbox.shim.<module>:<function>")
        return str(getattr(importlib.import_module(mod), func)(r))
    fn = RELEASERS.get(r.get("kind", ""))
    if fn is None:
        raise StateError(f"no releaser for resource kind {r.get('kind')!r}")
    return fn(r)


@dataclass
class CleanupReport:
    done: list[str]
    failed: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed


def cleanup_all(state: State, *, owner: str | None = None) -> CleanupReport:
    """Release every recorded resource (or only `owner`'s), newest first, each independently:
    one failure does not stop the others. Released ones are forgotten; failed ones stay recorded
    so a later `delete` can retry."""
    report = CleanupReport([], [])
    for entry in reversed(list(state.doc["resources"])):
        if owner is not None and entry.get("owner", "") != owner:
            continue
        what = f"{entry.get('kind')} {entry.get('key')}"
        try:
            report.done.append(release(entry))
        except Exception as e:
            report.failed.append(f"{what}: {e}")
            log.warning("cleanup of %s failed: %s", what, e)
            continue
        state.doc["resources"].remove(entry)
        if state.paths.state_file.exists():
            state.save()
    return report
