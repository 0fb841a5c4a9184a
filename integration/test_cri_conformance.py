"""CRI behaviour a kubelet relies on, with spinbox as the runtime handler (issue 13 item 4): the
REAL containerd 1.6 CRI plugin over gRPC, each pod in one QEMU microVM (TCG), the environment
of integration/cri.py (shared with test_cri.py, which walks one pod's life; nothing here
repeats it).

One pod (`shared`) with a shared PID namespace, pod sysctls and a DNS config serves most tests
(a VM boot each is the expensive part); its containers must join the sandbox (pause)
container's namespaces as under runc:
  * PID: `ps` in one container sees the other's process, PID 1 is the pause process; a debug
    container (TARGET) shares the PID namespace of the container it targets;
  * IPC, UTS: the same namespace in every container, the pod's hostname;
  * the pod's sysctls (set on the sandbox: kernel.shm_rmid_forced, fs.mqueue.msg_max in the
    IPC namespace, net.ipv4.ip_unprivileged_port_start in the pod's network) are what a
    container sees;
  * StopContainer(timeout=10) finishes in < 12 s and the container is removed: `sh -c top` in
    its own PID namespace and in the pod's, and a PID 1 that ignores SIGTERM (SIGKILL after the
    grace period);
  * ExecSync and streaming exec (the Exec URL over WebSocket, as kubectl exec), the CRI log
    file's content, container and pod stats, DNS config, run-as user/group, a read-only
    rootfs, the RuntimeDefault seccomp profile in force;
  * host namespaces (hostNetwork/hostPID/hostIPC) are refused at RunPodSandbox with the
    reason, leaving nothing behind. (A container cannot ask for them on its own: CRI joins
    every container to its sandbox's network/IPC/UTS namespaces, and to the sandbox's PID
    namespace unless its mode is CONTAINER.)
"""
from __future__ import annotations

import contextlib
import re
import time
import uuid
from pathlib import Path

import pytest

from integration.cri import (HANDLER, RPC_TIMEOUT, Pod, container_running, cri, cri_environment, cri_leftovers,
                             grpc, ok, pod_qemus, remove_pod_quietly, stream_exec)
from integration.test_ctr_run import wait_until

pytestmark = pytest.mark.integration

crienv = pytest.fixture(scope="module", name="crienv")(cri_environment)

SYSCTLS = {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "17", "net.ipv4.ip_unprivileged_port_start": "79"}
DNS = cri.DNSConfig(servers=["10.99.0.10"], searches=["spinbox.test", "svc.spinbox.test"], options=["ndots:3"])
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) (stdout|stderr) ([FP]) (.*)$")


def _run_pod(e, pod: Pod) -> str:
    e.pods.append(pod)
    pod.id = e.api.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod.config(), runtime_handler=HANDLER),
                                    timeout=RPC_TIMEOUT).pod_sandbox_id
    return pod.id


def _create(e, pod: Pod, config: cri.ContainerConfig, start: bool = True) -> str:
    rt = e.api.rt
    cid = rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod.id, config=config,
                                                        sandbox_config=pod.config()),
                             timeout=RPC_TIMEOUT).container_id
    pod.containers.append(cid)
    if start:
        rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
        container_running(rt, cid)
    return cid


def _remove(e, pod: Pod, cid: str) -> None:
    e.api.rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    pod.containers.remove(cid)


def _discard(e, pod: Pod, cid: str) -> None:
    """Stop and remove a container a test is done with: each one holds PCIe hot-plug ports of
    the pod's VM (its rootfs and bind shares) until it is removed."""
    e.api.rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=1), timeout=RPC_TIMEOUT)
    _remove(e, pod, cid)


def _status(e, cid: str) -> cri.ContainerStatus:
    return e.api.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=30).status


@pytest.fixture(scope="module")
def shared(crienv):
    """The pod with a shared PID namespace, its sysctls and DNS config; containers a and b."""
    e = crienv
    pod = Pod(e.pod.log_dir, pid=cri.POD, sysctls=SYSCTLS, dns=DNS)
    _run_pod(e, pod)
    pod.a = _create(e, pod, pod.container_config("a", "sleep", "3601"))
    pod.b = _create(e, pod, pod.container_config("b", "sleep", "3602"))
    assert len(pod_qemus(e)) == 1, "one VM for the pod"
    yield pod
    remove_pod_quietly(e.api, pod)
    e.pods.remove(pod)
    pod.id = ""


def _ns(e, cid: str, kind: str) -> str:
    return ok(e.api.exec_sync(cid, "readlink", f"/proc/self/ns/{kind}"), f"readlink ns/{kind}").strip()


def _read(e, cid: str, path: str) -> str:
    return ok(e.api.exec_sync(cid, "cat", path), f"cat {path}").strip()


# --- the pod's namespaces -----------------------------------------------------------------------

def test_shared_pid_namespace_shows_the_other_containers_process(crienv, shared):
    ps = ok(crienv.api.exec_sync(shared.b, "ps", "-o", "pid,args"), "ps in b")
    assert "sleep 3601" in ps, f"b sees a's process in the pod's PID namespace:\n{ps}"
    assert "sleep 3602" in ps
    init = _read(crienv, shared.a, "/proc/1/cmdline").replace("\0", " ").strip()
    assert init == "/bin/sleep 2147483647", f"PID 1 of the pod's namespace is the pause process: {init!r}"
    assert _ns(crienv, shared.a, "pid") == _ns(crienv, shared.b, "pid")


def test_target_pid_mode_joins_the_target_containers_namespace(crienv, shared):
    """A debug container (pid TARGET, as `kubectl debug --target`) sees the processes of the
    container it targets, here one with a PID namespace of its own."""
    e = crienv
    own = _create(e, shared, shared.container_config("own", "sleep", "3603", pid=cri.CONTAINER))
    dbg = _create(e, shared, shared.container_config("dbg", "sleep", "3604", pid=cri.TARGET, target=own))
    ps = ok(e.api.exec_sync(dbg, "ps", "-o", "pid,args"), "ps in dbg")
    assert re.search(r"^\s*1 sleep 3603$", ps, re.M), f"the target's init is PID 1 of dbg's namespace:\n{ps}"
    assert "sleep 3601" not in ps, "not the pod's PID namespace"
    assert _ns(e, dbg, "pid") == _ns(e, own, "pid") != _ns(e, shared.a, "pid")
    _discard(e, shared, dbg)
    _discard(e, shared, own)


def test_ipc_and_uts_namespaces_are_the_pods(crienv, shared):
    for kind in ("ipc", "uts"):
        a, b = _ns(crienv, shared.a, kind), _ns(crienv, shared.b, kind)
        assert a == b and a.startswith(f"{kind}:["), f"{kind}: a {a!r}, b {b!r}"
    for cid in (shared.a, shared.b):
        assert ok(crienv.api.exec_sync(cid, "hostname"), "hostname").strip() == shared.name
    # the mount namespace stays the container's own (CRI never shares it)
    assert _ns(crienv, shared.a, "mnt") != _ns(crienv, shared.b, "mnt")


def test_pod_sysctls_are_what_containers_see(crienv, shared):
    for key, value in SYSCTLS.items():
        path = "/proc/sys/" + key.replace(".", "/")
        assert _read(crienv, shared.b, path) == value, f"{key} in container b"


def test_dns_config_reaches_resolv_conf(crienv, shared):
    conf = _read(crienv, shared.a, "/etc/resolv.conf")
    assert re.search(r"^nameserver 10\.99\.0\.10$", conf, re.M), conf
    assert re.search(r"^search spinbox\.test svc\.spinbox\.test$", conf, re.M), conf
    assert re.search(r"^options ndots:3$", conf, re.M), conf


# --- StopContainer finishes within its timeout ------------------------------------------------

@pytest.mark.parametrize("name,args,pid_mode,code,limit", [
    ("top-own", ("sh", "-c", "top"), "own", 143, 12.0),       # busybox top ends itself on SIGTERM
    ("top-pod", ("sh", "-c", "top"), "pod", 143, 10.0),
    ("pid1-own", ("sleep", "3600"), "own", 137, 12.0),        # PID 1 without a handler: SIGTERM ignored
])
def test_stop_container_finishes_within_its_timeout(crienv, shared, name, args, pid_mode, code, limit):
    """StopContainer(timeout=10): SIGTERM, the 10 s grace period, SIGKILL, the exit reported,
    all within 12 s, and the container removable; a PID 1 that ignores SIGTERM is SIGKILLed."""
    e = crienv
    cid = _create(e, shared, shared.container_config(name, *args, tty=True,
                                                    pid=cri.CONTAINER if pid_mode == "own" else cri.POD))
    time.sleep(1)                           # the command is running, not just starting
    t = time.monotonic()
    e.api.rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=10), timeout=RPC_TIMEOUT)
    took = time.monotonic() - t
    st = _status(e, cid)
    assert st.state == cri.CONTAINER_EXITED, st
    assert took < limit, f"StopContainer(timeout=10) took {took:.1f} s (limit {limit} s)"
    assert st.exit_code == code, f"exit code {st.exit_code}, want {code}"
    _remove(e, shared, cid)
    listed = [c.id for c in e.api.rt.ListContainers(cri.ListContainersRequest(), timeout=30).containers]
    assert cid not in listed
    print(f"StopContainer(timeout=10) of {' '.join(args)}, {pid_mode} PID namespace: {took:.2f} s, exit {code}")


# --- exec, logs, stats ---------------------------------------------------------------------------

def test_exec_sync_and_streaming_exec(crienv, shared):
    r = crienv.api.exec_sync(shared.a, "sh", "-c", "echo to-out; echo to-err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr) == (7, b"to-out\n", b"to-err\n")
    url = crienv.api.rt.Exec(cri.ExecRequest(container_id=shared.a, cmd=["sh", "-c", "echo s-out; echo s-err >&2; exit 3"],
                                             stdout=True, stderr=True), timeout=60).url
    out, err, status = stream_exec(url)
    assert (out, err) == (b"s-out\n", b"s-err\n"), (out, err, status)
    assert status.get("status") == "Failure", status
    causes = {c.get("reason"): c.get("message") for c in status.get("details", {}).get("causes", [])}
    assert causes.get("ExitCode") == "3", status
    out, _, status = stream_exec(crienv.api.rt.Exec(cri.ExecRequest(
        container_id=shared.b, cmd=["cat", "/proc/1/cmdline"], stdout=True, stderr=True), timeout=60).url)
    assert status.get("status") == "Success" and out.startswith(b"/bin/sleep"), (out, status)


def test_container_log_file_has_cri_lines_per_stream(crienv, shared):
    e = crienv
    cid = _create(e, shared, shared.container_config("logs", "sh", "-c",
                                                    "echo out-1; echo err-1 >&2; printf partial; exec sleep 3600"))
    log = shared.log_dir / "logs.log"

    def lines() -> list[tuple[str, str, str]]:
        if not log.exists():
            return []
        out = []
        for raw in log.read_text(errors="replace").splitlines():
            m = LOG_LINE.match(raw)
            assert m, f"not a CRI log line: {raw!r}"
            out.append((m.group(2), m.group(3), m.group(4)))
        return out
    wait_until(lambda: len(lines()) >= 2, 30, lambda: f"two log lines in {log}: {lines()}")
    got = lines()
    assert ("stdout", "F", "out-1") in got and ("stderr", "F", "err-1") in got, got
    st = _status(e, cid)
    assert st.log_path == str(log)
    _discard(e, shared, cid)


def test_container_stats_are_not_zero(crienv, shared):
    e = crienv
    ok(e.api.exec_sync(shared.a, "sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"), "busy loop")
    st = e.api.rt.ContainerStats(cri.ContainerStatsRequest(container_id=shared.a), timeout=60).stats
    assert st.attributes.id == shared.a
    assert st.cpu.usage_core_nano_seconds.value > 0, st
    assert st.memory.working_set_bytes.value > 0, st
    listed = e.api.rt.ListContainerStats(cri.ListContainerStatsRequest(
        filter=cri.ContainerStatsFilter(pod_sandbox_id=shared.id)), timeout=60).stats
    assert {s.attributes.id for s in listed} >= {shared.a, shared.b}


def _cgroup_dirs(rel: str) -> list[Path]:
    """`rel` in every mounted hierarchy (v2: the one; v1: each controller's)."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [root / rel.lstrip("/")]
    return [d / rel.lstrip("/") for d in sorted(root.iterdir())
            if d.is_dir() and not d.is_symlink() and (d / "cgroup.procs").exists()]


def test_pod_stats_are_not_zero(crienv):
    """CRI reads a pod's stats from the pod's cgroup (its cgroup_parent, which the kubelet makes);
    the shim runs the pod's QEMU and virtiofsd in a cgroup below it: what the pod costs."""
    e = crienv
    parent = f"/spinbox-it-{uuid.uuid4().hex[:8]}"
    dirs = _cgroup_dirs(parent)
    for d in dirs:
        d.mkdir()
    pod = Pod(e.pod.log_dir, cgroup_parent=parent)
    try:
        _run_pod(e, pod)
        cid = _create(e, pod, pod.container_config("busy", "sh", "-c", "while :; do :; done"))
        time.sleep(2)
        try:
            st = e.api.rt.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod.id), timeout=60).stats
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            pytest.skip(f"this containerd's CRI has no PodSandboxStats: {err.details()}")
        assert st.attributes.id == pod.id
        assert st.linux.memory.working_set_bytes.value > 0, st
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        acct = dirs if v2 else [d for d in dirs if "cpuacct" in d.parts[4].split(",")]
        if any(p.is_dir() for d in acct for p in d.iterdir()):
            assert st.linux.cpu.usage_core_nano_seconds.value > 0, st
        else:   # v1 with cpuacct mounted apart from cpu: the shim's cgroup is not in that hierarchy
            print(f"pod CPU stats not checked: no cgroup of the VM's below {parent} in {acct or 'a cpuacct hierarchy'}")
        ids = {c.attributes.id for c in st.linux.containers}
        assert cid in ids, st
        print(f"pod stats: memory working set {st.linux.memory.working_set_bytes.value >> 20} MiB, "
              f"cpu {st.linux.cpu.usage_core_nano_seconds.value / 1e9:.2f} s")
    finally:
        remove_pod_quietly(e.api, pod)
        e.pods.remove(pod)
        pod.id = ""
        for d in dirs:
            with contextlib.suppress(OSError):
                wait_until(lambda d=d: not any(p.is_dir() for p in d.iterdir()), 30, f"{d} emptied")
                d.rmdir()


# --- security context --------------------------------------------------------------------------

def test_run_as_user_and_group(crienv, shared):
    sc = cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=1234),
                                           run_as_group=cri.Int64Value(value=2345), supplemental_groups=[3456])
    cid = _create(crienv, shared, shared.container_config("runas", "sleep", "3600", security=sc))
    ident = ok(crienv.api.exec_sync(cid, "id"), "id").strip()
    assert ident.startswith("uid=1234 gid=2345"), ident
    assert "3456" in ident.split("groups=")[-1], ident
    status = _read(crienv, cid, "/proc/self/status")      # PID 1 is the pod's pause process
    assert re.search(r"^Uid:\s+1234\s", status, re.M) and re.search(r"^Gid:\s+2345\s", status, re.M), status
    _discard(crienv, shared, cid)


def test_read_only_rootfs(crienv, shared):
    sc = cri.LinuxContainerSecurityContext(readonly_rootfs=True)
    cid = _create(crienv, shared, shared.container_config("ro", "sleep", "3600", security=sc))
    r = crienv.api.exec_sync(cid, "touch", "/probe")
    assert r.exit_code != 0 and b"Read-only file system" in r.stderr, (r.exit_code, r.stderr)
    mounts = _read(crienv, cid, "/proc/self/mounts")
    root = next(line for line in mounts.splitlines() if line.split()[1] == "/")
    assert "ro" in root.split()[3].split(","), root
    assert _read(crienv, cid, "/etc/hostname") == shared.name, "CRI's files are still mounted"
    _discard(crienv, shared, cid)


def test_runtime_default_seccomp_profile_is_in_force(crienv, shared):
    sc = cri.LinuxContainerSecurityContext(seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault))
    cid = _create(crienv, shared, shared.container_config("seccomp", "sleep", "3600", security=sc))
    assert re.search(r"^Seccomp:\s+2$", _read(crienv, cid, "/proc/self/status"), re.M), "filter mode"
    # a container without a profile (CRI's default here: unconfined) keeps mode 0
    assert re.search(r"^Seccomp:\s+0$", _read(crienv, shared.a, "/proc/self/status"), re.M)
    _discard(crienv, shared, cid)


# --- host namespaces are refused ----------------------------------------------------------------

@pytest.mark.parametrize("field,mode", [("hostNetwork", {"network": cri.NODE}), ("hostPID", {"pid": cri.NODE}),
                                        ("hostIPC", {"ipc": cri.NODE})])
def test_host_namespace_pod_is_refused_with_the_reason(crienv, shared, field, mode):
    e = crienv
    before = set(cri_leftovers(e, e.net))          # the shared pod's VM and files are expected
    qemus = pod_qemus(e)
    pod = Pod(e.pod.log_dir, **mode)
    with pytest.raises(grpc.RpcError) as err:
        _run_pod(e, pod)
    assert field in err.value.details() and "own VM" in err.value.details(), err.value.details()
    names = [s.metadata.name for s in e.api.rt.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items]
    assert pod.name not in names, f"CRI kept no sandbox record: {names}"
    assert pod_qemus(e) == qemus, "no VM was started"
    wait_until(lambda: set(cri_leftovers(e, e.net)) <= before, 30,
               lambda: f"nothing left by the refused pod: {set(cri_leftovers(e, e.net)) - before}")
