"""The CRI pod path end to end (what a Kubernetes RuntimeClass `spinbox` user gets): the REAL
containerd 1.6 CRI plugin over gRPC (runtime.v1, the kubelet's API), runtime handler `spinbox`
= `io.containerd.spinbox.v1`, the pod's sandbox and its containers in ONE QEMU microVM (TCG).

Private everything: containerd (own root/state/socket), the CNI conf dir CRI reads (bridge
`spbc-<random>`, a random 10.x.y.0/24, host-local with its own dataDir, ipMasq off), the shim's
state dir (SPINBOX_CONFIG), a local "pause" image (busybox sleeping forever) as `sandbox_image`
in CRI's namespace `k8s.io`. CRI runs CNI in the pod netns itself; the shim only plumbs that
netns into the VM.

One pod, walked through its life (each step asserts what a user would see):
  1. RunPodSandbox → one QEMU for the pod; PodSandboxStatus READY with the CNI IP;
  2. CreateContainer + StartContainer (busybox `sleep`) → RUNNING, still that one QEMU;
  3. ExecSync: eth0 has the pod IP, the gateway answers ping, /etc/hostname and /etc/hosts are
     the files CRI bind-mounts from the host (the shim stages and shares them into the VM), the
     container's stdout reaches the CRI log file;
  4. a second container in the pod talks to the first over localhost (same VM, same network);
  5. StopContainer/RemoveContainer, StopPodSandbox, RemovePodSandbox → no QEMU/virtiofsd/shim
     of ours, no mounts under our dirs, no shim state files, the host-local lease released,
     CRI's pod netns gone.

Debugging knobs: SPINBOX_IT_SHIM_DIR=<dir> puts another containerd-shim-spinbox-v1 first on
containerd's PATH; SPINBOX_IT_KEEP_LOG=<file> copies containerd's log (with the shim's) there.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from integration.cninet import TestNet, missing_for_vm_networking
from integration.containerd import Containerd, missing_prerequisites
from integration.images import BUSYBOX_REF, PAUSE_REF, import_busybox
from integration.test_ctr_run import (SHARE_DIR, SHIM_BIN_DIR, Env, _comm_is, leftovers, our_processes,
                                      wait_until)

pytestmark = pytest.mark.integration

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


def _prerequisites() -> list[str]:
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
        """CRI loads the conflist asynchronously; RunPodSandbox fails until it has."""
        def ready() -> bool:
            conds = self.rt.Status(cri.StatusRequest(), timeout=10).status.conditions
            return any(c.type == "NetworkReady" and c.status for c in conds)
        wait_until(ready, timeout, "CRI to report NetworkReady")

    def exec_sync(self, cid: str, *cmd: str, timeout_s: int = 60) -> cri.ExecSyncResponse:
        return self.rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout_s),
                                timeout=timeout_s + 60)


class Pod:
    """One pod's CRI bookkeeping, so that teardown can remove whatever a failure left."""

    def __init__(self, log_dir: Path) -> None:
        self.uid = uuid.uuid4().hex
        self.name = f"cri-{self.uid[:6]}"
        self.log_dir = log_dir
        self.id = ""
        self.containers: list[str] = []

    def config(self) -> cri.PodSandboxConfig:
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=self.name, uid=self.uid, namespace="default", attempt=0),
            hostname=self.name,
            log_directory=str(self.log_dir),
            labels={"app": "spinbox-it"},
            linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=cri.POD, pid=cri.CONTAINER,
                                                      ipc=cri.POD))))

    def container_config(self, name: str, *args: str) -> cri.ContainerConfig:
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=BUSYBOX_REF),
            command=list(args[:1]), args=list(args[1:]),
            log_path=f"{name}.log",
            linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                namespace_options=cri.NamespaceOption(network=cri.POD, pid=cri.CONTAINER,
                                                      ipc=cri.POD))))


def pod_qemus(env: Env) -> list[int]:
    """QEMU processes of ours (their cmdline names our shim state dir)."""
    return [p for p in our_processes(env) if _comm_is(p, "qemu-system")]


def cri_leftovers(env: Env, net: TestNet) -> list[str]:
    problems = leftovers(env)          # processes, mounts, shim state files (test_ctr_run's check)
    if net.leases():
        problems.append(f"host-local leases: {net.leases()}")
    return problems


@pytest.fixture(scope="module")
def crienv():
    why = _prerequisites()
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
    e.pod.log_dir.mkdir()
    problems: list[str] = []
    try:
        c.start()
        import_busybox(c, PAUSE_REF, cmd=["/bin/sleep", "2147483647"], namespace=CRI_NAMESPACE)
        import_busybox(c, BUSYBOX_REF, namespace=CRI_NAMESPACE)
        e.api = Cri(c.address)
        e.api.wait_network_ready()
        yield e
        _remove_pod_quietly(e)          # what a failed test left; the leak check comes after
        try:
            wait_until(lambda: not cri_leftovers(e, net), 30, "the runtime to release everything")
        except AssertionError:
            problems.extend(cri_leftovers(e, net))
    finally:
        if e.api is not None:
            _remove_pod_quietly(e)
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


def _remove_pod_quietly(e: Env) -> None:
    """Best-effort teardown of whatever a failed step left (ignores every error)."""
    pod, rt = e.pod, e.api.rt
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


def _ipv4(out: str) -> str:
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", out)
    assert m, f"no IPv4 address in {out!r}"
    return m.group(1)


def _ok(r: cri.ExecSyncResponse, what: str) -> str:
    assert r.exit_code == 0, f"{what}: exit {r.exit_code}, stdout {r.stdout!r}, stderr {r.stderr!r}"
    return r.stdout.decode()


def _container_running(rt, cid: str) -> None:
    wait_until(lambda: rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=30)
               .status.state == cri.CONTAINER_RUNNING, 60, f"container {cid} to be RUNNING")


def test_pod_lifecycle_in_one_vm(crienv):
    e, rt, pod, net = crienv, crienv.api.rt, crienv.pod, crienv.net
    timings: dict[str, float] = {}

    # ---- 1. the sandbox: one VM, READY, the CNI address -----------------------------------
    t = time.monotonic()
    pod.id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod.config(), runtime_handler=HANDLER),
                              timeout=RPC_TIMEOUT).pod_sandbox_id
    timings["RunPodSandbox"] = time.monotonic() - t
    qemus = pod_qemus(e)
    assert len(qemus) == 1, f"one QEMU for the pod, found {qemus}"
    st = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id), timeout=30).status
    assert st.state == cri.SANDBOX_READY, st
    assert st.runtime_handler == HANDLER
    pod_ip = st.network.ip
    assert pod_ip and ipaddress.ip_address(pod_ip) in net.subnet, f"pod IP {pod_ip!r} not in {net.subnet}"
    assert net.leases() == [pod_ip], "the pod IP is the one host-local leased"
    verbose = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id, verbose=True), timeout=30)
    spec = json.loads(verbose.info["info"])["runtimeSpec"]   # the sandbox's OCI spec, as the shim got it
    netns = next((n.get("path", "") for n in spec["linux"]["namespaces"] if n["type"] == "network"), "")
    assert netns and os.path.exists(netns), f"CRI's pod netns {netns!r}"

    # ---- 2. a container in the pod: RUNNING, in the same VM --------------------------------
    t = time.monotonic()
    c1 = rt.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=pod.container_config("c1", "sh", "-c", "echo c1-says-hi; exec sleep 3600"),
        sandbox_config=pod.config()), timeout=RPC_TIMEOUT).container_id
    pod.containers.append(c1)
    rt.StartContainer(cri.StartContainerRequest(container_id=c1), timeout=RPC_TIMEOUT)
    timings["Create+StartContainer"] = time.monotonic() - t
    _container_running(rt, c1)
    assert pod_qemus(e) == qemus, "the container runs in the pod's VM, no second QEMU"

    # ---- 3. inside: the pod's network and the files CRI bind-mounts ------------------------
    t = time.monotonic()
    addr = _ok(e.api.exec_sync(c1, "ip", "-o", "-4", "addr", "show", "dev", "eth0"), "ip addr")
    timings["ExecSync"] = time.monotonic() - t
    assert _ipv4(addr) == pod_ip, f"eth0 in the VM has the pod IP {pod_ip}: {addr!r}"
    ping = _ok(e.api.exec_sync(c1, "ping", "-c", "1", "-W", "5", net.gateway), "ping gateway")
    assert "1 packets received" in ping, ping
    hostname = _ok(e.api.exec_sync(c1, "cat", "/etc/hostname"), "cat /etc/hostname").strip()
    assert hostname == pod.name, f"/etc/hostname is CRI's file for the pod: {hostname!r}"
    assert _ok(e.api.exec_sync(c1, "hostname"), "hostname").strip() == pod.name
    hosts = _ok(e.api.exec_sync(c1, "cat", "/etc/hosts"), "cat /etc/hosts")
    assert "localhost" in hosts, hosts
    mounts = _ok(e.api.exec_sync(c1, "cat", "/proc/self/mounts"), "mounts")
    for target in ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf"):
        assert f" {target} " in mounts, f"{target} is a bind mount in the container:\n{mounts}"
    # the container's stdout went through the shim to CRI's log file
    log = pod.log_dir / "c1.log"
    wait_until(lambda: log.exists() and "c1-says-hi" in log.read_text(errors="replace"), 30,
               lambda: f"c1's stdout in {log} ({log.read_text(errors='replace') if log.exists() else 'missing'!r})")

    # ---- 4. a second container, same VM, same network namespace ----------------------------
    token = secrets.token_hex(8)
    c2 = rt.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=pod.container_config(
            "c2", "sh", "-c", f"mkdir -p /www && echo {token} > /www/t && exec httpd -f -p 8080 -h /www"),
        sandbox_config=pod.config()), timeout=RPC_TIMEOUT).container_id
    pod.containers.append(c2)
    rt.StartContainer(cri.StartContainerRequest(container_id=c2), timeout=RPC_TIMEOUT)
    _container_running(rt, c2)
    assert pod_qemus(e) == qemus, "both containers run in the pod's one VM"
    assert _ipv4(_ok(e.api.exec_sync(c2, "ip", "-o", "-4", "addr", "show", "dev", "eth0"), "ip addr c2")) == pod_ip
    body = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:            # httpd may still be starting
        r = e.api.exec_sync(c1, "wget", "-q", "-O", "-", "http://127.0.0.1:8080/t")
        body = r.stdout.decode()
        if r.exit_code == 0:
            break
        time.sleep(0.5)
    assert body.strip() == token, f"c1 reaches c2's server over localhost: {body!r}"

    # ---- 5. teardown: everything of ours goes away ------------------------------------------
    t = time.monotonic()
    for cid in (c2, c1):
        rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=2), timeout=RPC_TIMEOUT)
        st = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=30).status
        assert st.state == cri.CONTAINER_EXITED, st
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
        pod.containers.remove(cid)
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=RPC_TIMEOUT)
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=RPC_TIMEOUT)
    pod.id = ""
    timings["teardown"] = time.monotonic() - t
    assert not rt.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items
    assert not rt.ListContainers(cri.ListContainersRequest(), timeout=30).containers
    wait_until(lambda: not cri_leftovers(e, net), 30, lambda: f"nothing of ours left: {cri_leftovers(e, net)}")
    assert not os.path.exists(netns), f"CRI removed the pod netns {netns}"
    print("CRI timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
