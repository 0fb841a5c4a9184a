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

The environment (and its debugging knobs) is integration/cri.py's, shared with
test_cri_conformance.py.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import time

import pytest

from integration.cri import (HANDLER, RPC_TIMEOUT, cri, cri_environment, cri_leftovers, pod_qemus)
from integration.cri import container_running as _container_running
from integration.cri import ok as _ok
from integration.test_ctr_run import wait_until

pytestmark = pytest.mark.integration

crienv = pytest.fixture(scope="module", name="crienv")(cri_environment)


def _ipv4(out: str) -> str:
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", out)
    assert m, f"no IPv4 address in {out!r}"
    return m.group(1)


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
