"""Which accelerator and which host↔guest transport this host can really use, and why.

`auto` must never pick something that hangs: this project's hosts expose a nested **PVM** KVM
(`/sys/module/kvm_pvm`, no vmx/svm CPU flags) on which a stock guest kernel either dies with an
emulation failure or spins forever while QEMU keeps running (docs/host-facts.md §1). So KVM
is chosen only when /dev/kvm opens, answers KVM_GET_API_VERSION = 12, and the host is a
hardware-virtualisation host (vmx/svm present, no PVM). Every answer carries a reason string
for logs and `spinbox check`.

The filesystem roots are parameters so tests can point them at a fake tree.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_API_VERSION = 12


@dataclass(frozen=True)
class Choice:
    value: str   # "kvm" / "tcg", or "vsock" / "virtio-serial"
    reason: str

    def __str__(self) -> str:
        return f"{self.value} ({self.reason})"


def _kvm_api_version(fd: int) -> int:
    return fcntl.ioctl(fd, KVM_GET_API_VERSION)


def kvm_status(dev_root: str | Path = "/dev", sys_root: str | Path = "/sys",
               proc_root: str | Path = "/proc",
               api_version: Callable[[int], int] = _kvm_api_version) -> tuple[bool, str]:
    """(usable, reason): can KVM run a stock (non-PVM) guest kernel here?"""
    dev = Path(dev_root) / "kvm"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"{dev} does not exist"
    except OSError as e:
        return False, f"{dev} cannot be opened: {os.strerror(e.errno or 0)}"
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode) and api_version is _kvm_api_version:
            return False, f"{dev} is not a character device"
        try:
            version = api_version(fd)
        except OSError as e:
            return False, f"{dev}: KVM_GET_API_VERSION failed: {os.strerror(e.errno or 0)}"
        if version != KVM_API_VERSION:
            return False, f"{dev}: KVM API version {version}, expected {KVM_API_VERSION}"
    finally:
        os.close(fd)
    if (Path(sys_root) / "module" / "kvm_pvm").exists():
        return False, ("nested PVM KVM (kvm_pvm module loaded): a stock guest kernel hangs or fails "
                       "with an emulation error under it")
    flags = _cpu_flags(Path(proc_root) / "cpuinfo")
    if flags is None:
        return False, f"cannot read {Path(proc_root) / 'cpuinfo'}"
    if not flags & {"vmx", "svm"}:
        return False, "no vmx/svm CPU flag: /dev/kvm is not hardware virtualisation"
    return True, f"{dev} usable (API {KVM_API_VERSION}, {'vmx' if 'vmx' in flags else 'svm'})"


def _cpu_flags(cpuinfo: Path) -> set[str] | None:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def select_accel(requested: str = "auto", **roots: object) -> Choice:
    """Resolve `accel`: an explicit kvm/tcg is honoured (kvm still explains a bad host)."""
    if requested == "tcg":
        return Choice("tcg", "configured")
    usable, why = kvm_status(**roots)  # type: ignore[arg-type]
    if requested == "kvm":
        if not usable:
            raise RuntimeError(f"accel kvm configured but KVM is not usable here: {why}")
        return Choice("kvm", "configured; " + why)
    if requested != "auto":
        raise ValueError(f"accel must be auto, kvm or tcg (got {requested!r})")
    return Choice("kvm", why) if usable else Choice("tcg", why)


def vsock_status(dev_root: str | Path = "/dev") -> tuple[bool, str]:
    """(usable, reason): can QEMU's vhost-vsock-pci get a backend here?"""
    return _vhost_status("vhost-vsock", dev_root)


def vhost_net_status(dev_root: str | Path = "/dev") -> tuple[bool, str]:
    """(usable, reason): can a tap netdev use vhost=on (in-kernel virtio-net backend)?"""
    return _vhost_status("vhost-net", dev_root)


def _vhost_status(name: str, dev_root: str | Path) -> tuple[bool, str]:
    dev = Path(dev_root) / name
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"{dev} does not exist (no {name.replace('-', '_')} in the host kernel)"
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return False, f"{dev} is not accessible: {os.strerror(e.errno)}"
        return False, f"{dev} cannot be opened: {os.strerror(e.errno or 0)}"
    os.close(fd)
    return True, f"{dev} usable"


def select_transport(requested: str = "auto", dev_root: str | Path = "/dev") -> Choice:
    if requested == "virtio-serial":
        return Choice("virtio-serial", "configured")
    usable, why = vsock_status(dev_root)
    if requested == "vsock":
        if not usable:
            raise RuntimeError(f"transport vsock configured but not usable here: {why}")
        return Choice("vsock", "configured; " + why)
    if requested != "auto":
        raise ValueError(f"transport must be auto, vsock or virtio-serial (got {requested!r})")
    return Choice("vsock", why) if usable else Choice("virtio-serial", why)
