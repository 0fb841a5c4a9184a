"""Shared helpers of the CRI suites (test_cri.py, test_cri_conformance.py): the REAL containerd
1.6 CRI plugin over gRPC (runtime.v1, the kubelet's API), runtime handler `spinbox` =
`io.containerd.spinbox.v1` beside `runc`, a private CNI network and shim state dir, a local
"pause" image (busybox sleeping forever) as `sandbox_image` in CRI's namespace `k8s.io`.

`cri_environment` is the body of a module-scoped fixture: each suite binds it with
`crienv = pytest.fixture(scope="module", name="crienv")(cri_environment)`. After the suite it
removes the pods the tests left and checks that nothing of ours is left (processes, mounts,
shim state files, host-local leases).

Debugging knobs: SPINBOX_IT_SHIM_DIR=<dir> puts another containerd-shim-spinbox-v1 first on
containerd's PATH; SPINBOX_IT_KEEP_LOG=<file> copies containerd's log (with the shim's) there.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import struct
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

from integration.cninet import TestNet, missing_for_vm_networking
from integration.containerd import Containerd, missing_prerequisites
from integration.images import BUSYBOX_REF, PAUSE_REF, import_busybox
from integration.test_ctr_run import SHARE_DIR, SHIM_BIN_DIR, Env, _comm_is, leftovers, our_processes, wait_until

try:  # the kubelet's API; its wheel pins protobuf~=6.31 but its gencode loads on our protobuf 7
    import grpc
    from cri_api.v1 import api_pb2 as cri
    from cri_api.v1 import api_pb2_grpc as cri_grpc
except ImportError as e:  # pragma: no cover - depends on the venv
    CRI_IMPORT_ERROR: str | None = (
        f"CRI client missing ({e}): .venv/bin/pip install --no-deps container-runtime-interface-api==2.0.1")
else:
    CRI_IMPORT_ERROR = None

HANDLER = "spinbox"
CRI_NAMESPACE = "k8s.io"
RPC_TIMEOUT = 240.0        # a TCG boot (3-8 s) plus a virtiofs hotplug, on a loaded 2-core host


def _cri_net(conf_dir: Path, work: Path) -> TestNet:
    """The pod network CRI sets up from its conf dir."""
    net = TestNet(work, prefix="spbc", conf_dir=conf_dir)
    net.write("10-spinbox-cri.conflist", net.conflist())
    return net


def prerequisites() -> list[str]:
    why = missing_prerequisites() + missing_for_vm_networking(SHARE_DIR)
    if not (SHIM_BIN_DIR / "containerd-shim-spinbox-v1").exists():
        why.append(f"{SHIM_BIN_DIR}/containerd-shim-spinbox-v1 missing (pip install -e .)")
    if CRI_IMPORT_ERROR:
        why.append(CRI_IMPORT_ERROR)
    return why


class Cri:
    """runtime.v1 RuntimeService + ImageService on the private containerd's socket."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.rt = cri_grpc.RuntimeServiceStub(self.channel)
        self.img = cri_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def wait_network_ready(self, timeout: float = 30.0) -> None:
        """CRI loads the conflist asynchronously; RunPodSandbox fails until it has. Right after
        a containerd (re)start the CRI service may answer "server is not initialized yet"
        (UNKNOWN) or be unreachable for a moment: not ready yet, asked again."""
        def ready() -> bool:
            try:
                conds = self.rt.Status(cri.StatusRequest(), timeout=10).status.conditions
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE):
                    return False
                raise
            return any(c.type == "NetworkReady" and c.status for c in conds)
        wait_until(ready, timeout, "CRI to report NetworkReady")

    def exec_sync(self, cid: str, *cmd: str, timeout_s: int = 60) -> cri.ExecSyncResponse:
        return self.rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout_s),
                                timeout=timeout_s + 60)


class Pod:
    """One pod's CRI bookkeeping, so that teardown can remove whatever a failure left. The
    namespace modes and the rest of the pod's config are fixed at construction, so that every
    CreateContainer gets the same sandbox_config as RunPodSandbox did."""

    def __init__(self, log_dir: Path, *, pid: int | None = None, ipc: int | None = None,
                 network: int | None = None, sysctls: dict[str, str] | None = None,
                 dns: cri.DNSConfig | None = None, cgroup_parent: str = "") -> None:
        self.uid = uuid.uuid4().hex
        self.name = f"cri-{self.uid[:6]}"
        self.log_dir = log_dir
        self.id = ""
        self.containers: list[str] = []
        self.pid = cri.CONTAINER if pid is None else pid
        self.ipc = cri.POD if ipc is None else ipc
        self.network = cri.POD if network is None else network
        self.sysctls = dict(sysctls or {})
        self.dns = dns
        self.cgroup_parent = cgroup_parent      # what the kubelet sets (and makes) for every pod

    def namespaces(self, pid: int | None = None, target: str = "") -> cri.NamespaceOption:
        return cri.NamespaceOption(network=self.network, pid=self.pid if pid is None else pid, ipc=self.ipc,
                                   target_id=target)

    def config(self) -> cri.PodSandboxConfig:
        cfg = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=self.name, uid=self.uid, namespace="default", attempt=0),
            hostname=self.name,
            log_directory=str(self.log_dir),
            labels={"app": "spinbox-it"},
            linux=cri.LinuxPodSandboxConfig(
                sysctls=self.sysctls, cgroup_parent=self.cgroup_parent,
                security_context=cri.LinuxSandboxSecurityContext(namespace_options=self.namespaces())))
        if self.dns is not None:
            cfg.dns_config.CopyFrom(self.dns)
        return cfg

    def container_config(self, name: str, *args: str, pid: int | None = None,
                         security: cri.LinuxContainerSecurityContext | None = None,
                         tty: bool = False, target: str = "") -> cri.ContainerConfig:
        """`pid`: this container's PID mode (the pod's by default, as the kubelet sends it);
        `target`: the container whose PID namespace a TARGET mode joins."""
        sc = cri.LinuxContainerSecurityContext()
        if security is not None:
            sc.CopyFrom(security)
        sc.namespace_options.CopyFrom(self.namespaces(pid, target))
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=BUSYBOX_REF),
            command=list(args[:1]), args=list(args[1:]),
            log_path=f"{name}.log", tty=tty,
            linux=cri.LinuxContainerConfig(security_context=sc))


def pod_qemus(env: Env) -> list[int]:
    """QEMU processes of ours (their cmdline names our shim state dir)."""
    return [p for p in our_processes(env) if _comm_is(p, "qemu-system")]


def cri_leftovers(env: Env, net: TestNet) -> list[str]:
    problems = leftovers(env)          # processes, mounts, shim state files (test_ctr_run's check)
    if net.leases():
        problems.append(f"host-local leases: {net.leases()}")
    return problems


def remove_pod_quietly(api: Cri, pod: Pod) -> None:
    """Best-effort teardown of whatever a failed step left (ignores every error)."""
    rt = api.rt
    for cid in pod.containers:
        for call, req in ((rt.StopContainer, cri.StopContainerRequest(container_id=cid, timeout=1)),
                          (rt.RemoveContainer, cri.RemoveContainerRequest(container_id=cid))):
            try:
                call(req, timeout=RPC_TIMEOUT)
            except grpc.RpcError:
                pass
    if pod.id:
        for call, req in ((rt.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=pod.id)),
                          (rt.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))):
            try:
                call(req, timeout=RPC_TIMEOUT)
            except grpc.RpcError:
                pass


def _remove_all_quietly(e: Env) -> None:
    for pod in [e.pod, *e.pods]:
        remove_pod_quietly(e.api, pod)


def cri_environment():
    """Generator body of the `crienv` fixture: yields an Env with .api (Cri), .net, .pod (a
    default Pod) and .pods (more Pods the tests made, removed at the end)."""
    why = prerequisites()
    if why:
        msg = "CRI integration prerequisites missing: " + "; ".join(why)
        if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
            pytest.fail(msg)
        pytest.skip(msg)
    work = Path(tempfile.mkdtemp(prefix="sbx-cri-", dir="/tmp"))
    state_dir = work / "st"                  # short: unix sockets live under it
    cfg = work / "config.json"
    # CRI runs CNI itself; the shim's own conf dir stays empty (it must not run CNI a second time)
    cfg.write_text(json.dumps({"paths": {"state_dir": str(state_dir), "cni_conf_dir": str(work / "no-cni")}}))
    # defining any runtime replaces CRI's built-in map, so the default `runc` entry comes back too
    handler = (f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]\n'
               f'  runtime_type = "io.containerd.spinbox.v1"\n'
               f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
               f'  runtime_type = "io.containerd.runc.v2"\n')
    # SPINBOX_IT_SHIM_DIR: a directory whose containerd-shim-spinbox-v1 goes first (another build)
    shim_dirs = [d for d in (os.environ.get("SPINBOX_IT_SHIM_DIR"), SHIM_BIN_DIR) if d]
    c = Containerd(Path(tempfile.mkdtemp(prefix="spinbox-ctrd-", dir="/tmp")), path_prefix=shim_dirs,
                   env={"SPINBOX_CONFIG": str(cfg)}, cri=True, namespace=CRI_NAMESPACE,
                   sandbox_image=PAUSE_REF, extra_config=handler)
    # the conflist must be there before CRI starts (it also watches the dir, but this is simpler)
    net = _cri_net(c.base / "cni-conf", work)
    e = Env(c, BUSYBOX_REF, work, state_dir)
    e.net = net
    e.api = None
    e.pod = Pod(work / "logs")
    e.pods = []
    e.pod.log_dir.mkdir()
    problems: list[str] = []
    try:
        c.start()
        import_busybox(c, PAUSE_REF, cmd=["/bin/sleep", "2147483647"], namespace=CRI_NAMESPACE)
        import_busybox(c, BUSYBOX_REF, namespace=CRI_NAMESPACE)
        e.api = Cri(c.address)
        e.api.wait_network_ready()
        yield e
        _remove_all_quietly(e)          # what a failed test left; the leak check comes after
        try:
            wait_until(lambda: not cri_leftovers(e, net), 30, "the runtime to release everything")
        except AssertionError:
            problems.extend(cri_leftovers(e, net))
    finally:
        if e.api is not None:
            _remove_all_quietly(e)
            e.api.close()
        log_tail = c.log_tail(120) if problems else ""
        keep = os.environ.get("SPINBOX_IT_KEEP_LOG")     # debugging: where to copy containerd's log
        if keep:
            shutil.copyfile(c.log_path, keep)
        c.cleanup()
        net.remove_bridge()
        shutil.rmtree(work, ignore_errors=True)
    assert not problems, "left behind after the CRI suite:\n  " + "\n  ".join(problems) + \
        "\ncontainerd log tail:\n" + log_tail


def ok(r: cri.ExecSyncResponse, what: str) -> str:
    assert r.exit_code == 0, f"{what}: exit {r.exit_code}, stdout {r.stdout!r}, stderr {r.stderr!r}"
    return r.stdout.decode()


def container_running(rt, cid: str) -> None:
    wait_until(lambda: rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=30)
               .status.state == cri.CONTAINER_RUNNING, 60, f"container {cid} to be RUNNING")


# --- streaming exec: the URL CRI's Exec returns, over a WebSocket (channel.k8s.io, v4) -----------

STREAM_STDOUT, STREAM_STDERR, STREAM_ERROR = 1, 2, 3


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"stream closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _ws_frame(s: socket.socket) -> tuple[int, bytes]:
    """(opcode, payload) of one server frame (never masked; fragments not expected)."""
    b0, b1 = _recv_exact(s, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", _recv_exact(s, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", _recv_exact(s, 8))[0]
    if b1 & 0x80:
        mask = _recv_exact(s, 4)
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(_recv_exact(s, n)))
    else:
        data = _recv_exact(s, n)
    return b0 & 0x0F, data


def stream_exec(url: str, timeout: float = 120.0) -> tuple[bytes, bytes, dict]:
    """Run the exec behind a CRI streaming URL as kubectl does over WebSocket: (stdout, stderr,
    the final status the server sends on the error channel)."""
    u = urllib.parse.urlsplit(url)
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    out, err, status = b"", b"", {}
    with socket.create_connection((u.hostname, u.port or 80), timeout=timeout) as s:
        s.sendall((f"GET {u.path}{'?' + u.query if u.query else ''} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            if not chunk:
                raise ConnectionError(f"no WebSocket upgrade: {head!r}")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), f"WebSocket upgrade refused: {head!r}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                op, data = _ws_frame(s)
            except ConnectionError:
                break
            if op == 8:                      # close
                break
            if op not in (1, 2) or not data:
                continue
            channel, payload = data[0], data[1:]
            if channel == STREAM_STDOUT:
                out += payload
            elif channel == STREAM_STDERR:
                err += payload
            elif channel == STREAM_ERROR and payload:
                status = json.loads(payload)
    return out, err, status
