"""The wire contract between the shim, vminitd and the tests: one place for every rule both
sides of the agent channel must agree on.

Nothing here does I/O; vminitd imports it too, so it stays dependency-free (stdlib only).

* ids: containerd's container and exec ids become guest directory names and runc ids, so both
  sides accept exactly containerd's identifier rule `ID_PATTERN` (checked with `fullmatch`:
  `re.match` with `$` would accept a trailing newline), never `..`, at most ID_MAX_LEN long.
* pids: anything the guest reports is bounded by Linux's PID_MAX_LIMIT.
* SHARES_ROOT: where vminitd mounts CreateRequest.shares (`<root>/<container id>/<target>`).
* version(): the distribution's version, from the installed package metadata.
* timeouts: the defaults for one agent call and for the guest's shutdown.
"""
from __future__ import annotations

import functools
import re

# containerd's own identifier rule (namespaces, containers, execs): alphanumeric runs joined by
# single '.', '_' or '-', at most 76 characters. It cannot spell '..', a separator or a path.
ID_PATTERN = r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*"
ID_MAX_LEN = 76
_ID_RE = re.compile(ID_PATTERN)

PID_MAX = 1 << 22                  # Linux's PID_MAX_LIMIT: no real pid is this large
SHARES_ROOT = "/run/spinbox/shares"

# The guest's OCI runtime, chosen by the shim's config (runtime.oci_runtime) and passed on the
# kernel command line as OCI_RUNTIME_PARAM=<name>; vminitd accepts only these names.
OCI_RUNTIMES = ("runc", "crun")
OCI_RUNTIME_PARAM = "spinbox.oci_runtime"

AGENT_CALL_TIMEOUT_S = 10.0        # one unary agent call (config: timeouts.agent_call_s)
SHUTDOWN_TIMEOUT_S = 5.0           # the guest's own Shutdown before QEMU is stopped


def id_problem(value: object) -> str | None:
    """Why `value` is not a valid container/exec id, or None when it is."""
    if not isinstance(value, str) or not value:
        return "must not be empty"
    if len(value) > ID_MAX_LEN:
        return f"longer than {ID_MAX_LEN} characters"
    if ".." in value:
        return "must not contain '..'"
    if not _ID_RE.fullmatch(value):
        return f"must match {ID_PATTERN}"
    return None


def is_valid_id(value: object) -> bool:
    return id_problem(value) is None


def is_valid_pid(value: object, *, allow_zero: bool = False) -> bool:
    """A pid the guest may report: 1..PID_MAX-1 (0 only where "no process" is meaningful)."""
    return isinstance(value, int) and (0 if allow_zero else 1) <= value < PID_MAX


VERSION_FILE = "VERSION"      # beside this module in the guest image (written by initrd/build.py)


@functools.cache
def version() -> str:
    """The distribution's version. Read on first use (importlib.metadata costs the guest's boot
    time otherwise). The guest image carries the code without the distribution's metadata (and
    without the `email` package importlib.metadata needs): there the image build wrote the host's
    version into VERSION_FILE; "unknown" when neither exists."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
        try:
            return dist_version("spinbox")
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    try:
        from pathlib import Path
        return Path(__file__).with_name(VERSION_FILE).read_text().strip() or "unknown"
    except OSError:
        return "unknown"
