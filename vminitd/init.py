"""PID 1 duties inside the VM: mounts, cgroup2 delegation, hostname, power off.

Only used when os.getpid() == 1. Every mount is skipped when the target is already a mount
point (the image's stage-2 script may have done some of them).
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
CGROUP_CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io")

# (source, target, fstype, options)
BASE_MOUNTS = (
    ("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"]),
    ("sysfs", "/sys", "sysfs", ["nosuid", "nodev", "noexec"]),
    ("devtmpfs", "/dev", "devtmpfs", ["nosuid", "mode=0755"]),
    ("devpts", "/dev/pts", "devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
    ("shm", "/dev/shm", "tmpfs", ["nosuid", "nodev", "mode=1777"]),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", ["nosuid", "nodev", "noexec"]),
    ("tmpfs", "/run", "tmpfs", ["nosuid", "nodev", "mode=0755"]),
    ("tmpfs", "/tmp", "tmpfs", ["nosuid", "nodev", "mode=1777"]),
)


def _mounted_targets() -> set[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            return {line.split()[4] for line in f}
    except OSError:
        return set()


def root_fstype() -> str:
    """Filesystem type of / (the last mount on / wins)."""
    fstype = ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[1] == "/":
                    fstype = parts[2]
    except OSError:
        pass
    return fstype


def mount_base() -> None:
    from . import mounts
    done = _mounted_targets()
    for source, target, fstype, options in BASE_MOUNTS:
        if target in done:
            continue
        os.makedirs(target, exist_ok=True)
        try:
            mounts.mount(source, target, fstype, list(options))
        except OSError as e:
            log.warning(f"warning: {e}")
        if target == "/proc":
            done = _mounted_targets()
    if os.path.exists("/dev/pts/ptmx") and not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")


def delegate_cgroups(root: str = "/sys/fs/cgroup") -> list[str]:
    """Enable the controllers for children of the root cgroup (runc creates /spinbox/<id>)."""
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            available = set(f.read().split())
    except OSError as e:
        log.warning(f"warning: no cgroup2 at {root}: {e}")
        return []
    enabled = []
    for c in CGROUP_CONTROLLERS:
        if c not in available:
            continue
        try:
            with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
                f.write(f"+{c}")
            enabled.append(c)
        except OSError as e:
            log.warning(f"warning: cannot delegate cgroup controller {c}: {e}")
    return enabled


def check_root() -> None:
    fstype = root_fstype()
    if fstype in ("rootfs", "ramfs"):
        log.error("ERROR: / is still the initramfs (rootfs): runc's pivot_root will fail with "
            "'pivot_root .: invalid argument'. The image's /init must switch_root into a tmpfs "
            "or a real root filesystem before exec'ing vminitd.")


def set_hostname(name: str) -> None:
    socket.sethostname(name)


def uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def cmdline() -> dict[str, str]:
    """spinbox.* parameters of the kernel command line."""
    try:
        with open("/proc/cmdline") as f:
            words = f.read().split()
    except OSError:
        return {}
    out = {}
    for w in words:
        if w.startswith("spinbox."):
            k, _, v = w.partition("=")
            out[k] = v
    return out


def setup_pid1() -> None:
    mount_base()
    delegate_cgroups()
    check_root()
    if socket.gethostname() in ("", "(none)", "localhost"):
        set_hostname("spinbox")
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


def power_off(reboot: bool = False) -> None:
    """sync + reboot(2). Never returns when it works."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    os.sync()
    libc.reboot(RB_AUTOBOOT if reboot else RB_POWER_OFF)
    err = ctypes.get_errno()
    raise OSError(err, f"reboot(2) failed: {os.strerror(err)}")
