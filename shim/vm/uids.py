"""Race-free per-sandbox uids for jailed QEMUs (shim/vm/jail.py), across shim processes.

The same scheme as vsock CIDs (shim/vm/cid.py): uid `base + slot` is ours while we hold an
exclusive flock on `<runtime_dir>/<uid>.lock`; the kernel drops it when the shim dies. A uid
that a live process still runs as (the orphaned QEMU of a crashed shim, before `delete` kills
it) is skipped even if its lock is free: two sandboxes must never share a uid.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import HostError
from .cid import CIDLease, _try_lock

DEFAULT_RUNTIME_DIR = "/run/spinbox/qemu-uid"
# above the ranges Debian, systemd (dynamic users, nspawn containers) and subuid setups hand
# out (`confinement.qemu_uid_base` to move it)
DEFAULT_BASE = 0x70000000
DEFAULT_COUNT = 65536


class UIDExhausted(HostError):
    """Every uid of the configured range is taken."""


class UIDLease(CIDLease):
    @property
    def uid(self) -> int:
        return self.cid


def uids_in_use(lo: int, hi: int, proc_root: str | Path = "/proc") -> set[int]:
    """uids in [lo, hi) that some live process runs as (owner of its /proc dir)."""
    used = set()
    for entry in os.scandir(proc_root):
        if entry.name.isdigit():
            try:
                uid = entry.stat().st_uid
            except OSError:
                continue
            if lo <= uid < hi:
                used.add(uid)
    return used


def allocate_uid(runtime_dir: str | Path = DEFAULT_RUNTIME_DIR, *, base: int = DEFAULT_BASE,
                 count: int = DEFAULT_COUNT, proc_root: str | Path = "/proc") -> UIDLease:
    if base < 1000 or count < 1 or base + count > 0xFFFFFFFF:
        raise ValueError(f"uid range must lie within 1000..2^32-2 (got {base}+{count})")
    d = Path(runtime_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    busy = uids_in_use(base, base + count, proc_root)
    for uid in range(base, base + count):
        if uid in busy:
            continue
        path = d / f"{uid}.lock"
        fd = _try_lock(path)
        if fd is None:
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return UIDLease(uid, path, fd)
    raise UIDExhausted(f"no free QEMU uid in {base}..{base + count - 1} (locks under {d})")
