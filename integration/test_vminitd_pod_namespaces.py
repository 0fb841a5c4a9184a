"""A pod's shared namespaces in the agent, outside a VM (fast): vminitd on a unix socket, real
runc, a busybox rootfs (test_vminitd_local's environment). A "pause" container owns the PID,
IPC and UTS namespaces and the pod's IPC sysctls; a second container joins them by the
`/proc/<pid>/ns/<kind>` paths CRI sends (what the shim passes on), and must see the pause
process as its PID 1, the pod's sysctls and hostname. A path naming no container of the agent
is refused; a container sharing the PID namespace has its execs ended with its init.

No net.* sysctl here: outside a VM the agent's network namespace is the host's.
"""
from __future__ import annotations

import asyncio
import json

import pytest
import ttrpc

from integration import test_vminitd_local as local
from integration.bundles import oci_spec
from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as cpb

pytestmark = local.pytestmark

env = local.env          # the agent on a unix socket, cleaned up (and leak-checked) after each test
POD_SYSCTLS = {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "17"}


async def _create(env, id: str, spec: dict) -> int:
    a = env["agent"]
    r = await a.c("Create", cpb.CreateRequest(id=id, spec=json.dumps(spec).encode(),
                                              rootfs=cpb.Rootfs(path=str(env["rootfs"]))), cpb.CreateResponse)
    await a.c("Start", cpb.StartRequest(id=id), cpb.StartResponse)
    return r.pid


async def _run(env, id: str, args: list[str]) -> str:
    a = env["agent"]
    exec_id = f"x{abs(hash(tuple(args))) % 10**8}"
    await a.c("Exec", cpb.ExecRequest(id=id, exec_id=exec_id, process=local.process(args), stdout=True))
    await a.c("Start", cpb.StartRequest(id=id, exec_id=exec_id), cpb.StartResponse)
    out, _ = await a.read_output(id, exec_id)
    w = await a.c("Wait", cpb.WaitRequest(id=id, exec_id=exec_id), cpb.WaitResponse)
    await a.c("Delete", cpb.DeleteRequest(id=id, exec_id=exec_id), cpb.DeleteResponse)
    assert w.exit_status == 0, (args, out)
    return out.decode().strip()


def _pause_spec() -> dict:
    s = oci_spec(["sleep", "1000"])
    s["hostname"] = "podhost"
    s["linux"]["sysctl"] = dict(POD_SYSCTLS)
    s["linux"]["readonlyPaths"] = []
    return s


def _member_spec(pause_pid: int, args: list[str]) -> dict:
    s = oci_spec(args)
    s["hostname"] = "podhost"
    s["linux"]["namespaces"] = [{"type": "mount"}] + [
        {"type": k, "path": f"/proc/{pause_pid}/ns/{k}"} for k in ("pid", "ipc", "uts")]
    return s


async def _stop(env, *ids: str) -> None:
    a = env["agent"]
    for id in ids:
        await a.c("Kill", cpb.KillRequest(id=id, signal=9, all=True))
        await a.c("Wait", cpb.WaitRequest(id=id), cpb.WaitResponse)
        await a.c("Delete", cpb.DeleteRequest(id=id), cpb.DeleteResponse)


async def test_a_member_joins_the_pause_containers_namespaces(env):
    pause = await _create(env, "pause", _pause_spec())
    await _create(env, "member", _member_spec(pause, ["sleep", "1001"]))
    assert (await _run(env, "member", ["cat", "/proc/1/cmdline"])).split("\0")[:2] == ["sleep", "1000"]
    ps = await _run(env, "member", ["busybox", "ps", "-o", "args"])
    assert "sleep 1000" in ps and "sleep 1001" in ps, ps
    for kind in ("pid", "ipc", "uts"):
        assert await _run(env, "member", ["busybox", "readlink", f"/proc/self/ns/{kind}"]) == \
            await _run(env, "pause", ["busybox", "readlink", f"/proc/self/ns/{kind}"]), kind
    for key, value in POD_SYSCTLS.items():
        assert await _run(env, "member", ["cat", "/proc/sys/" + key.replace(".", "/")]) == value, key
    assert await _run(env, "member", ["busybox", "hostname"]) == "podhost"
    await _stop(env, "member", "pause")


@pytest.mark.parametrize("path", ["/proc/{other}/ns/pid", "/proc/{pause}/ns/ipc", "/proc/self/ns/pid"])
async def test_a_path_naming_no_container_is_refused(env, path):
    pause = await _create(env, "pause", _pause_spec())
    spec = _member_spec(pause, ["sleep", "1"])
    spec["linux"]["namespaces"][1]["path"] = path.format(other=env["proc"].pid, pause=pause)
    with pytest.raises(ttrpc.TTRPCError, match="pid namespace path"):
        await env["agent"].c("Create", cpb.CreateRequest(id="bad", spec=json.dumps(spec).encode(),
                                                         rootfs=cpb.Rootfs(path=str(env["rootfs"]))),
                             cpb.CreateResponse)
    with pytest.raises(ttrpc.NotFound):
        await env["agent"].c("State", cpb.StateRequest(id="bad"), cpb.StateResponse)
    await _stop(env, "pause")


async def test_execs_of_a_member_end_with_its_init(env):
    """In its own PID namespace the kernel ends a container's execs with its init; in the pod's
    the agent must, or the init's exit waits for them and they outlive the container."""
    a = env["agent"]
    pause = await _create(env, "pause", _pause_spec())
    await _create(env, "member", _member_spec(pause, ["sleep", "1001"]))
    await a.c("Exec", cpb.ExecRequest(id="member", exec_id="long", process=local.process(["sleep", "1002"])))
    await a.c("Start", cpb.StartRequest(id="member", exec_id="long"), cpb.StartResponse)
    await a.c("Kill", cpb.KillRequest(id="member", signal=9))
    loop = asyncio.get_running_loop()
    t = loop.time()
    w = await asyncio.wait_for(a.c("Wait", cpb.WaitRequest(id="member", exec_id="long"), cpb.WaitResponse), 10)
    assert w.exit_status == 137
    w = await asyncio.wait_for(a.c("Wait", cpb.WaitRequest(id="member"), cpb.WaitResponse), 10)
    assert w.exit_status == 137 and loop.time() - t < 4, f"the init's exit took {loop.time() - t:.1f} s"
    assert "sleep 1002" not in await _run(env, "pause", ["busybox", "ps", "-o", "args"])
    await a.c("Delete", cpb.DeleteRequest(id="member", exec_id="long"), cpb.DeleteResponse)
    await a.c("Delete", cpb.DeleteRequest(id="member"), cpb.DeleteResponse)
    await _stop(env, "pause")
