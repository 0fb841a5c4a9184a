"""containerd's Sandbox API (shim.sandbox_service over shim.pod_sandbox), driven as containerd
2.1's shim sandbox controller drives it, on the real Task service and container manager with
the fake sandbox/agent of tests/unit/fakes.py (no root, no VM). Plus the pure parts: the CRI
PodSandboxConfig view against the kubelet's own messages, the holder's spec, and the holder
program run on this host."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import any_pb2

import ttrpc
from spinbox.api._pb.containerd.runtime.sandbox.v1 import sandbox_pb2 as sb_pb
from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.api._pb.spinbox.cri.v1 import pod_pb2
from spinbox.shim import sizing
from spinbox.shim import spec as spec_mod
from spinbox.shim.assembly import build_task_service, sandbox_service
from spinbox.shim.errors import InvalidArgument, Unimplemented
from spinbox.shim.network import plan
from spinbox.shim.pod_sandbox import (HOLDER_PATH, PodRequest, holder_program, parse_pod_config, pod_request,
                                      pod_spec)
from spinbox.shim.vm import hostcgroup

from fakes import Ctx, FakeSandboxFactory, RecordingPublisher, make_bundle

pytestmark = pytest.mark.timeout(30)

ID = "pod-1"
CTX = Ctx.ns("k8s.io")
T = 5.0


def _any(msg, type_url: str = "runtime.v1.PodSandboxConfig") -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=msg.SerializeToString())


def _bundle(tmp: Path) -> Path:
    b = tmp / "bundle"
    (b / "rootfs").mkdir(parents=True)    # what containerd's NewBundle makes: no config.json
    return b


# --- the holder program ------------------------------------------------------------------------

@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the holder program is x86-64")
def test_the_holder_program_sleeps_reaps_its_children_and_dies_by_sigkill(tmp_path):
    prog = tmp_path / "pause"
    prog.write_bytes(holder_program())
    prog.chmod(0o755)
    # a child that exits after 0.3 s, then exec the holder: the child is the holder's to reap
    script = ("import os, time, sys\n"
              "pid = os.fork()\n"
              "if pid == 0:\n    time.sleep(0.3); os._exit(3)\n"
              "print(pid, flush=True)\n"
              f"os.execv({str(prog)!r}, [{str(prog)!r}])\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(p.stdout.readline())
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{child}"), "the exited child was reaped (no zombie)"
        time.sleep(0.3)
        assert p.poll() is None, "the holder keeps running with no child left"
        fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert fields[0] == "S", f"it sleeps: state {fields[0]}"
        assert int(fields[11]) + int(fields[12]) < 20, "it does not spin (utime+stime in ticks)"
        assert Path(f"/proc/{p.pid}/exe").resolve() == prog.resolve()
    finally:
        p.send_signal(signal.SIGKILL)
        assert p.wait(5) == -signal.SIGKILL


def test_the_holder_program_is_a_small_static_elf():
    prog = holder_program()
    assert prog[:4] == b"\x7fELF" and prog[4] == 2 and prog[18] == 0x3E
    assert len(prog) < 200 and b"ld-linux" not in prog   # no interpreter: static


# --- the CRI PodSandboxConfig view -------------------------------------------------------------

def test_the_pod_config_view_reads_the_kubelets_own_message():
    cri = pytest.importorskip("cri_api.v1.api_pb2")
    cfg = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", uid="u-1", namespace="prod", attempt=2),
        hostname="web-0", log_directory="/var/log/pods/x", labels={"app": "web"},
        annotations={"spinbox.io/memory": "1024"},
        dns_config=cri.DNSConfig(servers=["10.0.0.10"]),
        port_mappings=[cri.PortMapping(container_port=80)],
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/burstable/podu-1",
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(pid=cri.POD)),
            sysctls={"net.core.somaxconn": "1024"},
            resources=cri.LinuxContainerResources(cpu_period=100000, cpu_quota=150000, cpu_shares=1536,
                                                  memory_limit_in_bytes=256 << 20)))
    got = parse_pod_config(_any(cfg))
    assert (got.metadata.name, got.metadata.uid, got.metadata.namespace, got.metadata.attempt) == \
        ("web", "u-1", "prod", 2)
    assert got.hostname == "web-0" and dict(got.labels) == {"app": "web"}
    assert dict(got.annotations) == {"spinbox.io/memory": "1024"}
    assert got.linux.cgroup_parent == "/kubepods/burstable/podu-1"
    r = got.linux.resources
    assert (r.cpu_period, r.cpu_quota, r.cpu_shares, r.memory_limit_in_bytes) == (100000, 150000, 1536, 256 << 20)
    assert dict(got.linux.sysctls) == {"net.core.somaxconn": "1024"}


@pytest.mark.parametrize("options, message", [
    (any_pb2.Any(type_url="containerd.runc.v1.Options", value=b""), "is not a CRI PodSandboxConfig"),
    (any_pb2.Any(type_url="runtime.v1.PodSandboxConfig", value=b"\x12\xff"), "not a valid PodSandboxConfig"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_pod_config(options)


def test_no_options_is_an_empty_config():
    assert parse_pod_config(None) == pod_pb2.PodSandboxConfig()


@pytest.mark.parametrize("kw, exc, message", [
    ({"sandbox_id": "../x"}, InvalidArgument, "invalid sandbox id"),
    ({"bundle_path": "rel/bundle"}, InvalidArgument, "not absolute"),
    ({"bundle_path": "/nonexistent/bundle"}, InvalidArgument, "has no rootfs directory"),
    ({"netns_path": "var/run/netns/x"}, InvalidArgument, "netns path"),
    ({"has_rootfs": True}, Unimplemented, "rootfs mounts"),
])
def test_create_requests_are_checked(tmp_path, kw, exc, message):
    args = {"sandbox_id": ID, "bundle_path": str(_bundle(tmp_path)), "netns_path": "/var/run/netns/cni-1",
            "options": None, "annotations": {}, "has_rootfs": False, **kw}
    with pytest.raises(exc, match=message):
        pod_request(**args)


# --- the holder's spec (also what the VM starts from) -----------------------------------------

def _config(**linux) -> pod_pb2.PodSandboxConfig:
    return pod_pb2.PodSandboxConfig(metadata=pod_pb2.PodSandboxMetadata(name="web", uid="u-1", namespace="prod"),
                                    hostname="web-0", annotations={"team": "a"},
                                    linux=pod_pb2.LinuxPodSandboxConfig(**linux))


def test_the_pod_spec_joins_the_cri_netns_and_holds_the_pod_namespaces(tmp_path):
    req = PodRequest(ID, _bundle(tmp_path), "/var/run/netns/cni-1", _config())
    spec = pod_spec(req)
    kinds = {ns["type"]: ns.get("path") for ns in spec["linux"]["namespaces"]}
    assert kinds == {"pid": None, "ipc": None, "uts": None, "mount": None, "network": "/var/run/netns/cni-1"}
    choice = plan.choose(spec)
    assert (choice.mode, choice.netns_path) == ("existing", "/var/run/netns/cni-1")
    assert plan.guest_hostname(spec) == "web-0"
    spec_mod.refuse_host_namespaces(spec)          # a CRI sandbox spec with all its namespaces
    ann = spec["annotations"]
    assert ann["io.kubernetes.cri.container-type"] == "sandbox" and ann["io.kubernetes.cri.sandbox-id"] == ID
    assert ann["io.kubernetes.cri.sandbox-name"] == "web" and ann["team"] == "a"
    assert spec["process"]["args"] == [HOLDER_PATH] and spec["process"]["user"]["uid"] != 0
    assert spec["process"]["capabilities"]["bounding"] == [] and spec["root"]["readonly"] is True


def test_the_pods_sysctls_go_to_the_holder_as_to_a_pause_container(tmp_path):
    sysctls = {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "0"}
    spec = pod_spec(PodRequest(ID, _bundle(tmp_path), "/n", _config(sysctls=sysctls)))
    assert spec["linux"]["sysctl"] == sysctls
    assert "sysctl" not in pod_spec(PodRequest(ID, _bundle(tmp_path / "b"), "/n", _config()))["linux"]


def test_a_host_network_pod_is_refused_as_under_the_pause_path(tmp_path):
    spec = pod_spec(PodRequest(ID, _bundle(tmp_path), "", _config()))
    with pytest.raises(InvalidArgument, match="hostNetwork"):
        spec_mod.refuse_host_namespaces(spec)


def test_the_pod_resources_size_the_vm_as_containerds_annotations_would(tmp_path):
    res = pod_pb2.LinuxContainerResources(cpu_period=100000, cpu_quota=250000, cpu_shares=2560,
                                          memory_limit_in_bytes=768 << 20)
    spec = pod_spec(PodRequest(ID, _bundle(tmp_path), "/n", _config(resources=res)))
    assert sizing.pod_need_of_spec(spec) == sizing.Need(3, 768)
    assert sizing.pod_need_of_spec(pod_spec(PodRequest(ID, _bundle(tmp_path / "b"), "/n", _config()))) == \
        sizing.Need()


@pytest.mark.parametrize("parent, want", [
    ("/kubepods/burstable/podu-1", "kubepods/burstable/podu-1"),
    ("kubepods-burstable-podu_1.slice", "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podu_1.slice"),
])
def test_the_vms_host_cgroup_goes_below_the_pods(tmp_path, parent, want):
    spec = pod_spec(PodRequest(ID, _bundle(tmp_path), "/n", _config(cgroup_parent=parent)))
    assert hostcgroup.pod_cgroup(spec) == want


# --- the lifecycle, through the service ---------------------------------------------------------

class Harness:
    def __init__(self, tmp: Path) -> None:
        self.factory = FakeSandboxFactory()
        self.pub = RecordingPublisher()
        self.exits = 0
        self.tasks = build_task_service(self.factory, self.pub, namespace="k8s.io",
                                        request_exit=self._exit, drain_timeout=1.0, agent_timeout=5.0)
        self.svc = sandbox_service(self.tasks, group=ID, request_exit=self._exit)
        self.svc.pod.readonly_rootfs = False        # a read-only rootfs is a host bind: root only
        self.bundle = _bundle(tmp)

    def _exit(self) -> None:
        self.exits += 1

    async def create(self, options: any_pb2.Any | None = None) -> None:
        req = sb_pb.CreateSandboxRequest(sandbox_id=ID, bundle_path=str(self.bundle),
                                         netns_path="/var/run/netns/cni-1", options=options or _any(_config()))
        await self.svc.CreateSandbox(req, CTX)

    async def start(self) -> sb_pb.StartSandboxResponse:
        return await self.svc.StartSandbox(sb_pb.StartSandboxRequest(sandbox_id=ID), CTX)

    async def status(self) -> sb_pb.SandboxStatusResponse:
        return await self.svc.SandboxStatus(sb_pb.SandboxStatusRequest(sandbox_id=ID, verbose=True), CTX)


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


async def test_every_rpc_names_this_shims_sandbox(h):
    with pytest.raises(ttrpc.NotFound, match="not served by this shim"):
        await h.svc.StartSandbox(sb_pb.StartSandboxRequest(sandbox_id="other"), CTX)
    with pytest.raises(ttrpc.NotFound, match="not served by this shim"):
        await h.svc.PingSandbox(sb_pb.PingRequest(sandbox_id="other"), CTX)


async def test_nothing_before_create_and_start_and_no_second_create(h):
    with pytest.raises(ttrpc.FailedPrecondition, match="needs a created sandbox"):
        await h.start()
    await h.create()
    with pytest.raises(ttrpc.AlreadyExists, match="already exists"):
        await h.create()
    for call, req in ((h.svc.StopSandbox, sb_pb.StopSandboxRequest(sandbox_id=ID)),
                      (h.svc.WaitSandbox, sb_pb.WaitSandboxRequest(sandbox_id=ID)),
                      (h.svc.PingSandbox, sb_pb.PingRequest(sandbox_id=ID)),
                      (h.svc.SandboxMetrics, sb_pb.SandboxMetricsRequest(sandbox_id=ID))):
        with pytest.raises(ttrpc.FailedPrecondition, match="needs StartSandbox first"):
            await call(req, CTX)
    st = await h.status()
    assert (st.state, st.pid) == ("SANDBOX_NOTREADY", 0)
    assert h.factory.made == [], "nothing booted before StartSandbox"


async def test_create_refuses_a_bad_request_and_stays_new(h):
    with pytest.raises(ttrpc.InvalidArgument, match="not a CRI PodSandboxConfig"):
        await h.create(options=any_pb2.Any(type_url="x.Y", value=b""))
    await h.create()                                # the good one is still accepted


async def test_a_pod_runs_stops_and_shuts_down(h):
    await h.create()
    r = await h.start()
    sb, agent = h.factory.last, h.factory.last.fake_agent
    holder_pid = agent.procs[(ID, "")].pid
    assert r.pid == holder_pid and r.created_at.seconds > 0
    assert sb.spec is not None and plan.choose(sb.spec).netns_path == "/var/run/netns/cni-1"
    spec = json.loads((h.bundle / "pod" / "config.json").read_text())
    assert spec["process"]["args"] == [HOLDER_PATH]
    assert (h.bundle / "pod" / "rootfs" / "pause").read_bytes() == holder_program()
    assert os.listdir(h.bundle / "rootfs") == [], "containerd's own rootfs dir stays empty (it rmdirs it)"
    assert [c.args[0] for c in agent.called("create")] == [ID]

    st = await h.status()
    assert (st.sandbox_id, st.state, st.pid) == (ID, "SANDBOX_READY", holder_pid)
    assert st.info["state"] == "running" and st.info["vm"] == "ready"
    await h.svc.PingSandbox(sb_pb.PingRequest(sandbox_id=ID), CTX)
    p = (await h.svc.Platform(sb_pb.PlatformRequest(sandbox_id=ID), CTX)).platform
    assert (p.os, p.architecture) == ("linux", "amd64")
    m = (await h.svc.SandboxMetrics(sb_pb.SandboxMetricsRequest(sandbox_id=ID), CTX)).metrics
    assert m.id == ID and m.data.type_url == "io.containerd.cgroups.v2.Metrics"

    # containerd calls the Task API's Shutdown after each container's delete: the pod stays
    await h.tasks.Shutdown(shim_pb2.ShutdownRequest(id="c1"), CTX)
    await asyncio.sleep(0.02)
    assert h.exits == 0 and "stop" not in sb.journal

    waiter = asyncio.ensure_future(h.svc.WaitSandbox(sb_pb.WaitSandboxRequest(sandbox_id=ID), CTX))
    await asyncio.sleep(0.02)
    assert not waiter.done(), "WaitSandbox blocks while the pod runs"
    agent.exit_on_kill = True
    await h.svc.StopSandbox(sb_pb.StopSandboxRequest(sandbox_id=ID, timeout_secs=2), CTX)
    w = await asyncio.wait_for(waiter, T)
    assert w.exit_status == 128 + signal.SIGKILL and w.exited_at.seconds > 0
    assert (ID, "", 9, True) in [c.args for c in agent.called("kill")]
    assert sb.journal.count("stop") == 1
    st = await h.status()
    assert st.state == "SANDBOX_NOTREADY" and st.exited_at.seconds > 0
    with pytest.raises(ttrpc.Unavailable, match="not running"):
        await h.svc.PingSandbox(sb_pb.PingRequest(sandbox_id=ID), CTX)
    await h.svc.StopSandbox(sb_pb.StopSandboxRequest(sandbox_id=ID), CTX)    # again: nothing more
    assert sb.journal.count("stop") == 1

    await h.svc.ShutdownSandbox(sb_pb.ShutdownSandboxRequest(sandbox_id=ID), CTX)
    assert ID not in h.tasks.manager.containers and not h.tasks.manager.busy
    assert sorted(os.listdir(h.bundle)) == ["rootfs"], "the holder's bundle is removed"
    await asyncio.sleep(0.05)
    assert h.exits == 1, "the daemon is asked to exit once"


async def test_shutdown_of_a_created_sandbox_exits_without_booting(h):
    await h.create()
    await h.svc.ShutdownSandbox(sb_pb.ShutdownSandboxRequest(sandbox_id=ID), CTX)
    await asyncio.sleep(0.05)
    assert h.exits == 1 and h.factory.made == []


async def test_a_failed_start_leaves_no_holder(h):
    h.factory.plan(agent_fail={"start": ttrpc.Internal("guest: runc start failed")})
    await h.create()
    with pytest.raises(ttrpc.Internal, match="runc start failed"):
        await h.start()
    assert ID not in h.tasks.manager.containers
    assert (await h.start()).pid > 0, "a second StartSandbox may try again"


async def test_a_container_still_running_at_stop_sandbox_is_reported_exited(h, tmp_path):
    await h.create()
    await h.start()
    agent = h.factory.last.fake_agent
    bundle = make_bundle(tmp_path, "c1")
    await h.tasks.Create(shim_pb2.CreateTaskRequest(id="c1", bundle=str(bundle)), CTX)
    await h.tasks.Start(shim_pb2.StartRequest(id="c1"), CTX)
    agent.exit_on_kill = True
    await h.svc.StopSandbox(sb_pb.StopSandboxRequest(sandbox_id=ID, timeout_secs=2), CTX)
    w = await asyncio.wait_for(h.tasks.Wait(shim_pb2.WaitRequest(id="c1"), CTX), T)
    assert w.exit_status == 255, "the VM is gone: c1's exit is containerd's 'unknown'"
    with pytest.raises(ttrpc.FailedPrecondition):
        await h.tasks.Create(shim_pb2.CreateTaskRequest(id="c2", bundle=str(make_bundle(tmp_path, "c2"))), CTX)
