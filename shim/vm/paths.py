"""The files one VM owns inside its state directory.

Unix socket paths are limited to 107 bytes (sun_path): a state dir that is too deep is refused
up front with the path in the message, not discovered as an odd QEMU error later.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import HostError

SUN_PATH_MAX = 107
_TAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,36}")


class StatePathError(HostError, ValueError):
    """A VM state directory or device tag that cannot be used (too long for a socket, ...)."""


def check_socket_path(p: Path) -> Path:
    if len(str(p).encode()) > SUN_PATH_MAX:
        raise StatePathError(f"unix socket path too long ({len(str(p).encode())} > {SUN_PATH_MAX} bytes): {p}; "
                             "use a shorter VM state directory")
    return p


@dataclass(frozen=True)
class VMPaths:
    state_dir: Path
    console_log_override: Path | None = None

    def __post_init__(self) -> None:
        for p in (self.qmp_socket, self.agent_socket, self.virtiofs_socket("x" * 36)):
            check_socket_path(p)

    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        """virtio-serial transport: QEMU listens here, the shim connects (and may reconnect)."""
        return self.state_dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.console_log_override or self.state_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout/stderr."""
        return self.state_dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "qemu.pid"

    @property
    def state_file(self) -> Path:
        """vm.json: what crash cleanup needs (pids + start times)."""
        return self.state_dir / "vm.json"

    def virtiofs_socket(self, tag: str) -> Path:
        return self.state_dir / f"vfs-{tag}.sock"

    def virtiofsd_log(self, tag: str) -> Path:
        return self.state_dir / f"vfs-{tag}.log"


def check_tag(tag: str) -> str:
    """virtiofs tags end up in file names and QEMU ids: keep them boring."""
    if not _TAG_RE.fullmatch(tag):
        raise ValueError(f"virtiofs tag must match {_TAG_RE.pattern} (got {tag!r})")
    return tag
