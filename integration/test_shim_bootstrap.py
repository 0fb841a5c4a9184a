"""`start` of the real shim binary with containerd 2.3's BootstrapParams on stdin and none of the
flags containerd marks deprecated (-namespace, -id, -address, -publish-binary): what containerd
prints nothing else for once those flags are removed.

The params point at a private containerd (its gRPC and TTRPC sockets) and put the shim socket
in a socket_dir of the test's own; the shim must answer a BootstrapResult whose address serves
the Task API, run its daemon at the params' log level, and leave nothing once the daemon is shut
down and `delete` has run.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

import ttrpc
from integration.conftest import skip_or_fail
from integration.containerd import Containerd, missing_prerequisites
from spinbox.api._pb.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.shim import manager
from spinbox.shim.state import GroupPaths
from spinbox.shim.vm import procinfo

pytestmark = pytest.mark.integration

REAL_SHIM = Path(sys.executable).parent / "containerd-shim-spinbox-v1"


@pytest.fixture(scope="module")
def env():
    why = missing_prerequisites()
    if not REAL_SHIM.exists():
        why.append(f"{REAL_SHIM} missing: install the project (pip install -e .)")
    if why:
        skip_or_fail(why)
    work = Path(tempfile.mkdtemp(prefix="sbx-boot-", dir="/tmp"))   # short: sockets live here
    cfg = work / "config.json"
    cfg.write_text(json.dumps({"paths": {"state_dir": str(work / "st")}}))
    c = Containerd.create(cri=False)
    try:
        yield {"c": c, "work": work, "cfg": cfg, "state_dir": work / "st", "socket_dir": work / "s"}
    finally:
        c.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def _shim(env, bundle: Path, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    # containerd's env without the deprecated variables: only the config is ours
    e = {k: v for k, v in os.environ.items() if k not in ("TTRPC_ADDRESS", "GRPC_ADDRESS", "NAMESPACE")}
    e["SPINBOX_CONFIG"] = str(env["cfg"])
    return subprocess.run([str(REAL_SHIM), *argv], input=stdin, capture_output=True, cwd=bundle,
                          env=e, timeout=60)


async def _call(address: str, method: str, req, resp_type):
    client = await ttrpc.connect_unix(address)
    try:
        return await client.call("containerd.task.v2.Task", method, req, resp_type, timeout=10)
    finally:
        await client.close()


def _daemons(work: Path) -> list[int]:
    marker = str(work)          # in the daemon's -socket (socket_dir is under it)
    return [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
            if any(marker in a for a in (procinfo.cmdline(p) or []))]


def test_start_from_bootstrap_params_alone(env):
    c, task, ns = env["c"], "bootonly1", "bootns"
    bundle = env["work"] / "bundles" / task
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {}}))
    params = bootstrap_pb2.BootstrapParams(
        instance_id=task, namespace=ns, log_level=bootstrap_pb2.LOG_LEVEL_DEBUG,
        containerd_version="2.3.0", containerd_grpc_address=c.address,
        containerd_ttrpc_address=c.ttrpc_address, containerd_binary="/usr/bin/containerd",
        socket_dir=str(env["socket_dir"]))

    r = _shim(env, bundle, "start", stdin=params.SerializeToString())
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stderr == b""
    res = bootstrap_pb2.BootstrapResult()
    res.ParseFromString(r.stdout)
    assert (res.version, res.protocol) == (2, "ttrpc")
    # the socket is named from the params: their grpc address, namespace, task and socket dir
    assert res.address == manager.socket_address(c.address, ns, task, str(env["socket_dir"]))
    assert (bundle / "address").read_text() == res.address
    [pid] = _daemons(env["work"])
    argv = procinfo.cmdline(pid) or []
    assert argv[argv.index("-log-level") + 1] == "debug"
    assert argv[argv.index("-address") + 1] == c.address
    conn = asyncio.run(_call(res.address, "Connect", shim_pb2.ConnectRequest(id=task),
                             shim_pb2.ConnectResponse))
    assert conn.shim_pid == pid

    asyncio.run(_call(res.address, "Shutdown", shim_pb2.ShutdownRequest(id=task), empty_pb2.Empty))
    d = _shim(env, bundle, "-namespace", ns, "-id", task, "-bundle", str(bundle), "delete")
    assert d.returncode == 0 and d.stderr == b"", d.stderr
    deadline = time.monotonic() + 10
    while _daemons(env["work"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _daemons(env["work"]) == [], "shim daemon (or a child) still running"
    assert not os.path.exists(manager.socket_path(res.address))
    paths = GroupPaths(env["state_dir"], ns, task)
    assert not paths.dir.exists() and not paths.lock_file.exists()
    assert not (env["state_dir"] / ns).exists()


def test_flags_that_name_another_task_than_the_params_fail_start(env):
    bundle = env["work"] / "bundles" / "mismatch1"
    bundle.mkdir(parents=True)
    params = bootstrap_pb2.BootstrapParams(instance_id="mismatch1", namespace="bootns",
                                           containerd_version="2.3.0",
                                           socket_dir=str(env["socket_dir"]))
    r = _shim(env, bundle, "-namespace", "bootns", "-id", "other", "start",
              stdin=params.SerializeToString())
    assert r.returncode == 1 and r.stdout == b""
    assert "-id 'other' but BootstrapParams.instance_id 'mismatch1'" in r.stderr.decode()
    assert _daemons(env["work"]) == [] and sorted(p.name for p in bundle.iterdir()) == []
