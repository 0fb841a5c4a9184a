"""Race-free vsock CID allocation across shim processes.

A CID is ours while we hold an exclusive `flock` on `<runtime_dir>/<cid>.lock`: the kernel drops
the lock when the holder dies, so a crashed shim never keeps a CID. Lock files are removed on
release without a race: the releaser unlinks while still holding the lock, and an acquirer that
locked a file which has since been unlinked (inode differs from the path's) just tries again.

Before taking a free lock we also skip CIDs that a live QEMU still uses (an orphan of a crashed
shim whose lock died with it): its command line contains `guest-cid=<N>`. Only a QEMU we could
have started counts -- a process of root or of a jailed QEMU's uid range whose executable is
the configured QEMU binary --
or any user could run `sleep guest-cid=4,...` and make the shim skip (or exhaust) CIDs. Where
/dev/vhost-vsock exists, `probe_vhost=True` additionally asks the kernel (VHOST_VSOCK_SET_GUEST_CID
answers EADDRINUSE for a CID another VM holds, ours or not).
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

from ..errors import HostError
from .config import DEFAULT_QEMU

MIN_CID = 3          # 0-2 are reserved (hypervisor, local, host)
MAX_CID = 0xFFFFFFFE  # U32_MAX is VMADDR_CID_ANY
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60  # _IOW(VHOST_VIRTIO, 0x60, __u64)
DEFAULT_RUNTIME_DIR = "/run/spinbox/vsock-cid"


class CIDExhausted(HostError):
    """No free vsock CID in the configured range."""


class CIDLease:
    """An allocated CID; `release()` (or garbage collection of the fd at exit) frees it."""

    def __init__(self, cid: int, path: Path, fd: int):
        self.cid = cid
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # unlink while locked: a concurrent acquirer of the old inode notices and retries
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> CIDLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"CIDLease(cid={self.cid}, held={self.held})"


def qemu_executables(binaries: Iterable[str]) -> set[str]:
    """The real paths of the QEMU binaries (names are looked up on PATH, as exec does)."""
    out = set()
    for b in binaries:
        path = b if os.path.isabs(b) else shutil.which(b)
        if path:
            out.add(os.path.realpath(path))
    return out


def _is_our_qemu(proc_dir: str, exes: set[str], uids: range = range(0)) -> bool:
    """Owned by root or by a jailed QEMU's uid (`uids`, shim/vm/jail.py) and running one of
    `exes` (a binary replaced since it started reads "<path> (deleted)")."""
    try:
        owner = os.stat(proc_dir).st_uid
        if owner != 0 and owner not in uids:
            return False
        exe = os.readlink(os.path.join(proc_dir, "exe"))
    except OSError:
        return False
    return exe.removesuffix(" (deleted)") in exes


def cids_in_use_by_processes(proc_root: str | Path = "/proc",
                             qemu_binaries: Iterable[str] = (DEFAULT_QEMU,), qemu_uids: range = range(0)) -> set[int]:
    """CIDs named as `guest-cid=N` in the command line of a QEMU of ours (orphaned QEMUs)."""
    exes = qemu_executables(qemu_binaries)
    used: set[int] = set()
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if b"guest-cid=" not in raw or not _is_our_qemu(entry.path, exes, qemu_uids):
            continue
        for arg in raw.split(b"\0"):
            for part in arg.split(b","):
                if part.startswith(b"guest-cid="):
                    try:
                        used.add(int(part[len(b"guest-cid="):]))
                    except ValueError:
                        pass
    return used


def _vhost_cid_free(cid: int, dev: str = "/dev/vhost-vsock") -> bool:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return True  # no vhost-vsock: nothing to ask
    try:
        fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("Q", cid))
        return True
    except OSError as e:
        return e.errno != errno.EADDRINUSE
    finally:
        os.close(fd)  # closing the probe fd frees the CID again


def _try_lock(path: Path) -> int | None:
    """fd holding an exclusive lock on `path`, or None if someone else holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file the previous holder had already unlinked: retry


def allocate_cid(runtime_dir: str | Path = DEFAULT_RUNTIME_DIR, *, start: int = MIN_CID + 1,
                 end: int = 65535, proc_root: str | Path = "/proc", probe_vhost: bool = False,
                 qemu_binaries: Iterable[str] = (DEFAULT_QEMU,), qemu_uids: range = range(0)) -> CIDLease:
    """Lowest free CID in [start, end]. CID 3 is skipped by default (peers saw transient routing
    trouble with it); pass start=3 to allow it. `qemu_binaries`: the configured QEMU (its
    orphans' CIDs are skipped)."""
    if start < MIN_CID or end > MAX_CID or start > end:
        raise ValueError(f"CID range must lie within {MIN_CID}..{MAX_CID} (got {start}..{end})")
    d = Path(runtime_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    busy = cids_in_use_by_processes(proc_root, qemu_binaries, qemu_uids)
    for cid in range(start, end + 1):
        if cid in busy:
            continue
        path = d / f"{cid}.lock"
        fd = _try_lock(path)
        if fd is None:
            continue
        lease = CIDLease(cid, path, fd)
        if probe_vhost and not _vhost_cid_free(cid):
            lease.release()
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return lease
    raise CIDExhausted(f"no free vsock CID in {start}..{end} (locks under {d})")
