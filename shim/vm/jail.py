"""QEMU's jail: a uid of its own per sandbox, a root holding only what QEMU reads, no way back.

`jail_spec()` says (as pure data, unit tested) what the launcher (`jail_exec.py`, exec'd in
QEMU's place with the same pid) builds before it execs QEMU; `launcher_argv()` wraps QEMU's
argv in it. The shim does everything that needs a host path or root before that and hands QEMU
fds: the QMP and agent listening sockets (qemu_args `qmp_fd`/`agent_fd`), the console, TAPs,
the template's state and RAM (a memfd), virtiofsd's connection (devices.add_virtiofs) and hot
plugged disks (an fdset). So the jailed QEMU can write no file and reach no socket by path.

Why not QEMU's own `-runas`/`-chroot`: they act after QEMU has initialised as root (all its
device and option parsing runs privileged), and `-runas` dies with SIGSYS under our
`-sandbox ...,elevateprivileges=deny` (the seccomp filter is in force before it calls setuid).
Dropping before exec keeps that seccomp option as it is and QEMU never runs as root at all.

Per-sandbox uids come from `uids.allocate_uid` (a flock per slot, like vsock CIDs): one QEMU
can neither signal nor ptrace nor read /proc of another sandbox's QEMU.

Not jailed: template builds (shim/guest.py `boot_template_guest`): QEMU writes the template's
RAM file there, and the guest runs only our own image (no sandbox workload, no sandbox data).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HostError
from .config import VMConfig

LAUNCHER = str(Path(__file__).with_name("jail_exec.py"))
# read-only at the same path inside: the QEMU binary, its libraries, firmware, modules; the
# guest kernel and image usually live below /usr/share/spinbox too
BASE_TREES = ("/usr",)
MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib64")
BASE_FILES = ("/etc/ld.so.cache",)   # the loader's cache (it falls back to a slow search)
BASE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom", "/dev/random")
KVM_DEVICE = "/dev/kvm"


class JailError(HostError):
    """QEMU cannot be jailed as configured on this host."""


@dataclass(frozen=True)
class JailSpec:
    root: str                                  # an empty host dir the new root is mounted on
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    read_only: tuple[str, ...] = ()            # dirs and files bound read-only, noexec
    executable: tuple[str, ...] = ()           # bound read-only, exec allowed (QEMU, its libraries)
    symlinks: tuple[tuple[str, str], ...] = ()  # (link, target) made in the new root
    devices: tuple[str, ...] = ()
    rlimits: dict[str, tuple[int, int]] = field(default_factory=dict)
    parent: int | None = None                  # the shim: QEMU gets SIGKILL when it dies

    def to_json(self) -> str:
        return json.dumps({"root": self.root, "uid": self.uid, "gid": self.gid, "groups": list(self.groups),
                           "read_only": list(self.read_only), "executable": list(self.executable),
                           "symlinks": [list(x) for x in self.symlinks],
                           "devices": list(self.devices), "rlimits": {k: list(v) for k, v in self.rlimits.items()},
                           "parent": self.parent}, separators=(",", ":"))


def _covered(path: str, trees: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in trees)


def host_layout(root: str = "/") -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(symlinks, extra read-only trees) for the top-level dirs QEMU's loader needs: merged-/usr
    hosts have /lib -> usr/lib and so on (made as links), others have real dirs (bound)."""
    links, trees = [], []
    for top in MERGED_USR_LINKS:
        p = os.path.join(root, top.lstrip("/"))
        if os.path.islink(p):
            links.append((top, os.readlink(p)))
        elif os.path.isdir(p):
            trees.append(top)
    return tuple(links), tuple(trees)


def qemu_rlimits(config: VMConfig, nofile: int) -> dict[str, tuple[int, int]]:
    """No core dumps (guest RAM), bounded fds, and files no larger than the biggest memory
    backend QEMU sizes itself (the boot RAM memfd, the virtio-mem room, a pc-dimm): the jail
    has no writable file, so this bounds only what an fd QEMU holds could be grown to."""
    biggest = max(config.memory_mb, config.hotplug_memory_mb or 0) << 20
    return {"RLIMIT_CORE": (0, 0), "RLIMIT_NOFILE": (nofile, nofile),
            "RLIMIT_FSIZE": (biggest, biggest)}


def jail_spec(config: VMConfig, *, root: str | os.PathLike[str], uid: int, accel: str,
              nofile: int, parent: int | None, extra_files: tuple[str, ...] = ()) -> JailSpec:
    """What QEMU's root holds for this VM. Raises JailError when it cannot work here (the
    message says why; the caller decides whether to run QEMU unjailed)."""
    links, trees = host_layout()
    executable = [t for t in (*BASE_TREES, *trees) if os.path.isdir(t)]
    binary = resolve_binary(config.qemu_binary)
    if not _covered(binary, executable) or not _covered(os.path.realpath(binary), executable):
        executable.append(binary)
    read_only: list[str] = []
    wanted = [str(config.kernel), *(str(p) for p in (config.initrd, config.root_disk) if p is not None),
              *BASE_FILES, *extra_files]
    for f in wanted:
        if not os.path.isabs(f):
            raise JailError(f"a jailed QEMU needs absolute paths: {f!r}")
        real = os.path.realpath(f)
        if not os.path.exists(real):
            if f in BASE_FILES:
                continue
            raise JailError(f"{f} does not exist")
        if not _covered(f, executable) or not _covered(real, executable):
            read_only.append(f)
    devices = [d for d in BASE_DEVICES if os.path.exists(d)]
    groups: tuple[int, ...] = ()
    if accel == "kvm":
        st = os.stat(KVM_DEVICE)
        if not stat.S_ISCHR(st.st_mode):
            raise JailError(f"{KVM_DEVICE} is not a character device")
        if st.st_mode & 0o060 != 0o060 or st.st_gid == 0:
            raise JailError(f"{KVM_DEVICE} is mode {stat.filemode(st.st_mode)} group {st.st_gid}: an unprivileged "
                            "QEMU needs it read-write for a non-root group (the kvm group, as udev sets it)")
        devices.append(KVM_DEVICE)
        groups = (st.st_gid,)
    return JailSpec(root=os.fspath(root), uid=uid, gid=uid, groups=groups, read_only=tuple(read_only),
                    executable=tuple(executable), symlinks=links, devices=tuple(devices), rlimits=qemu_rlimits(config, nofile), parent=parent)


def resolve_binary(binary: str) -> str:
    """The absolute path exec would run (the launcher execs by path, with no PATH search)."""
    if os.path.isabs(binary):
        return binary
    found = shutil.which(binary)
    if found is None:
        raise JailError(f"QEMU binary {binary!r} not found on PATH")
    return found


def launcher_argv(spec: JailSpec, qemu_argv: list[str]) -> list[str]:
    """The command that runs `qemu_argv` in the jail (the same pid, exec'd at the end)."""
    return [sys.executable, "-I", "-S", LAUNCHER, spec.to_json(), "--", resolve_binary(qemu_argv[0]),
            *qemu_argv[1:]]
