"""The VM follows the workload (docs/sizing.md), through the real containerd 1.6 and ctr:
`ctr run --cpus/--memory-limit` sizes the sandbox's VM (vCPUs and memory hot-plugged after the
template restore, confirmed by the guest), and a request over a ceiling fails the create with
a message naming the ceiling. ctr 1.6 has no `task update`: Update is reached through CRI
(UpdateContainerResources → the shim's Task Update), which grows the VM and shrinks it again.

QEMU's side is read without its monitor (the shim holds the one QMP connection): its vCPU
threads (`-name ...,debug-threads=on` names them `CPU <n>/TCG`; query-cpus-fast lists the
same threads) from /proc, virtio-mem's plugged size from the line the shim logs with its
query-cpus-fast / qom-get figures after each resize.
"""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from integration.test_ctr_run import _log_lines, env, uid  # noqa: F401

pytestmark = pytest.mark.integration
GiB = 1 << 30
PROBE = "nproc; grep MemTotal /proc/meminfo"


def _nproc_memtotal(out: bytes) -> tuple[int, int]:
    text = out.decode()
    nproc = int(text.split()[0])
    m = re.search(r"MemTotal:\s+(\d+) kB", text)
    assert m, text
    return nproc, int(m.group(1)) * 1024


def test_ctr_run_cpus_and_memory_limit_size_the_vm(env):  # noqa: F811
    r = env.ctr(*env.run_args("--rm"), env.ref, uid("small"), "sh", "-c", PROBE, check=False)
    assert r.returncode == 0, r
    base_cpus, base_mem = _nproc_memtotal(r.stdout)
    assert base_cpus == 1 and base_mem < 300 << 20

    big = uid("big")
    r = env.ctr(*env.run_args("--rm", "--cpus", "2", "--memory-limit", str(GiB)), env.ref, big,
                "sh", "-c", PROBE, check=False)
    assert r.returncode == 0, r
    nproc, mem = _nproc_memtotal(r.stdout)
    assert nproc >= 2
    assert mem >= GiB
    sized = _log_lines(env, f"{big}: sandbox sized to 2 vCPU(s) / 1280 MiB in")
    assert len(sized) == 1, sized
    print("SIZING", sized[0].split(": ", 1)[-1])
    timeline = _log_lines(env, f"timeline {big}:")
    assert timeline and "sized=2cpu/1280MiB:" in timeline[0], timeline
    print("TIMELINE", timeline[0].split("timeline", 1)[-1])


def test_a_request_over_the_ceiling_names_it_and_runs_nothing(env):  # noqa: F811
    r = env.ctr(*env.run_args("--rm", "--annotation", "io.containerd.spinbox.v1.vcpus=9"), env.ref,
                uid("huge"), "sh", "-c", "echo ran", check=False)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "9 vCPUs" in err and "cpu_hotplug.max_vcpus = 4" in err, err
    assert b"ran" not in r.stdout
    r = env.ctr(*env.run_args("--rm", "--memory-limit", str(8 * GiB)), env.ref, uid("huge"),
                "sh", "-c", "echo ran", check=False)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "8448 MiB" in err and "memory_hotplug.max_memory_mb = 2048" in err, err


# --- Update, through CRI (UpdateContainerResources → the shim's Task Update) -----------------

from integration.cri import pod_qemus  # noqa: E402
from integration.test_cri import (HANDLER, RPC_TIMEOUT, _container_running, _ok,  # noqa: E402
                                  crienv, cri)  # noqa: F401
from integration.test_ctr_run import wait_until  # noqa: E402

MiB = 1 << 20
RESIZED = re.compile(r"resized (?P<before>.+?) -> (?P<vcpus>\d+) vCPU\(s\) / (?P<mb>\d+) MiB \(QEMU: "
                     r"(?P<qcpus>\d+) vCPUs, (?P<plugged>\d+) MiB plugged; guest: (?P<online>\d+) CPUs "
                     r"online, MemTotal (?P<total>\d+) MiB\)")


def qemu_vcpu_threads(pid: int) -> int:
    """QEMU's vCPU threads (one per vCPU device, gone when it is unplugged)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                n += bool(re.fullmatch(r"CPU \d+/(TCG|KVM)", f.read().strip()))
        except OSError:
            pass
    return n


def resized_lines(env) -> list[re.Match[str]]:  # noqa: F811
    return [m for ln in _log_lines(env, "resized ") if (m := RESIZED.search(ln))]


def test_cri_update_grows_the_vm_then_shrinks_it(crienv):  # noqa: F811
    e, rt, pod = crienv, crienv.api.rt, crienv.pod
    pod.id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod.config(), runtime_handler=HANDLER),
                              timeout=RPC_TIMEOUT).pod_sandbox_id
    c1 = rt.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=pod.container_config("up", "sleep", "3600"),
        sandbox_config=pod.config()), timeout=RPC_TIMEOUT).container_id
    pod.containers.append(c1)
    rt.StartContainer(cri.StartContainerRequest(container_id=c1), timeout=RPC_TIMEOUT)
    _container_running(rt, c1)
    before = _nproc_memtotal(_ok(e.api.exec_sync(c1, "sh", "-c", PROBE), "probe").encode())
    assert before[1] < 300 << 20, before

    # over the ceiling: refused by name, nothing changed
    with pytest.raises(Exception, match=r"memory_hotplug.max_memory_mb = 2048"):
        rt.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
            container_id=c1, linux=cri.LinuxContainerResources(memory_limit_in_bytes=4 * GiB)),
            timeout=RPC_TIMEOUT)
    assert _nproc_memtotal(_ok(e.api.exec_sync(c1, "sh", "-c", PROBE), "probe").encode()) == before

    t = time.monotonic()
    rt.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
        container_id=c1, linux=cri.LinuxContainerResources(memory_limit_in_bytes=768 << 20,
                                                           cpu_quota=200000, cpu_period=100000)),
        timeout=RPC_TIMEOUT)
    print(f"UPDATE to 2 vCPUs / +768 MiB usable after {time.monotonic() - t:.2f} s (CRI round trip)")
    nproc, mem = _nproc_memtotal(_ok(e.api.exec_sync(c1, "sh", "-c", PROBE), "probe").encode())
    assert nproc == 2 and mem >= before[1] + (760 << 20), (nproc, mem)
    # 300 MiB touched (busybox awk holds it twice): more than the whole VM had before (256 MiB)
    out = _ok(e.api.exec_sync(c1, "awk", 'BEGIN{s=sprintf("%314572800s","");print length(s)}',
                              timeout_s=120), "allocate")
    assert out.strip() == "314572800", out
    qemu = pod_qemus(e)
    assert len(qemu) == 1, qemu
    assert qemu_vcpu_threads(qemu[0]) == 2
    grown = resized_lines(e)[-1]
    assert (grown["vcpus"], grown["qcpus"], grown["online"]) == ("2", "2", "2"), grown.group(0)
    assert int(grown["plugged"]) == 768 and int(grown["mb"]) == 256 + 768, grown.group(0)

    # ---- shrink: 1 vCPU, a 128 MiB limit -> the VM goes back to 1 vCPU / 256 + 128 MiB ----
    t = time.monotonic()
    rt.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
        container_id=c1, linux=cri.LinuxContainerResources(memory_limit_in_bytes=128 << 20,
                                                           cpu_quota=100000, cpu_period=100000)),
        timeout=RPC_TIMEOUT)
    print(f"UPDATE back to 1 vCPU / +128 MiB done after {time.monotonic() - t:.2f} s (CRI round trip)")
    nproc, small = _nproc_memtotal(_ok(e.api.exec_sync(c1, "sh", "-c", PROBE), "probe").encode())
    print(f"SHRINK guest: nproc {nproc}, MemTotal {small // MiB} MiB (was {mem // MiB} MiB)")
    # what the shim says it got: its size and QEMU's figures agree with what the guest shows
    now = _log_lines(e, f"{c1}: update: sandbox now ")
    assert now, "the shim logs the size it got"
    print("SHRINK shim:", now[-1].split("update: ", 1)[-1])
    shrunk = resized_lines(e)[-1]
    print("SHRINK", shrunk.group(0))
    assert int(shrunk["mb"]) == 256 + int(shrunk["plugged"]), shrunk.group(0)
    assert int(shrunk["vcpus"]) == int(shrunk["online"]) == nproc, shrunk.group(0)
    # TCG: the vCPU is parked (offline in the guest, QEMU keeps it: unplug is unsafe, shim.resize)
    parked = _log_lines(e, "parked (offline in the guest")
    assert int(shrunk["qcpus"]) == (2 if parked else 1), (shrunk.group(0), parked)
    assert abs(int(shrunk["total"]) - small // MiB) <= 2, (shrunk.group(0), small)
    assert f"sandbox now {shrunk['vcpus']} vCPU(s) / {shrunk['mb']} MiB (wanted 1 vCPU(s) / 384 MiB)" in now[-1]
    if int(shrunk["mb"]) > 384:          # kept by the guest: said so, never claimed given back
        assert _log_lines(e, "the guest gave back memory down to"), "a shrink short of its target is logged"
    # an idle guest gives everything back
    assert nproc == 1 and int(shrunk["plugged"]) == 128, shrunk.group(0)
    assert small <= mem - (600 << 20), (small, mem)
    if parked:
        print("SHRINK", parked[-1].split("resize: ", 1)[-1])
        assert "1 parked" in parked[-1] and qemu_vcpu_threads(qemu[0]) == 2
    else:
        wait_until(lambda: qemu_vcpu_threads(qemu[0]) == 1, 30, "QEMU's unplugged vCPU thread to exit")
    # the container kept running through both resizes
    _container_running(rt, c1)
    assert _ok(e.api.exec_sync(c1, "echo", "still-here"), "exec after the shrink").strip() == "still-here"

    # ---- the size is in the shim's state, and survives a containerd restart -----------------
    assert _size_record(e) == (1, 384, 1 if parked else 0), "the shrunk size is the persisted one"
    e.c.restart()
    e.api.wait_network_ready()
    _container_running(rt, c1)
    rt.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
        container_id=c1, linux=cri.LinuxContainerResources(memory_limit_in_bytes=256 << 20,
                                                           cpu_quota=200000, cpu_period=100000)),
        timeout=RPC_TIMEOUT)
    nproc, again = _nproc_memtotal(_ok(e.api.exec_sync(c1, "sh", "-c", PROBE), "probe").encode())
    assert nproc == 2 and abs(again - small - (128 << 20)) <= 2 * MiB, (nproc, again, small)
    assert _size_record(e) == (2, 512, 1), "grown from the shrunk size, one vCPU hot-plugged again"
    assert qemu_vcpu_threads(qemu[0]) == 2


def _size_record(e) -> tuple[int, int, int]:
    """(vCPUs, MiB, hot-plugged vCPU devices) of the one `vmsize` record in the shim's state."""
    recs = [r for f in e.state_dir.glob("*/*/state.json")
            for r in json.loads(f.read_text())["resources"] if r["kind"] == "vmsize"]
    assert len(recs) == 1, recs
    return recs[0]["vcpus"], recs[0]["memory_mb"], len(recs[0]["cpus"])
