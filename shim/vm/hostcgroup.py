"""A host cgroup per sandbox holding its QEMU and virtiofsd, limited from the VM's size.

Why: the VM's host processes are what a sandbox really costs the node; in a cgroup of their
own (under the pod's cgroup under CRI) the node's accounting and eviction see it, and a
runaway QEMU is bounded by the kernel, not by our goodwill.

Where: `<parent>/spinbox-<sandbox>`. The parent is the pod's cgroup when the first container
is a CRI sandbox (the parent of its `linux.cgroupsPath`, cgroupfs `/a/b/<id>` or systemd
`x.slice:prefix:name`), else `confinement.host_cgroup_parent` (default `/spinbox`). Every path
from a spec is checked (`cgroup_rel_path`): plain components only, no `.`/`..`, bounded, so it
stays below the cgroup mount.

Hierarchies (`detect`): cgroup v2 unified at /sys/fs/cgroup (one dir; `memory.max`,
`cpu.max`, `pids.max`; the controllers are enabled on each parent's `cgroup.subtree_control`),
or v1 (hybrid hosts, such as the development host: one dir per controller, `memory`, `cpu`,
`pids`; `memory.limit_in_bytes`, `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `pids.max`).

Joining: `subprocess` cannot spawn into a cgroup (no CLONE_INTO_CGROUP), so the VM layer
writes each child's pid to `cgroup.procs` right after the spawn returns (`join`), before
QEMU boots the guest: only what QEMU allocates in its first milliseconds stays charged to the
shim's cgroup (charges do not move with a process).

Limits (`limits_for`): memory = guest RAM + `MEMORY_OVERHEAD_MB` (QEMU's own memory under TCG,
mostly the translation cache, measured at 144 MiB PSS for a 256 MiB guest; virtiofsd ~2 MiB
each; the margin is 2.5x the measurement so QEMU is never OOM-killed in normal runs);
cpu = vCPUs + 1 (QEMU's main loop and I/O threads); pids = `PIDS_BASE` + `PIDS_PER_VCPU` per
vCPU (QEMU's worker pool, each virtiofsd's thread pool). They follow a resize.

Owner: the sandbox; recorded in the group's state (kind `cgroup`) before it is made;
`release_cgroup_record` (stop, and `delete` after a crashed shim) kills what is left in it and
removes the dirs, and the default parent once no sandbox is left in it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinbox.shim import releasers
from spinbox.shim.errors import HostError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
# accounting only, where v1 mounts it apart from cpu: CRI's pod CPU stats read it (after the
# required ones, so limit_files' indexes hold; skipped where absent or the same dir as cpu's)
V1_OPTIONAL = ("cpuacct",)
V2_CONTROLLERS = ("memory", "cpu", "pids")
MiB = 1024 * 1024
MEMORY_OVERHEAD_MB = 384
CPU_PERIOD_US = 100_000
PIDS_BASE = 512
PIDS_PER_VCPU = 32
DEFAULT_PARENT = "/spinbox"
_COMPONENT = re.compile(r"[A-Za-z0-9_.@:+-]{1,255}")
_MAX_DEPTH = 32
_MAX_PATH = 4096
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"


class HostCgroupError(HostError):
    """A cgroup path from a spec or the config is refused, or a cgroup could not be made."""


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    cpu_quota_us: int
    cpu_period_us: int
    pids: int


def limits_for(vcpus: int, memory_mb: int) -> CgroupLimits:
    """The limits of a VM of `vcpus` and `memory_mb` of guest RAM (its current size)."""
    if vcpus < 1 or memory_mb < 1:
        raise HostCgroupError(f"a VM of {vcpus} vCPUs and {memory_mb} MiB has no cgroup limits")
    return CgroupLimits(memory_bytes=(memory_mb + MEMORY_OVERHEAD_MB) * MiB,
                        cpu_quota_us=(vcpus + 1) * CPU_PERIOD_US, cpu_period_us=CPU_PERIOD_US,
                        pids=PIDS_BASE + PIDS_PER_VCPU * vcpus)


# ---------------------------------------------------------------------------------------------
# paths

def cgroup_rel_path(path: str, what: str = "cgroup path") -> str:
    """`path` (absolute, cgroupfs style) as a checked path relative to a hierarchy's root."""
    if not isinstance(path, str) or not path.startswith("/") or len(path) > _MAX_PATH:
        raise HostCgroupError(f"{what} {path!r}: must be an absolute path of at most {_MAX_PATH} bytes")
    parts = [p for p in path.split("/") if p]
    if len(parts) > _MAX_DEPTH:
        raise HostCgroupError(f"{what} {path!r}: deeper than {_MAX_DEPTH}")
    for p in parts:
        if p in (".", "..") or not _COMPONENT.fullmatch(p):
            raise HostCgroupError(f"{what} {path!r}: component {p[:40]!r} refused "
                                  "(letters, digits, _.@:+- only; no . or ..)")
    return "/".join(parts)


def systemd_slice_path(slice_name: str) -> str:
    """systemd's nesting of a slice name: `a-b-c.slice` is /a.slice/a-b.slice/a-b-c.slice."""
    if slice_name == "-.slice":
        return "/"
    stem = slice_name.removesuffix(".slice")
    words = stem.split("-")
    if stem == slice_name or not all(re.fullmatch(r"[A-Za-z0-9_.@:+]+", w) for w in words):
        raise HostCgroupError(f"cgroupsPath slice {slice_name[:80]!r}: not a systemd slice name")
    return "/" + "/".join("-".join(words[:i + 1]) + ".slice" for i in range(len(words)))


def pod_cgroup(spec: dict[str, Any]) -> str | None:
    """The pod's cgroup (relative, checked) when `spec` is a CRI sandbox's; else None. The
    sandbox container's own cgroupsPath is a child of the pod's cgroup: its parent is taken."""
    annotations = spec.get("annotations") or {}
    if not isinstance(annotations, dict) or annotations.get(CRI_CONTAINER_TYPE) != "sandbox":
        return None
    linux = spec.get("linux") or {}
    raw = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    if not raw:
        return None
    if not isinstance(raw, str):
        raise HostCgroupError(f"linux.cgroupsPath must be a string (got {type(raw).__name__})")
    if raw.startswith("/"):
        rel = cgroup_rel_path(raw, "linux.cgroupsPath")
        return rel.rpartition("/")[0]
    parts = raw.split(":")
    if len(parts) != 3:
        raise HostCgroupError(f"linux.cgroupsPath {raw[:120]!r}: neither /a/b nor slice:prefix:name")
    return cgroup_rel_path(systemd_slice_path(parts[0] or "-.slice"), "linux.cgroupsPath")


# ---------------------------------------------------------------------------------------------
# the host's hierarchies

@dataclass(frozen=True)
class Layout:
    version: int                     # 2 unified, 1 one hierarchy per controller
    roots: tuple[Path, ...]          # v2: (root,); v1: one per V1_CONTROLLERS, same order

    def dirs(self, rel: str) -> tuple[Path, ...]:
        return tuple(r / rel for r in self.roots)


def detect(root: Path = CGROUP_ROOT) -> Layout | str:
    """The usable layout, or why there is none (for `spinbox check` and the log)."""
    controllers = root / "cgroup.controllers"
    if controllers.exists():
        have = set(controllers.read_text().split())
        missing = [c for c in V2_CONTROLLERS if c not in have]
        if missing:
            return f"cgroup v2 at {root} lacks the {', '.join(missing)} controller(s)"
        if not os.access(root / "cgroup.subtree_control", os.W_OK):
            return f"cgroup v2 at {root} is not writable by the shim"
        return Layout(2, (root,))
    roots = tuple(root / c for c in V1_CONTROLLERS)
    missing = [r.name for r in roots if not (r / "cgroup.procs").exists()]
    if missing:
        return f"no cgroup v2 at {root} and no v1 hierarchy for {', '.join(missing)}"
    seen = {os.path.realpath(r) for r in roots}
    for c in V1_OPTIONAL:
        r = root / c
        if (r / "cgroup.procs").exists() and os.path.realpath(r) not in seen:
            roots += (r,)
            seen.add(os.path.realpath(r))
    if not all(os.access(r, os.W_OK) for r in roots):
        return f"the cgroup v1 hierarchies under {root} are not writable by the shim"
    return Layout(1, roots)


def describe(root: Path = CGROUP_ROOT) -> tuple[bool, str]:
    layout = detect(root)
    if isinstance(layout, str):
        return False, layout + ": sandboxes run without a host cgroup"
    return True, (f"cgroup v{layout.version}: QEMU and virtiofsd of each sandbox in "
                  "<parent>/spinbox-<sandbox> with memory, cpu and pids limits")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def limit_files(version: int, limits: CgroupLimits) -> list[tuple[int, str, str]]:
    """(index of the hierarchy dir, file, value) to write for `limits`."""
    if version == 2:
        return [(0, "memory.max", str(limits.memory_bytes)),
                (0, "cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}"),
                (0, "pids.max", str(limits.pids))]
    return [(0, "memory.limit_in_bytes", str(limits.memory_bytes)),
            (1, "cpu.cfs_period_us", str(limits.cpu_period_us)),
            (1, "cpu.cfs_quota_us", str(limits.cpu_quota_us)),
            (2, "pids.max", str(limits.pids))]


# ---------------------------------------------------------------------------------------------
# one sandbox's cgroup

class SandboxCgroup:
    """`<parent>/spinbox-<sandbox>` in each hierarchy of `layout`."""

    def __init__(self, layout: Layout, parent_rel: str, sandbox: str) -> None:
        self.layout = layout
        name = f"spinbox-{sandbox}"
        self.rel = cgroup_rel_path("/" + "/".join(p for p in (parent_rel, name) if p), "sandbox cgroup")
        self.parent_rel = parent_rel
        self.dirs = layout.dirs(self.rel)

    def create(self, limits: CgroupLimits) -> None:
        """Make the dirs (parents too; v2: controllers enabled on the way down), set `limits`."""
        for attempt in range(3):
            try:
                if self.layout.version == 2:
                    self._enable_down(self.layout.roots[0], self.rel.split("/"))
                for d in self.dirs:
                    d.mkdir(parents=True, exist_ok=True)
                break
            except FileNotFoundError as e:
                # another sandbox's teardown removed the shared default parent between our
                # mkdirs (remove_dirs): make it again; once our dir is in, it cannot go
                if attempt == 2:
                    raise HostCgroupError(f"creating {self.rel}: {e}") from None
        self.set_limits(limits)

    @staticmethod
    def _enable_down(root: Path, parts: list[str]) -> None:
        d = root
        for part in parts:
            want = " ".join(f"+{c}" for c in V2_CONTROLLERS)
            try:
                enabled = set((d / "cgroup.subtree_control").read_text().split())
                if not set(V2_CONTROLLERS) <= enabled:
                    _write(d / "cgroup.subtree_control", want)
            except OSError as e:      # a parent with processes of its own (no internal processes)
                raise HostCgroupError(f"cannot enable {want} in {d}/cgroup.subtree_control: {e}") from None
            d = d / part
            d.mkdir(exist_ok=True)

    def set_limits(self, limits: CgroupLimits) -> None:
        for i, name, value in limit_files(self.layout.version, limits):
            try:
                _write(self.dirs[i] / name, value)
            except OSError as e:
                raise HostCgroupError(f"setting {self.dirs[i] / name} to {value}: {e}") from None

    def record_data(self) -> dict[str, Any]:
        return {"dirs": [str(d) for d in self.dirs]}


class CgroupOwner:
    """The host cgroup of one sandbox across its life: made (recorded first) when the sandbox
    starts, limits set again after each resize, removed when it stops. `dirs` is what the VM
    layer joins its children to (empty: no cgroup, the sandbox runs without)."""

    def __init__(self, sandbox: str, vcpus: int, memory_mb: int, *, parent: str = DEFAULT_PARENT,
                 state: Any = None, owner: str = "", root: Path = CGROUP_ROOT) -> None:
        self.sandbox = sandbox
        self.boot_limits = limits_for(vcpus, memory_mb)      # the VM's size at boot
        self.default_parent = cgroup_rel_path(parent, "confinement.host_cgroup_parent") if parent != "/" else ""
        self.state = state
        self.owner = owner
        self.root = root
        self.cgroup: SandboxCgroup | None = None

    @property
    def dirs(self) -> tuple[str, ...]:
        return tuple(str(d) for d in self.cgroup.dirs) if self.cgroup is not None else ()

    def prepare(self, spec: dict[str, Any]) -> None:
        """Make the cgroup for the first container's `spec` (a bad cgroupsPath is refused);
        a host without usable cgroups logs why once and carries on without."""
        parent = pod_cgroup(spec)
        layout = detect(self.root)
        if isinstance(layout, str):
            log.warning("sandbox %s: no host cgroup: %s", self.sandbox, layout)
            return
        cg = SandboxCgroup(layout, self.default_parent if parent is None else parent, self.sandbox)
        if self.state is not None:      # recorded first: `delete` removes it after a crash
            self.state.record("cgroup", cg.rel, owner=self.owner, **cg.record_data())
        self.cgroup = cg
        cg.create(self.boot_limits)
        log.info("sandbox %s: host cgroup %s (v%d)", self.sandbox, cg.rel, layout.version)

    def resized(self, vcpus: int, memory_mb: int) -> None:
        if self.cgroup is not None:
            self.cgroup.set_limits(limits_for(vcpus, memory_mb))

    async def remove(self) -> None:
        cg, self.cgroup = self.cgroup, None
        if cg is None:
            return
        await asyncio.to_thread(remove_dirs, list(cg.dirs), root=self.root)
        if self.state is not None:
            self.state.forget("cgroup", cg.rel)


def join(dirs: tuple[str, ...] | list[str], pid: int) -> None:
    """Move `pid` (a process the shim just spawned) into each of `dirs`."""
    for d in dirs:
        try:
            _write(Path(d) / "cgroup.procs", str(pid))
        except ProcessLookupError:
            return              # it already exited: its own exit is reported elsewhere
        except OSError as e:
            raise HostCgroupError(f"moving pid {pid} into {d}: {e}") from None


def _pids_in(d: Path) -> list[int]:
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def remove_dirs(dirs: list[Path], *, root: Path = CGROUP_ROOT, timeout: float = 5.0) -> list[str]:
    """Kill what is left in each dir, then rmdir it. Only dirs below `root` named spinbox-*
    (a state file never makes us kill elsewhere). Returns what was done."""
    done: list[str] = []
    for d in dirs:
        if root not in d.parents or not d.name.startswith("spinbox-") or ".." in d.parts:
            raise HostCgroupError(f"refusing to remove {d}: not a spinbox cgroup under {root}")
        if not d.exists():
            continue
        deadline = time.monotonic() + timeout
        while True:
            pids = _pids_in(d)
            for pid in pids:      # only ours: QEMU and virtiofsd of this sandbox
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if pids:
                done.append(f"killed {len(pids)} left in {d}")
            try:
                d.rmdir()
                done.append(f"removed {d}")
                break
            except FileNotFoundError:
                break
            except OSError as e:     # EBUSY until the killed processes are gone
                if time.monotonic() > deadline:
                    raise HostCgroupError(f"cannot remove {d}: {e}") from None
                time.sleep(0.02)
        if _is_default_parent(d.parent, root):
            # The default parent is ours (made by the first sandbox): the last one to leave
            # removes it. Not empty (a sibling lives) or gone (a sibling removed it) is fine.
            with contextlib.suppress(OSError):
                d.parent.rmdir()
                done.append(f"removed {d.parent}")
    return done


def _is_default_parent(d: Path, root: Path) -> bool:
    """`<root>/spinbox` (v2) or `<root>/<controller>/spinbox` (v1); never a pod's cgroup or a
    configured parent, which belong to someone else."""
    return d.name == DEFAULT_PARENT.strip("/") and root in (d.parent, d.parent.parent)


@releasers.releaser("cgroup")
async def release_cgroup_record(r: dict[str, Any]) -> str:
    dirs = [Path(d) for d in r.get("dirs") or []]
    done = await asyncio.to_thread(remove_dirs, dirs)
    return f"cgroup {r.get('key')}: " + (", ".join(done) if done else "already gone")
