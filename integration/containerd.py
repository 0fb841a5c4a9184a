"""A private containerd for integration tests: own root, state, sockets, config, log.

    with Containerd.create(path_prefix=[shim_bin_dir]) as c:
        c.ctr("images", "import", tar)                  # runs in c.namespace
        c.ctr("run", "--rm", "--fifo-dir", str(c.fifo_dir), image, "t1", "true")

containerd resolves shim binaries on *its own* PATH, so `path_prefix` is how a test makes our
`containerd-shim-spinbox-v1` findable. The TTRPC socket (where shims forward events) is created
by containerd at `<grpc address>.ttrpc` even though the config leaves `[ttrpc] address` empty.

Teardown stops containerd, kills shims that were started for *this* containerd (found by the
`-address <our socket>` argument containerd passes them, killed by pid), unmounts whatever is
still mounted under the temp dir, removes the temp dir, and removes the directories under
/run/containerd that did not exist before and are empty again (ctr and runc shims use those fixed
paths whatever the config says).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# The containerd under test: SPINBOX_TEST_CONTAINERD_BIN=<dir> takes containerd, ctr and the
# runc shim (containerd-shim-runc-v2) from <dir> (the version matrix, docs/testing.md); unset,
# the system's on PATH. The dir also goes first on containerd's PATH (after the test's own
# prefix): containerd looks shims up on its PATH, and runc's must be of the same release.
BIN_DIR_ENV = "SPINBOX_TEST_CONTAINERD_BIN"
BIN_DIR = os.environ.get(BIN_DIR_ENV) or None
BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")
CONTAINERD = os.path.join(BIN_DIR, "containerd") if BIN_DIR else "containerd"
CTR = os.path.join(BIN_DIR, "ctr") if BIN_DIR else "ctr"
# Fixed paths used by ctr (stdio FIFOs) and the runc shim regardless of the configured state dir.
CGROUP_ROOT = Path("/sys/fs/cgroup")
SANDBOX_CGROUP_PARENT = "spinbox"       # shim/vm/hostcgroup.py DEFAULT_PARENT
RUN_DIRS = ("/run/containerd/fifo", "/run/containerd/runc", "/run/containerd/s", "/run/containerd")


class ContainerdError(RuntimeError):
    pass


def missing_prerequisites() -> list[str]:
    """Why a private containerd cannot run here ([] when it can)."""
    why = []
    if os.geteuid() != 0:
        why.append("not running as root")
    if BIN_DIR:
        if not os.path.isdir(BIN_DIR):
            return why + [f"{BIN_DIR_ENV}={BIN_DIR} is not a directory (scripts/fetch-containerd prints them)"]
        for tool in BINARIES:
            if not os.access(os.path.join(BIN_DIR, tool), os.X_OK):
                why.append(f"no executable {tool} in {BIN_DIR_ENV}={BIN_DIR} (scripts/fetch-containerd)")
        return why
    for tool in (CONTAINERD, CTR):
        if shutil.which(tool) is None:
            why.append(f"`{tool}` not found on PATH (Debian package containerd)")
    return why


def containerd_version() -> str:
    """`containerd --version`'s version field of the containerd under test (e.g. 1.6.20~ds1)."""
    r = subprocess.run([CONTAINERD, "--version"], capture_output=True, text=True, timeout=30)
    fields = r.stdout.split()
    if r.returncode != 0 or len(fields) < 3:
        raise ContainerdError(f"{CONTAINERD} --version failed ({r.returncode}): {r.stderr.strip()}")
    return fields[2]


def _config(base: Path, cri: bool, sandbox_image: str | None = None, extra: str = "") -> str:
    """`sandbox_image` goes into the CRI plugin's own table (it cannot be re-opened below);
    `extra` is appended verbatim (e.g. a `...cri".containerd.runtimes.<handler>` table)."""
    disabled = [] if cri else ['"io.containerd.grpc.v1.cri"']
    cri_keys = f'    sandbox_image = "{sandbox_image}"\n' if sandbox_image else ""
    return f"""\
version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = [{", ".join(disabled)}]

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = ""

[debug]
  level = "debug"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
{cri_keys}    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{base}/cni-conf"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{base}/opt"
{extra}"""


class Containerd:
    """One private containerd daemon; see the module docstring."""

    def __init__(self, base: Path, *, path_prefix: Sequence[str | os.PathLike] = (),
                 namespace: str = "spinbox-it", cri: bool = True,
                 env: dict[str, str] | None = None, sandbox_image: str | None = None,
                 extra_config: str = "") -> None:
        self.base = base
        self.namespace = namespace
        self.address = str(base / "containerd.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.config_path = base / "config.toml"
        self.log_path = base / "containerd.log"
        self.fifo_dir = base / "fifo"  # pass as `ctr run --fifo-dir` to keep FIFOs out of /run
        self.path_prefix = [str(p) for p in path_prefix]
        self.cri = cri
        self.extra_env = dict(env or {})
        self.sandbox_image = sandbox_image   # CRI's pause image (must be imported locally)
        self.extra_config = extra_config     # TOML appended to the generated config
        self.proc: subprocess.Popen | None = None
        self._preexisting_run_dirs = {d for d in RUN_DIRS if os.path.exists(d)}
        # runc puts a namespace's containers in cgroups /<namespace>/<id>: the leaves go with
        # each container, the namespace's own dir in every hierarchy is ours to remove
        self._preexisting_cgroups = set(namespace_cgroups(CGROUP_ROOT, namespace))
        self._preexisting_sandbox_cgroups = set(sandbox_cgroups(CGROUP_ROOT))
        self._preexisting_sandbox_parents = set(namespace_cgroups(CGROUP_ROOT, SANDBOX_CGROUP_PARENT))
        self._log_file = None

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create(cls, **kwargs) -> Containerd:
        """Make the temp dir (short path: unix socket paths are limited to 108 bytes) and start."""
        base = Path(tempfile.mkdtemp(prefix="spinbox-ctrd-", dir="/tmp"))
        c = cls(base, **kwargs)
        try:
            c.start()
        except BaseException:
            c.cleanup()
            raise
        return c

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- daemon -----------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([*self.path_prefix, *([BIN_DIR] if BIN_DIR else []),
                                       env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise ContainerdError("containerd already running")
        for d in ("root", "state", "cni-conf", "opt", "fifo"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(_config(self.base, self.cri, self.sandbox_image, self.extra_config))
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [CONTAINERD, "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=self._env(), start_new_session=True,  # a ^C to pytest must not kill it mid-test
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise ContainerdError(f"containerd exited with {self.proc.returncode} during start:\n"
                                      f"{self.log_tail()}")
            r = subprocess.run([CTR, "--address", self.address, "version"], capture_output=True,
                               text=True, timeout=timeout)
            if r.returncode == 0 and "Server:" in r.stdout and os.path.exists(self.ttrpc_address):
                return
            last = r.stderr.strip()
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd at {self.address} did not answer within {timeout}s "
                                      f"(last ctr error: {last})\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no containerd log)"

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL). Shims it started keep running, as in production."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- ctr --------------------------------------------------------------------------------

    def ctr_argv(self, *args: str, namespace: str | None = None) -> list[str]:
        return [CTR, "--address", self.address, "--namespace", namespace or self.namespace,
                *map(str, args)]

    def ctr(self, *args: str, namespace: str | None = None, check: bool = True,
            input: bytes | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ctr against this containerd; raises ContainerdError with ctr's stderr on failure."""
        r = subprocess.run(self.ctr_argv(*args, namespace=namespace), input=input,
                           capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(map(str, args))} failed ({r.returncode}): "
                                  f"{r.stderr.decode(errors='replace').strip()}")
        return r

    def ctr_popen(self, *args: str, namespace: str | None = None, **kwargs) -> subprocess.Popen:
        """A long-running ctr (e.g. `events`); the caller must terminate and wait for it."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.ctr_argv(*args, namespace=namespace), **kwargs)

    # -- teardown ---------------------------------------------------------------------------

    def shim_pids(self) -> list[int]:
        """Processes started for this containerd: their argv carries `-address <our socket>`."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path("/proc", entry, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for i, a in enumerate(argv[:-1]):
                if a == b"-address" and argv[i + 1] == self.address.encode():
                    pids.append(int(entry))
                    break
        return pids

    def _kill_shims(self) -> None:
        pids = self.shim_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")
                    and "Z" not in _proc_state(p)]
            time.sleep(0.05)

    def _unmount_ours(self) -> None:
        prefix = str(self.base) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for mp in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)

    def _remove_run_dirs(self) -> None:
        for d in RUN_DIRS:  # deepest first
            if d in self._preexisting_run_dirs:
                continue
            try:
                os.rmdir(d)
            except OSError:
                pass  # not empty (someone else uses it) or gone

    def cleanup(self) -> None:
        self.stop()
        self._kill_shims()
        self._unmount_ours()
        shutil.rmtree(self.base, ignore_errors=True)
        self._remove_run_dirs()
        remove_cgroups(set(namespace_cgroups(CGROUP_ROOT, self.namespace)) - self._preexisting_cgroups)
        # the host cgroups of sandboxes whose shims were killed above (their owner, the shim's
        # teardown or `delete`, never ran): the leak checks report them before this runs
        remove_cgroups(set(self.new_sandbox_cgroups()))

    def new_sandbox_cgroups(self) -> list[Path]:
        """Sandbox host cgroups (shim/vm/hostcgroup.py) made since create(), and their default
        parent where it is new: the last sandbox to leave removes it."""
        parents = set(namespace_cgroups(CGROUP_ROOT, SANDBOX_CGROUP_PARENT)) - self._preexisting_sandbox_parents
        return sorted((set(sandbox_cgroups(CGROUP_ROOT)) - self._preexisting_sandbox_cgroups) | parents)


def sandbox_cgroups(root: Path) -> list[Path]:
    """Sandbox host cgroups under their default parent, `<hierarchy>/spinbox/spinbox-<id>`."""
    return [d for p in namespace_cgroups(root, SANDBOX_CGROUP_PARENT) for d in p.iterdir()
            if d.is_dir() and d.name.startswith("spinbox-")]


def namespace_cgroups(root: Path, namespace: str) -> list[Path]:
    """`<hierarchy>/<namespace>` cgroup dirs (v1: one per mounted hierarchy; v2: the root)."""
    if not root.is_dir():
        return []
    bases = [root] + [h for h in root.iterdir() if h.is_dir() and not h.is_symlink()]
    return [b / namespace for b in bases if (b / namespace).is_dir()]


def remove_cgroups(dirs: set[Path]) -> list[Path]:
    """rmdir each cgroup dir and its (empty) children, deepest first; a cgroup that still has
    processes is kept. Returns what is left."""
    left = []
    for top in dirs:
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [top]:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
    return left


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"
