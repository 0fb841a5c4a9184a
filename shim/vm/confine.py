"""Confinement of the VM's host processes: QEMU's resource limits, virtiofsd's sandbox.

Facts on the development host (Debian 12; checked with `--help` and /proc/<pid>/status):
- /usr/lib/qemu/virtiofsd is the C virtiofsd of QEMU 7.2: `-o sandbox=namespace|chroot`
  (default namespace), always its built-in seccomp filter (no option to turn it off),
  `-o modcaps=-cap:...` removes capabilities from the set it keeps, `-o announce_submounts`,
  `--rlimit-nofile=N`, no read-only option. It sandboxes itself only once QEMU connects.
- Kept capabilities: virtiofsd switches to the guest caller's uid/gid per request
  (setresuid/setresgid), so CAP_SETUID/CAP_SETGID stay; CAP_MKNOD (device nodes in a host
  tree) and CAP_SETFCAP (file capabilities a host process could exec with) are removed.
- `-o announce_submounts` is NOT used: with it, a file below a submount of a share (a tmpfs
  inside a bind source) became unreadable in the guest (integration/test_ctr_run.py::
  test_a_hostile_guest_cannot_write_through_read_only_shares: `cat` of it failed).
- QEMU gets RLIMIT_CORE 0 (a crash never dumps guest RAM to disk) and a bounded
  RLIMIT_NOFILE. RLIMIT_FSIZE is left alone: a template build has QEMU write a RAM file of
  the guest's memory size and the migration stream (shim/vm/template.py).
"""
from __future__ import annotations

import resource
from collections.abc import Callable

# what QEMU needs: a few dozen fds per device and hot-plugged NIC/virtiofs; 4096 leaves room
QEMU_NOFILE = 4096
VIRTIOFSD_NOFILE = 65536        # one fd per inode the guest holds open / looked up
VIRTIOFSD_DROPPED_CAPS = ("mknod", "setfcap")


def virtiofsd_hardening_args(*, nofile: int = VIRTIOFSD_NOFILE) -> list[str]:
    """virtiofsd options that make its sandbox explicit rather than a default of the build."""
    return ["-o", "sandbox=namespace",
            "-o", "modcaps=" + ":".join(f"-{c}" for c in VIRTIOFSD_DROPPED_CAPS),
            f"--rlimit-nofile={nofile}"]


def qemu_rlimits(nofile: int = QEMU_NOFILE) -> dict[int, tuple[int, int]]:
    """The limits QEMU is started with (resource id -> (soft, hard))."""
    return {resource.RLIMIT_CORE: (0, 0), resource.RLIMIT_NOFILE: (nofile, nofile)}


def set_rlimits(limits: dict[int, tuple[int, int]]) -> None:
    for res, value in limits.items():
        resource.setrlimit(res, value)


def compose_preexec(*steps: Callable[[], None] | None) -> Callable[[], None] | None:
    """One preexec_fn running the given steps in order (None steps skipped; None if none)."""
    real = [s for s in steps if s is not None]
    if not real:
        return None

    def run() -> None:
        for step in real:
            step()
    return run
