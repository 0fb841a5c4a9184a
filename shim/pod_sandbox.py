"""The pod sandbox as containerd 2.x's Sandbox API sees it (`sandboxer = "shim"`): the VM.

containerd's shim sandbox controller (plugins/sandbox in containerd 2.1) drives a shim it
started for the pod with CreateSandbox (the bundle, CRI's PodSandboxConfig as `options`, the
netns CRI ran CNI in) and StartSandbox, then creates the pod's containers through the Task API
(`start` groups them into this daemon by their CRI sandbox-id annotation), and at the end
StopSandbox and ShutdownSandbox. No pause container is made by containerd on this path.

But CRI still writes `/proc/<sandbox pid>/ns/{ipc,uts,pid}` into every container's spec, the
sandbox pid being what StartSandbox answered: the pod's shared namespaces must be held by a
process in the guest. So StartSandbox creates the *pod holder*, a container of this sandbox
(id = the sandbox id) whose init owns the pod's PID, IPC and UTS namespaces and does nothing
but reap orphans; it goes through the container manager like any container (the VM is started
by its create, from the pod's spec: network from the netns, size from the pod's resources,
the host cgroup below the pod's), and its guest pid is the sandbox pid, so a container's
namespace path names a container of this sandbox (shim.spec keeps those).

The holder's bundle is `pod/` inside containerd's sandbox bundle (whose own `rootfs/` must stay
an empty directory: containerd rmdirs it): config.json and a rootfs holding one file, a
178-byte static x86-64 program written below (so no host binary or image is needed), shared
read-only. ShutdownSandbox removes it after the holder's delete (containerd's removal of the
whole bundle covers a crash; the holder's rootfs mount is in the shim's state records).
Its exit is the pod's exit (WaitSandbox); the VM dying reports it exited like any container.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import platform
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from spinbox.api import contract
from spinbox.api._pb.spinbox.cri.v1 import pod_pb2

from .agent import Stats
from .containers import ContainerManager
from .errors import (AlreadyExists, FailedPrecondition, GuestUnavailable, HostError, InvalidArgument, NotFound,
                     Unimplemented)
from .process import Container, ExitInfo, StdioPaths
from .sandbox import Sandbox
from .states import ProcessState, SandboxState

log = logging.getLogger(__name__)

HOLDER_PATH = "/pause"                 # the holder program, in its rootfs
HOLDER_BUNDLE = "pod"                  # the holder's bundle, inside containerd's sandbox bundle
HOLDER_UID = 65534                     # nobody: the holder needs no privilege at all
STOP_WAIT_S = 10.0                     # StopSandbox without a timeout: the holder's exit, then the VM
POD_CONFIG_TYPE = "PodSandboxConfig"   # runtime.v1.PodSandboxConfig (the type URL's last part)
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CRI_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
CRI_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
# containerd's pod-level sizing annotations on a pause spec (shim.sizing reads these)
CRI_RESOURCE_ANNOTATIONS = (("cpu_period", "io.kubernetes.cri.sandbox-cpu-period"),
                            ("cpu_quota", "io.kubernetes.cri.sandbox-cpu-quota"),
                            ("cpu_shares", "io.kubernetes.cri.sandbox-cpu-shares"),
                            ("memory_limit_in_bytes", "io.kubernetes.cri.sandbox-memory"))
# what CRI shows as the pod's state (runtime.v1.PodSandboxState names)
READY, NOT_READY = "SANDBOX_READY", "SANDBOX_NOTREADY"


# ---------------------------------------------------------------------------------------------
# the holder program

def holder_program() -> bytes:
    """A static x86-64 Linux ELF: `for (;;) { if (wait4(-1, 0, 0, 0) < 0) nanosleep(1 s); }`.
    As init of the pod's PID namespace it reaps the orphans re-parented to it (a pod's zombies
    would pile up otherwise), and it ignores every signal but SIGKILL (the kernel's rule for a
    namespace init without handlers). Assembled here by hand: 120 bytes of headers + 58 of code."""
    code = bytes.fromhex(
        "bfffffffff"        # mov edi, -1          pid: any child
        "31f6"              # xor esi, esi         status: NULL
        "31d2"              # xor edx, edx         options: 0 (block)
        "4531d2"            # xor r10d, r10d       rusage: NULL
        "b83d000000"        # mov eax, 61          wait4
        "0f05"              # syscall
        "4885c0"            # test rax, rax
        "79e8"              # jns -24              reaped one: wait again
        "488d3d0b000000"    # lea rdi, [rip+11]    no child (-ECHILD): the timespec below
        "31f6"              # xor esi, esi
        "b823000000"        # mov eax, 35          nanosleep
        "0f05"              # syscall
        "ebd6"              # jmp -42
    ) + struct.pack("<qq", 1, 0)               # struct timespec {1 s, 0 ns}
    base, hdr = 0x400000, 64 + 56
    size = hdr + len(code)
    ehdr = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0,   # 64-bit, LE, v1, SysV
                       2, 0x3E, 1, base + hdr, 64, 0, 0, 64, 56, 1, 0, 0, 0)  # EXEC, x86-64
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X
    return ehdr + phdr + code


# ---------------------------------------------------------------------------------------------
# the request

@dataclass(frozen=True)
class PodRequest:
    """CreateSandbox, checked: what the holder's spec and the VM are made from."""
    sandbox_id: str
    bundle: Path
    netns_path: str = ""                 # "" = CRI's host network (refused for CRI pods)
    config: pod_pb2.PodSandboxConfig = field(default_factory=pod_pb2.PodSandboxConfig)
    annotations: dict[str, str] = field(default_factory=dict)


def parse_pod_config(options: any_pb2.Any | None) -> pod_pb2.PodSandboxConfig:
    """CRI's PodSandboxConfig from CreateSandboxRequest.options (absent: an empty one)."""
    cfg = pod_pb2.PodSandboxConfig()
    if options is None or (not options.type_url and not options.value):
        return cfg
    name = options.type_url.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    if name != POD_CONFIG_TYPE:
        raise InvalidArgument(f"CreateSandbox options: type {options.type_url!r} is not a CRI "
                              f"{POD_CONFIG_TYPE}")
    try:
        cfg.ParseFromString(options.value)
    except DecodeError as e:
        raise InvalidArgument(f"CreateSandbox options: not a valid {POD_CONFIG_TYPE}: {e}") from None
    return cfg


def pod_request(sandbox_id: str, bundle_path: str, netns_path: str, options: any_pb2.Any | None,
                annotations: dict[str, str], has_rootfs: bool) -> PodRequest:
    problem = contract.id_problem(sandbox_id)
    if problem is not None:
        raise InvalidArgument(f"invalid sandbox id {sandbox_id!r}: {problem}")
    if has_rootfs:
        raise Unimplemented("CreateSandbox with rootfs mounts: a spinbox sandbox is its VM, it runs no image")
    if not bundle_path.startswith("/"):
        raise InvalidArgument(f"bundle path {bundle_path!r} is not absolute")
    bundle = Path(bundle_path)
    if not (bundle / "rootfs").is_dir():
        raise InvalidArgument(f"bundle {bundle_path} has no rootfs directory (containerd makes one)")
    if netns_path and not netns_path.startswith("/"):
        raise InvalidArgument(f"netns path {netns_path!r} is not absolute")
    return PodRequest(sandbox_id, bundle, netns_path, parse_pod_config(options), dict(annotations))


def _cgroups_path(parent: str, sandbox_id: str) -> str:
    # As containerd's CRI names a pause container's cgroup: shim.vm.hostcgroup takes its parent.
    if parent.endswith(".slice"):
        return f"{parent}:cri-containerd:{sandbox_id}"
    return "/" + "/".join(p for p in (*parent.strip("/").split("/"), sandbox_id) if p)


def pod_spec(req: PodRequest, *, readonly: bool = True) -> dict[str, Any]:
    """The holder's OCI spec; also the spec the VM is started from (network, size, cgroup).
    `readonly`: the holder's rootfs is shared read-only (a host bind: root only; tests without
    root say False)."""
    cfg = req.config
    annotations = {**cfg.annotations, **req.annotations}
    if cfg.linux.HasField("resources"):
        res = cfg.linux.resources
        for attr, key in CRI_RESOURCE_ANNOTATIONS:
            annotations[key] = str(getattr(res, attr))
    annotations.update({CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: req.sandbox_id,
                        CRI_SANDBOX_NAME: cfg.metadata.name, CRI_SANDBOX_NAMESPACE: cfg.metadata.namespace,
                        CRI_SANDBOX_UID: cfg.metadata.uid})
    namespaces: list[dict[str, str]] = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if req.netns_path:
        namespaces.append({"type": "network", "path": req.netns_path})
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                        "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
        "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    }
    if cfg.linux.cgroup_parent:
        linux["cgroupsPath"] = _cgroups_path(cfg.linux.cgroup_parent, req.sandbox_id)
    if cfg.linux.sysctls:
        # the pod's, as on a pause container: runc sets the IPC ones in the holder's namespace
        # (the pod's); the guest agent sets net.* in the VM's network namespace (the pod's)
        linux["sysctl"] = dict(cfg.linux.sysctls)
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": HOLDER_UID, "gid": HOLDER_UID}, "args": [HOLDER_PATH],
                    "env": [], "cwd": "/", "noNewPrivileges": True,
                    "capabilities": {"bounding": [], "effective": [], "permitted": []}},
        "root": {"path": "rootfs", "readonly": readonly},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc",
                    "options": ["nosuid", "noexec", "nodev"]},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "strictatime", "mode=755", "size=64k"]}],
        "annotations": annotations,
        "linux": linux,
    }
    if cfg.hostname:
        spec["hostname"] = cfg.hostname
    return spec


def holder_bundle(req: PodRequest) -> Path:
    return req.bundle / HOLDER_BUNDLE


def write_holder_bundle(bundle: Path, spec: dict[str, Any]) -> None:
    """`bundle`/config.json and `bundle`/rootfs/pause (made fresh: a retried start rewrites them)."""
    (bundle / "rootfs").mkdir(mode=0o711, parents=True, exist_ok=True)
    fd = os.open(bundle / "config.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    prog = bundle / "rootfs" / HOLDER_PATH.lstrip("/")
    fd = os.open(prog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o755)
    with os.fdopen(fd, "wb") as f:
        f.write(holder_program())
    os.chmod(prog, 0o755)


def remove_holder_bundle(bundle: Path) -> None:
    """After the holder's delete released its rootfs: never removes through a mount."""
    root = bundle / "rootfs"
    if os.path.ismount(root):
        raise HostError(f"{root} is still mounted: the holder's bundle is left for containerd")
    shutil.rmtree(bundle, ignore_errors=True)


def guest_platform() -> tuple[str, str]:
    """(os, architecture) of the guest, in OCI's words: the holder program is x86-64 only."""
    machine = platform.machine()
    if machine not in ("x86_64", "amd64"):
        raise Unimplemented(f"the Sandbox API needs an x86-64 host and guest (this host is {machine})")
    return "linux", "amd64"


# ---------------------------------------------------------------------------------------------
# the lifecycle

class PodState(enum.Enum):
    NEW = "new"
    CREATED = "created"          # CreateSandbox: checked and kept, nothing booted
    RUNNING = "running"          # StartSandbox: the VM and the holder run
    STOPPED = "stopped"          # StopSandbox, or the holder/VM died: the VM is stopped
    SHUT_DOWN = "shut down"      # ShutdownSandbox: the holder is deleted, the daemon exits


@dataclass
class PodStatus:
    state: str
    pid: int
    created_at_ns: int
    exited_at_ns: int
    info: dict[str, str]


class PodSandbox:
    """The Sandbox API's lifecycle over the shim's container manager (the one sandbox
    lifecycle: the VM is the manager's, started by the holder's create)."""

    def __init__(self, sandbox_id: str, manager: ContainerManager, *, stop_wait_s: float = STOP_WAIT_S,
                 readonly_rootfs: bool = True) -> None:
        self.id = sandbox_id
        self.readonly_rootfs = readonly_rootfs
        self.manager = manager
        self.stop_wait_s = stop_wait_s
        self.state = PodState.NEW
        self.request: PodRequest | None = None
        self.holder: Container | None = None
        self.created_at_ns = 0
        self._lock = asyncio.Lock()

    def check(self, sandbox_id: str) -> None:
        """Each RPC names the sandbox: this daemon serves one."""
        if sandbox_id != self.id:
            raise NotFound(f"sandbox {sandbox_id!r} is not served by this shim (it serves {self.id!r})")

    def _require_started(self, what: str) -> Container:
        if self.state in (PodState.NEW, PodState.CREATED) or self.holder is None:
            raise FailedPrecondition(f"sandbox {self.id} is {self.state.value}: {what} needs StartSandbox first")
        return self.holder

    @property
    def _sandbox(self) -> Sandbox | None:
        return self.manager.sandbox

    async def create(self, req: PodRequest) -> None:
        async with self._lock:
            if self.state is not PodState.NEW:
                raise AlreadyExists(f"sandbox {self.id} already exists ({self.state.value})")
            pod_spec(req)               # a request the spec cannot be made from fails here
            self.request = req
            self.state = PodState.CREATED
            log.info("sandbox %s created (netns %s)", self.id, req.netns_path or "none")

    async def start(self) -> tuple[int, int]:
        """Boot the VM and run the holder; (its guest pid, created at ns)."""
        async with self._lock:
            if self.state is not PodState.CREATED or self.request is None:
                raise FailedPrecondition(f"sandbox {self.id} is {self.state.value}: StartSandbox needs "
                                         "a created sandbox that was never started")
            req = self.request
            bundle = holder_bundle(req)
            await asyncio.to_thread(write_holder_bundle, bundle, pod_spec(req, readonly=self.readonly_rootfs))
            c = await self.manager.create(self.id, bundle, StdioPaths(), [])
            try:
                pid = await self.manager.start(c, c.init)
            except BaseException:
                await self._discard(c)
                raise
            self.manager.announced(c.init)      # its exit may be published from now on
            self.holder = c
            self.created_at_ns = time.time_ns()
            self.state = PodState.RUNNING
            log.info("sandbox %s started: holder pid %d in the guest", self.id, pid)
            return pid, self.created_at_ns

    async def _discard(self, c: Container) -> None:
        """Delete a holder whose start failed (killed first if it runs; one the guest started
        but whose reply was lost goes with the VM at ShutdownSandbox)."""
        try:
            if c.init.state is ProcessState.RUNNING:
                await self.manager.kill(c, c.init, 9, True)
                await asyncio.wait_for(c.init.wait(), self.stop_wait_s)
            await self.manager.delete(c, c.init)
        except Exception as e:
            log.warning("sandbox %s: deleting the holder that failed to start: %s", self.id, e)

    async def stop(self, timeout_s: float = 0.0) -> None:
        """SIGKILL the holder (the pod's namespaces go with it), wait for its exit (bounded),
        stop the VM. Containers still running are then reported exited (shim.exits)."""
        async with self._lock:
            holder = self._require_started("StopSandbox")
            if self.state is PodState.RUNNING:
                await self._stop(holder, timeout_s or self.stop_wait_s)
            self.state = PodState.STOPPED if self.state is PodState.RUNNING else self.state

    async def _stop(self, holder: Container, wait_s: float) -> None:
        if holder.init.exit is None and not self.manager.sandbox_lost:
            try:
                await self.manager.kill(holder, holder.init, 9, True)
                await asyncio.wait_for(holder.init.wait(), wait_s)
            except Exception as e:        # the VM stop below ends it in any case
                log.warning("sandbox %s: the holder did not exit after SIGKILL: %s", self.id, e)
        sb = self._sandbox
        live = [p for c in list(self.manager.containers.values()) for p in c.processes()
                if p.exit is None and p.allows("kill")]
        if not live:
            # a stop on purpose, not a lost VM: nothing for the event follower to report
            self.manager.closing = True
        if sb is not None:
            await sb.stop()
        if live:        # the follower reports them exited once it sees the VM gone
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(asyncio.shield(p.wait()) for p in live)), wait_s)
        self.manager.closing = True         # no container may be created in a stopped pod
        log.info("sandbox %s stopped", self.id)

    async def wait(self) -> ExitInfo:
        """The holder's exit: StopSandbox, or the VM or the holder died."""
        holder = self._require_started("WaitSandbox")
        return await holder.init.wait()

    def status(self, verbose: bool = False) -> PodStatus:
        holder = self.holder
        sb = self._sandbox
        running = (self.state is PodState.RUNNING and holder is not None and holder.init.exit is None
                   and sb is not None and sb.state is SandboxState.READY)
        exit = holder.init.exit if holder is not None else None
        info = {"state": self.state.value}
        if verbose and sb is not None:
            info["vm"] = sb.state.value
            info["start"] = sb.start_kind
            vm = getattr(getattr(sb, "guest", None), "vm", None)
            if vm is not None and vm.pid:
                info["qemu_pid"] = str(vm.pid)
        return PodStatus(READY if running else NOT_READY, holder.init.pid if holder is not None else 0,
                         self.created_at_ns, exit.at_ns if exit is not None else 0, info)

    def ping(self) -> None:
        self._require_started("PingSandbox")
        if self.status().state != READY:
            raise GuestUnavailable(f"sandbox {self.id} is not running ({self.state.value})")

    async def metrics(self) -> Stats:
        """The pod's usage: the sum over its running containers (the holder's included) of what
        the guest measures in their cgroups. Limits stay 0: the pod's ceiling is the VM's size,
        not a cgroup limit."""
        self._require_started("SandboxMetrics")
        if self.status().state != READY:
            raise GuestUnavailable(f"sandbox {self.id} is not running ({self.state.value})")
        live = [c for c in list(self.manager.containers.values()) if c.init.pid and c.init.exit is None]
        got = await asyncio.gather(*(self.manager.stats(c) for c in live), return_exceptions=True)
        stats = [s for s in got if isinstance(s, Stats)]
        return Stats(sum(s.cpu_usage_ns for s in stats), sum(s.cpu_user_ns for s in stats),
                     sum(s.cpu_system_ns for s in stats), sum(s.memory_usage_bytes for s in stats), 0,
                     sum(s.pids_current for s in stats), 0, sum(s.oom_kills for s in stats), b"")

    async def shutdown(self) -> None:
        """Stop (if running) and delete the holder: after this the daemon may exit."""
        async with self._lock:
            holder = self.holder
            if holder is not None and self.state is PodState.RUNNING:
                await self._stop(holder, self.stop_wait_s)
            if holder is not None and holder.id in self.manager.containers:
                await self.manager.delete(holder, holder.init)
            if self.request is not None:
                try:
                    await asyncio.to_thread(remove_holder_bundle, holder_bundle(self.request))
                except HostError as e:
                    log.warning("sandbox %s: %s", self.id, e)
            self.state = PodState.SHUT_DOWN
            log.info("sandbox %s shut down", self.id)
