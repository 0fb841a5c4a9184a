"""A CRI pod through containerd 2.x's shim sandbox controller: the REAL containerd 2.1 CRI
plugin over gRPC with a runtime handler whose table says `sandboxer = "shim"`, so containerd
calls the shim's Sandbox API (containerd.runtime.sandbox.v1.Sandbox) for the pod instead of
running a pause container: CreateSandbox/StartSandbox boot the pod's VM and its holder,
containers join it over the Task API, Stop/Shutdown take it all down.

No pause image exists in this containerd (and none could be pulled): RunPodSandbox can only
succeed on the shim path. The pod (each step asserts what a user would see):
  1. RunPodSandbox → one QEMU, READY, the CNI address CRI leased; no container record for the
     pod in containerd (no pause container);
  2. CreateContainer + StartContainer (busybox) → RUNNING in that one VM;
  3. ExecSync: its output comes back; PID 1 of the pod's shared PID namespace is the shim's
     holder (/pause), the hostname is the pod's, eth0 has the pod IP, the pod's sysctls (an IPC
     one and a net one) are set;
     a second container sees the first one's processes (the pod's PID namespace);
  4. StopContainer/RemoveContainer (the pod's VM stays), StopPodSandbox (NOTREADY, no QEMU),
     RemovePodSandbox → nothing of ours left: no QEMU/virtiofsd/shim, mount, shim state, host
     cgroup, lease, pod netns, sandbox bundle.
Then the same pod with its shim SIGKILLed: containerd's cleanup of the dead shim and CRI's
Stop/Remove leave nothing either; and one that outlives a containerd restart.

containerd 2.x: the one under test (SPINBOX_TEST_CONTAINERD_BIN) when it is 2.x, else the 2.x
release scripts/fetch-containerd unpacked into its cache, put first on containerd's PATH.
"""
from __future__ import annotations

import glob
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from integration import containerd as harness
from integration.cninet import TestNet, missing_for_vm_networking
from integration.conftest import skip_or_fail
from integration.containerd import Containerd
from integration.images import BUSYBOX_REF, import_busybox
from integration.test_ctr_run import SHARE_DIR, SHIM_BIN_DIR, Env, _comm_is, leftovers, wait_until

pytestmark = pytest.mark.integration

try:  # the kubelet's API (a test-only dependency; the shim reads its own view of the config)
    import grpc
    from cri_api.v1 import api_pb2 as cri
    from cri_api.v1 import api_pb2_grpc as cri_grpc
except ImportError as e:  # pragma: no cover - depends on the venv
    CRI_IMPORT_ERROR: str | None = (
        f"CRI client missing ({e}): .venv/bin/pip install --no-deps container-runtime-interface-api==2.0.1")
else:
    CRI_IMPORT_ERROR = None

HANDLER = "spinbox-sb"
CRI_NAMESPACE = "k8s.io"
RPC_TIMEOUT = 240.0        # a TCG boot plus virtiofs hotplugs, on a loaded 2-core host
FETCH_CACHE = Path(os.environ.get("SPINBOX_CONTAINERD_CACHE", "/var/cache/spinbox/containerd"))
SANDBOX_STATE = "io.containerd.sandbox.controller.v1.shim"   # where containerd keeps sandbox bundles


def _major(binary: str) -> int:
    r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    fields = r.stdout.split()
    try:
        return int(fields[2].lstrip("v").split(".")[0])
    except (IndexError, ValueError):
        return 0


def containerd_2x() -> tuple[list[str], list[str]]:
    """(PATH prefix that makes containerd 2.x the one started, why there is none)."""
    if harness.BIN_DIR:
        if _major(harness.CONTAINERD) >= 2:
            return [], []
        return [], [f"the Sandbox API needs containerd 2.x; {harness.BIN_DIR_ENV}={harness.BIN_DIR} is older"]
    system = shutil.which("containerd")
    if system and _major(system) >= 2:
        return [], []
    for bin_dir in sorted(glob.glob(str(FETCH_CACHE / "2.*" / "usr" / "bin")), reverse=True):
        if os.access(os.path.join(bin_dir, "containerd"), os.X_OK) and _major(os.path.join(bin_dir, "containerd")) >= 2:
            return [bin_dir], []
    return [], ["no containerd 2.x: set SPINBOX_TEST_CONTAINERD_BIN to a 2.x bin dir or run "
                "`scripts/fetch-containerd 2.1`"]


class Cri:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.rt = cri_grpc.RuntimeServiceStub(self.channel)

    def exec_sync(self, cid: str, *cmd: str, timeout_s: int = 60) -> str:
        r = self.rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout_s),
                             timeout=timeout_s + 60)
        assert r.exit_code == 0, f"{cmd}: exit {r.exit_code}, stdout {r.stdout!r}, stderr {r.stderr!r}"
        return r.stdout.decode()


POD_SYSCTLS = {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "80"}


def _pod_config(name: str, uid: str, log_dir: Path) -> cri.PodSandboxConfig:
    ns = cri.NamespaceOption(network=cri.POD, pid=cri.POD, ipc=cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="default", attempt=0),
        hostname=name, log_directory=str(log_dir), labels={"app": "spinbox-it"},
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=ns),
                                        sysctls=POD_SYSCTLS))


def _container_config(name: str, *args: str) -> cri.ContainerConfig:
    ns = cri.NamespaceOption(network=cri.POD, pid=cri.POD, ipc=cri.POD)
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name, attempt=0), image=cri.ImageSpec(image=BUSYBOX_REF),
        command=list(args[:1]), args=list(args[1:]), log_path=f"{name}.log",
        linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(namespace_options=ns)))


def _ipv4(out: str) -> str:
    for word in out.split():
        if "/" in word and word.count(".") == 3:
            return word.split("/")[0]
    raise AssertionError(f"no IPv4 address in {out!r}")


def _sandbox_bundles(c: Containerd) -> list[str]:
    d = c.base / "state" / SANDBOX_STATE / CRI_NAMESPACE
    return sorted(os.listdir(d)) if d.is_dir() else []


@pytest.fixture(scope="module")
def env2():
    prefix, why = containerd_2x()
    why += harness.missing_prerequisites() + missing_for_vm_networking(SHARE_DIR)
    if not (SHIM_BIN_DIR / "containerd-shim-spinbox-v1").exists():
        why.append(f"{SHIM_BIN_DIR}/containerd-shim-spinbox-v1 missing (pip install -e .)")
    if CRI_IMPORT_ERROR:
        why.append(CRI_IMPORT_ERROR)
    if why:
        skip_or_fail(why)
    work = Path(tempfile.mkdtemp(prefix="sbx-sba-", dir="/tmp"))
    state_dir = work / "st"
    cfg = work / "config.json"
    cfg.write_text(json.dumps({"paths": {"state_dir": str(state_dir), "cni_conf_dir": str(work / "no-cni")}}))
    handler = (f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]\n'
               f'  runtime_type = "io.containerd.spinbox.v1"\n'
               f'  sandboxer = "shim"\n')
    c = Containerd(Path(tempfile.mkdtemp(prefix="spinbox-ctrd-", dir="/tmp")), path_prefix=[SHIM_BIN_DIR, *prefix],
                   env={"SPINBOX_CONFIG": str(cfg)}, cri=True, namespace=CRI_NAMESPACE, extra_config=handler)
    net = TestNet(work, prefix="spbs", conf_dir=c.base / "cni-conf")
    net.write("10-spinbox-sba.conflist", net.conflist())
    e = Env(c, BUSYBOX_REF, work, state_dir)
    api = None
    try:
        c.start()
        import_busybox(c, BUSYBOX_REF, namespace=CRI_NAMESPACE)
        api = Cri(c.address)

        def network_ready() -> bool:
            conds = api.rt.Status(cri.StatusRequest(), timeout=10).status.conditions
            return any(x.type == "NetworkReady" and x.status for x in conds)
        wait_until(network_ready, 30, "CRI to report NetworkReady")
        e.api, e.net, e.pods = api, net, []
        yield e
    finally:
        api = getattr(e, "api", api)         # the restart test makes a new client
        if api is not None:
            for pod_id in e.pods:            # what a failed test left
                for call, req in ((api.rt.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=pod_id)),
                                  (api.rt.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))):
                    try:
                        call(req, timeout=RPC_TIMEOUT)
                    except grpc.RpcError:
                        pass
            api.channel.close()
        if os.environ.get("SPINBOX_IT_KEEP_LOG"):
            shutil.copyfile(c.log_path, os.environ["SPINBOX_IT_KEEP_LOG"])
        c.cleanup()
        net.remove_bridge()
        shutil.rmtree(work, ignore_errors=True)


def test_a_pod_through_the_sandbox_api(env2):
    e, rt, net = env2, env2.api.rt, env2.net
    uid = uuid.uuid4().hex
    name = f"sba-{uid[:6]}"
    log_dir = e.work / "logs"
    log_dir.mkdir()
    pod_cfg = _pod_config(name, uid, log_dir)
    timings: dict[str, float] = {}
    netns_before = _netns()

    # ---- 1. RunPodSandbox: the shim's Sandbox API, one VM, no pause container --------------
    t = time.monotonic()
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_cfg, runtime_handler=HANDLER),
                           timeout=RPC_TIMEOUT).pod_sandbox_id
    e.pods.append(pod)
    timings["RunPodSandbox"] = time.monotonic() - t
    qemus = _qemus_of(pod)
    assert len(qemus) == 1, f"one QEMU for the pod, found {qemus}"
    st = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod), timeout=30).status
    assert st.state == cri.SANDBOX_READY, st
    pod_ip = st.network.ip
    assert pod_ip and ipaddress.ip_address(pod_ip) in net.subnet, f"pod IP {pod_ip!r} not in {net.subnet}"
    records = e.ctr("containers", "ls", "-q", namespace=CRI_NAMESPACE).stdout.decode().split()
    assert pod not in records, f"no pause container: containerd's containers are {records}"
    assert _sandbox_bundles(e.c) == [pod], "containerd's sandbox controller made the pod's bundle"
    pod_netns = _netns() - netns_before
    assert pod_netns, "CRI made the pod's netns (the shim plumbs it into the VM)"

    # ---- 2. a container in the pod ------------------------------------------------------------
    t = time.monotonic()
    c1 = rt.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=_container_config("c1", "sh", "-c", "echo c1-says-hi; exec sleep 3600"),
        sandbox_config=pod_cfg), timeout=RPC_TIMEOUT).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=c1), timeout=RPC_TIMEOUT)
    timings["Create+StartContainer"] = time.monotonic() - t
    wait_until(lambda: rt.ContainerStatus(cri.ContainerStatusRequest(container_id=c1), timeout=30)
               .status.state == cri.CONTAINER_RUNNING, 60, "c1 to be RUNNING")
    assert _qemus_of(pod) == qemus, "c1 runs in the pod's VM"

    # ---- 3. inside ------------------------------------------------------------------------------
    token = secrets.token_hex(8)
    t = time.monotonic()
    assert e.api.exec_sync(c1, "echo", token).strip() == token
    timings["ExecSync"] = time.monotonic() - t
    init = e.api.exec_sync(c1, "cat", "/proc/1/cmdline").split("\0")[0]
    assert init == "/pause", f"PID 1 of the pod's PID namespace is the shim's holder: {init!r}"
    assert e.api.exec_sync(c1, "hostname").strip() == name, "the pod's UTS namespace and hostname"
    assert _ipv4(e.api.exec_sync(c1, "ip", "-o", "-4", "addr", "show", "dev", "eth0")) == pod_ip
    for key, value in POD_SYSCTLS.items():     # the pod's IPC and network namespaces got them
        got = e.api.exec_sync(c1, "cat", "/proc/sys/" + key.replace(".", "/")).strip()
        assert got == value, f"pod sysctl {key}={value} in the container: {got!r}"
    log = log_dir / "c1.log"
    wait_until(lambda: log.exists() and "c1-says-hi" in log.read_text(errors="replace"), 30,
               lambda: f"c1's stdout in {log}")
    c2 = rt.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=_container_config("c2", "sleep", "3601"), sandbox_config=pod_cfg),
        timeout=RPC_TIMEOUT).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=c2), timeout=RPC_TIMEOUT)
    ps = e.api.exec_sync(c2, "ps", "-o", "pid,args")
    assert "sleep 3600" in ps and "sleep 3601" in ps and "/pause" in ps, \
        f"c2 sees c1 in the pod's PID namespace:\n{ps}"

    # ---- 4. teardown -----------------------------------------------------------------------------
    t = time.monotonic()
    for cid in (c2, c1):
        rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=2), timeout=RPC_TIMEOUT)
        assert rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=30).status.state == \
            cri.CONTAINER_EXITED
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    assert _qemus_of(pod) == qemus, "the pod outlives its containers (the Task API's Shutdown did not stop it)"
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=RPC_TIMEOUT)
    st = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod), timeout=30).status
    assert st.state == cri.SANDBOX_NOTREADY, st
    assert not _qemus_of(pod), "StopPodSandbox stopped the VM"
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=RPC_TIMEOUT)
    e.pods.remove(pod)
    timings["teardown"] = time.monotonic() - t
    assert not rt.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items
    assert not rt.ListContainers(cri.ListContainersRequest(), timeout=30).containers

    wait_until(lambda: not _left(e, pod, pod_netns), 30, lambda: f"nothing of ours left: {_left(e, pod, pod_netns)}")
    print("Sandbox API pod timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))


def test_a_killed_shim_leaves_nothing_behind(env2):
    """The shim daemon SIGKILLed while its pod runs: containerd runs the shim's `delete`, which
    releases what the shim's state recorded (QEMU, virtiofsd, the holder's rootfs mount, TAPs,
    the host cgroup); CRI can still stop and remove the pod."""
    e, rt = env2, env2.api.rt
    uid = uuid.uuid4().hex
    name = f"sbk-{uid[:6]}"
    (e.work / name).mkdir()
    pod_cfg = _pod_config(name, uid, e.work / name)
    netns_before = _netns()
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_cfg, runtime_handler=HANDLER),
                           timeout=RPC_TIMEOUT).pod_sandbox_id
    e.pods.append(pod)
    pod_netns = _netns() - netns_before
    c1 = rt.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=_container_config("c1", "sleep", "3600"), sandbox_config=pod_cfg),
        timeout=RPC_TIMEOUT).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=c1), timeout=RPC_TIMEOUT)
    assert _qemus_of(pod), "the pod's VM runs"
    shims = e.shim_pids(pod)
    assert len(shims) == 1, f"one shim daemon for the pod: {shims}"
    os.kill(shims[0], signal.SIGKILL)
    wait_until(lambda: not _qemus_of(pod), 60, "containerd's cleanup of the dead shim to stop the VM")
    def not_ready() -> bool:
        try:        # "ttrpc: closed" until containerd has forgotten the dead shim
            return rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod), timeout=30) \
                .status.state == cri.SANDBOX_NOTREADY
        except grpc.RpcError:
            return False
    wait_until(not_ready, 60, "the pod to be NOTREADY")
    # CRI retries its exit handling of c1 (its first task delete met the closed connection)
    wait_until(lambda: rt.ContainerStatus(cri.ContainerStatusRequest(container_id=c1), timeout=30)
               .status.state == cri.CONTAINER_EXITED, 90, "c1 to be EXITED")
    for call, req in ((rt.StopContainer, cri.StopContainerRequest(container_id=c1, timeout=1)),
                      (rt.RemoveContainer, cri.RemoveContainerRequest(container_id=c1)),
                      (rt.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=pod)),
                      (rt.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id=pod))):
        call(req, timeout=RPC_TIMEOUT)
    e.pods.remove(pod)
    wait_until(lambda: not _left(e, pod, pod_netns), 30, lambda: f"nothing of ours left: {_left(e, pod, pod_netns)}")


def test_the_pod_survives_a_containerd_restart(env2):
    """containerd restarted under a running pod: its sandbox controller reconnects to the shim
    (the sandbox bundle's address), CRI asks SandboxStatus and waits again, and the pod, its
    container and the teardown work as before. (This found a double close in shim.vm.logsink:
    virtiofsd's EOF closed the fd number containerd's new connection had got.)"""
    e, rt = env2, env2.api.rt
    uid = uuid.uuid4().hex
    name = f"sbr-{uid[:6]}"
    (e.work / name).mkdir()
    pod_cfg = _pod_config(name, uid, e.work / name)
    netns_before = _netns()
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_cfg, runtime_handler=HANDLER),
                           timeout=RPC_TIMEOUT).pod_sandbox_id
    e.pods.append(pod)
    pod_netns = _netns() - netns_before
    c1 = rt.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=_container_config("c1", "sleep", "3600"), sandbox_config=pod_cfg),
        timeout=RPC_TIMEOUT).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=c1), timeout=RPC_TIMEOUT)
    qemus = _qemus_of(pod)
    shims = e.shim_pids(pod)
    e.c.restart()
    e.api.channel.close()
    e.api = Cri(e.c.address)
    rt = e.api.rt
    def ready() -> bool:
        try:        # "server is not initialized yet" while CRI recovers
            return rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod), timeout=30) \
                .status.state == cri.SANDBOX_READY
        except grpc.RpcError:
            return False
    wait_until(ready, 60, "the pod READY after the restart")
    assert _qemus_of(pod) == qemus and e.shim_pids(pod) == shims, "the same VM and shim"
    token = secrets.token_hex(4)
    assert e.api.exec_sync(c1, "echo", token).strip() == token
    for call, req in ((rt.StopContainer, cri.StopContainerRequest(container_id=c1, timeout=1)),
                      (rt.RemoveContainer, cri.RemoveContainerRequest(container_id=c1)),
                      (rt.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=pod)),
                      (rt.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id=pod))):
        call(req, timeout=RPC_TIMEOUT)
    e.pods.remove(pod)
    wait_until(lambda: not _left(e, pod, pod_netns), 30, lambda: f"nothing of ours left: {_left(e, pod, pod_netns)}")


def _left(e: Env, pod: str, pod_netns: set[str]) -> list[str]:
    problems = leftovers(e)
    if e.net.leases():
        problems.append(f"host-local leases: {e.net.leases()}")
    if _sandbox_bundles(e.c):
        problems.append(f"sandbox bundles: {_sandbox_bundles(e.c)}")
    if _qemus_of(pod):
        problems.append(f"QEMU of the pod: {_qemus_of(pod)}")
    if pod_netns & _netns():
        problems.append(f"pod netns: {sorted(pod_netns & _netns())}")
    return problems


def _qemus_of(pod: str) -> list[int]:
    """Live QEMU processes of the pod (the shim names the VM after the sandbox id: `-name <id>,`)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _comm_is(int(entry), "qemu-system"):
            continue
        try:
            argv = Path("/proc", entry, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(pod.encode() + b",") for a in argv):
            found.append(int(entry))
    return sorted(found)


def _netns() -> set[str]:
    d = "/var/run/netns"
    return {n for n in os.listdir(d) if n.startswith("cni-")} if os.path.isdir(d) else set()
