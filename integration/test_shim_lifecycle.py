"""The shim binary driven by a real containerd 1.6 (`ctr run --runtime io.containerd.spinbox.v1`)
and by hand: start → daemon → TTRPC → Shutdown → delete, group reuse, crash cleanup.

With the Task service installed `ctr run --rm` runs the task; without it (placeholder service)
Create fails with our UNIMPLEMENTED message, which must reach ctr. Either way containerd must
run our `delete` (which prints a DeleteResponse) and no daemon, socket, state or process that
refers to our state dir may be left behind.

containerd is started with a PATH prefix holding a tracing wrapper named
`containerd-shim-spinbox-v1`: it runs the real console script and appends each invocation
(argv, exit code, stdout) to a JSON-lines file, so the test can see what containerd ran.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import shutil
import time
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

import ttrpc
from integration.containerd import Containerd, missing_prerequisites
from integration.images import import_busybox
from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.shim import manager
from spinbox.shim.state import GroupPaths, State
from spinbox.shim.vm import procinfo

pytestmark = pytest.mark.integration

REAL_SHIM = Path(sys.executable).parent / "containerd-shim-spinbox-v1"
RUNTIME = "io.containerd.spinbox.v1"

WRAPPER = """#!{python}
import json, os, subprocess, sys
r = subprocess.run([{real!r}] + sys.argv[1:], stdout=subprocess.PIPE)
with open({trace!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "rc": r.returncode, "cwd": os.getcwd(),
                         "stdout": r.stdout.hex()}}) + "\\n")
sys.stdout.buffer.write(r.stdout)
sys.exit(r.returncode)
"""


@pytest.fixture(scope="module")
def env():
    why = missing_prerequisites()
    if why:
        if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
            pytest.fail("integration prerequisites missing: " + "; ".join(why))
        pytest.skip("integration prerequisites missing: " + "; ".join(why))
    if not REAL_SHIM.exists():
        pytest.fail(f"{REAL_SHIM} missing: install the project (pip install -e .)")
    work = Path(tempfile.mkdtemp(prefix="sbx-shim-", dir="/tmp"))
    state_dir = work / "st"        # short: the state dir holds unix sockets
    bin_dir = work / "bin"
    bin_dir.mkdir()
    trace = work / "trace.jsonl"
    wrapper = bin_dir / "containerd-shim-spinbox-v1"
    wrapper.write_text(WRAPPER.format(python=sys.executable, real=str(REAL_SHIM), trace=str(trace)))
    wrapper.chmod(0o755)
    cfg = work / "config.json"
    cfg.write_text(json.dumps({"paths": {"state_dir": str(state_dir)}}))
    c = Containerd.create(path_prefix=[bin_dir], env={"SPINBOX_CONFIG": str(cfg)}, cri=False)
    try:
        ref = import_busybox(c)
        yield {"c": c, "state_dir": state_dir, "trace": trace, "cfg": cfg, "ref": ref, "work": work}
    finally:
        c.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def _trace(env) -> list[dict]:
    try:
        return [json.loads(line) for line in env["trace"].read_text().splitlines()]
    except FileNotFoundError:
        return []


def _daemons(c: Containerd) -> list[int]:
    return [p for p in c.shim_pids() if "serve" in (procinfo.cmdline(p) or [])]


def _assert_nothing_left(env, namespace: str, group: str) -> None:
    c = env["c"]
    deadline = time.monotonic() + 10
    while _daemons(c) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _daemons(c) == [], "shim daemon still running"
    sock = manager.socket_path(manager.socket_address(c.address, namespace, group))
    assert not os.path.exists(sock), f"socket {sock} left behind"
    paths = GroupPaths(env["state_dir"], namespace, group)
    assert not paths.dir.exists() and not paths.lock_file.exists()
    assert not (env["state_dir"] / namespace).exists(), list((env["state_dir"] / namespace).iterdir())
    # no process (QEMU, virtiofsd, ...) still refers to our state dir
    marker = str(env["state_dir"])
    left = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
            if any(marker in a for a in (procinfo.cmdline(p) or []))]
    assert left == [], [procinfo.cmdline(p) for p in left]


def test_ctr_run_start_and_delete_leave_nothing(env):
    """`ctr run --rm` through our start/daemon/delete; whatever the Task service does with the
    task, containerd must have run `start` once (address printed), `delete` once (a
    DeleteResponse printed), and nothing of ours may be left afterwards."""
    c = env["c"]
    r = c.ctr("run", "--rm", "--runtime", RUNTIME, "--fifo-dir", str(c.fifo_dir), env["ref"],
              "lc1", "true", check=False, timeout=120)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, err
    calls = _trace(env)
    starts = [t for t in calls if t["argv"][-1] == "start" and "lc1" in t["argv"]]
    deletes = [t for t in calls if t["argv"][-1] == "delete" and "lc1" in t["argv"]]
    assert len(starts) == 1 and starts[0]["rc"] == 0
    address = bytes.fromhex(starts[0]["stdout"]).decode()
    assert address == manager.socket_address(c.address, c.namespace, "lc1")
    assert starts[0]["cwd"].endswith(f"/{c.namespace}/lc1")          # cwd = bundle
    # containerd ran our delete once the task was gone, and it answered a DeleteResponse
    assert len(deletes) == 1 and deletes[0]["rc"] == 0
    assert "-bundle" in deletes[0]["argv"]
    resp = shim_pb2.DeleteResponse()
    resp.ParseFromString(bytes.fromhex(deletes[0]["stdout"]))
    assert resp.exited_at.seconds > 0
    _assert_nothing_left(env, c.namespace, "lc1")
    assert "lc1" not in c.ctr("containers", "ls", "-q").stdout.decode()


def _run_shim(env, bundle: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    c = env["c"]
    e = dict(os.environ, SPINBOX_CONFIG=str(env["cfg"]), TTRPC_ADDRESS=c.ttrpc_address)
    return subprocess.run([str(REAL_SHIM), "-namespace", c.namespace, "-address", c.address,
                           "-publish-binary", "/usr/bin/containerd", *args], input=stdin,
                          capture_output=True, cwd=bundle, env=e, timeout=60)


def _bundle(env, name: str, annotations: dict[str, str]) -> Path:
    b = env["work"] / "bundles" / name
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": annotations}))
    return b


async def _call(address: str, method: str, req, resp_type):
    client = await ttrpc.connect_unix(address)
    try:
        return await client.call("containerd.task.v2.Task", method, req, resp_type, timeout=10)
    finally:
        await client.close()


def test_start_twice_for_one_group_reuses_the_daemon(env):
    c = env["c"]
    pod = {"io.kubernetes.cri.sandbox-id": "pod1"}
    b1, b2 = _bundle(env, "pod1", pod), _bundle(env, "ctr1", pod)
    r1 = _run_shim(env, b1, "-id", "pod1", "start")
    assert r1.returncode == 0 and r1.stderr == b"", r1.stderr
    r2 = _run_shim(env, b2, "-id", "ctr1", "start")
    assert r2.returncode == 0 and r2.stderr == b"", r2.stderr
    address = r1.stdout.decode()
    assert r2.stdout.decode() == address == manager.socket_address(c.address, c.namespace, "pod1")
    assert (b1 / "address").read_text() == (b2 / "address").read_text() == address
    assert len(_daemons(c)) == 1
    pid = _daemons(c)[0]
    conn = asyncio.run(_call(address, "Connect", shim_pb2.ConnectRequest(id="ctr1"), shim_pb2.ConnectResponse))
    assert conn.shim_pid == pid
    # delete of a pod container while the sandbox daemon serves: the daemon stays
    d = _run_shim(env, b2, "-id", "ctr1", "-bundle", str(b2), "delete")
    assert d.returncode == 0
    assert _daemons(c) == [pid]
    asyncio.run(_call(address, "Shutdown", shim_pb2.ShutdownRequest(id="pod1"), empty_pb2.Empty))
    d = _run_shim(env, b1, "-id", "pod1", "-bundle", str(b1), "delete")
    assert d.returncode == 0, d.stderr
    resp = shim_pb2.DeleteResponse()
    resp.ParseFromString(d.stdout)
    assert resp.exited_at.seconds > 0
    _assert_nothing_left(env, c.namespace, "pod1")


def test_bootstrap_params_get_a_bootstrap_result(env):
    from spinbox.api._pb.containerd.runtime.bootstrap.v1 import bootstrap_pb2

    c = env["c"]
    b = _bundle(env, "boot1", {})
    params = bootstrap_pb2.BootstrapParams(instance_id="boot1", namespace=c.namespace,
                                           containerd_ttrpc_address=c.ttrpc_address)
    r = _run_shim(env, b, "-id", "boot1", "start", stdin=params.SerializeToString())
    assert r.returncode == 0, r.stderr
    res = bootstrap_pb2.BootstrapResult()
    res.ParseFromString(r.stdout)
    assert res.address == (b / "address").read_text() and res.protocol == "ttrpc" and res.version == 2
    asyncio.run(_call(res.address, "Shutdown", shim_pb2.ShutdownRequest(id="boot1"), empty_pb2.Empty))
    assert _run_shim(env, b, "-id", "boot1", "-bundle", str(b), "delete").returncode == 0
    _assert_nothing_left(env, c.namespace, "boot1")


def test_delete_after_a_killed_daemon_releases_what_it_recorded(env):
    c = env["c"]
    b = _bundle(env, "crash1", {})
    r = _run_shim(env, b, "-id", "crash1", "start")
    assert r.returncode == 0, r.stderr
    [pid] = _daemons(c)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while procinfo.state(pid) not in (None, "Z", "X") and time.monotonic() < deadline:
        time.sleep(0.02)
    # what a dead daemon would have recorded: its VM (a stand-in QEMU process in vm.json)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "sbx-crash-helper"],
                              start_new_session=True)
    try:
        paths = GroupPaths(env["state_dir"], c.namespace, "crash1")
        st = State.load(paths)
        vm_dir = paths.vm_dir
        vm_dir.mkdir(parents=True, exist_ok=True)
        (vm_dir / "vm.json").write_text(json.dumps({
            "pid": helper.pid, "start_time": procinfo.start_time(helper.pid), "tag": "sbx-crash-helper"}))
        st.record("vm", str(vm_dir), owner="crash1", path=str(vm_dir))
        st.set_task("crash1", pid=1234)
        d = _run_shim(env, b, "-id", "crash1", "-bundle", str(b), "delete")
        assert d.returncode == 0, d.stderr
        assert helper.wait(timeout=10) == -signal.SIGKILL
        resp = shim_pb2.DeleteResponse()
        resp.ParseFromString(d.stdout)
        assert (resp.pid, resp.exit_status) == (1234, 137)
        _assert_nothing_left(env, c.namespace, "crash1")
        # idempotent: a second delete finds nothing and still answers
        again = _run_shim(env, b, "-id", "crash1", "-bundle", str(b), "delete")
        assert again.returncode == 0 and again.stderr == b""
    finally:
        if helper.poll() is None:
            helper.kill()
        helper.wait()


def test_bad_config_fails_start_with_the_key(env):
    bad = env["work"] / "bad.json"
    bad.write_text(json.dumps({"runtime": {"accel": "xen"}}))
    b = _bundle(env, "badcfg", {})
    e = dict(os.environ, SPINBOX_CONFIG=str(bad))
    r = subprocess.run([str(REAL_SHIM), "-namespace", "n1", "-address", env["c"].address,
                        "-publish-binary", "/usr/bin/containerd", "-id", "badcfg", "start"],
                       capture_output=True, cwd=b, env=e, timeout=60)
    assert r.returncode == 1
    assert "runtime.accel: must be one of auto, kvm, tcg (got 'xen')" in r.stderr.decode()
    assert r.stdout == b"" and _daemons(env["c"]) == []
