"""Pure logic of vminitd: id validation, the process state machine, exit status mapping,
config.json adaptation, the event ring, cgroup stats mapping."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from spinbox.vminitd import bundle, cgroups
from spinbox.vminitd.errors import FailedPrecondition, InvalidArgument, NotFound
from spinbox.vminitd.events import EventLog
from spinbox.vminitd.ids import (validate_exec_id, validate_guest_path, validate_hostname, validate_id,
                                 validate_relative_target, validate_signal)
from spinbox.vminitd.reaper import Reaper, exit_status
from spinbox.vminitd.states import ProcessState, State


@pytest.mark.parametrize("good", ["a", "A0", "c1.exec-2_x", "9" * 76])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", ".x", "-x", "_x", "a/b", "../x", "a..b", "x" * 77, "a b", "a\0", "é"])
def test_invalid_ids(bad):
    with pytest.raises(InvalidArgument):
        validate_id(bad)


def test_exec_id_empty_means_init():
    assert validate_exec_id("") == ""
    with pytest.raises(InvalidArgument):
        validate_exec_id("../etc")


def test_paths_and_targets():
    assert validate_guest_path("/run/rootfs") == "/run/rootfs"
    for bad in ("relative", "/a/../b", "", "/a\0"):
        with pytest.raises(InvalidArgument):
            validate_guest_path(bad)
    assert validate_relative_target("/usr/lib/") == "usr/lib"
    with pytest.raises(InvalidArgument):
        validate_relative_target("a/../../etc")


def test_signal_and_hostname():
    assert validate_signal(9) == 9
    for bad in (0, 65, -1):
        with pytest.raises(InvalidArgument):
            validate_signal(bad)
    assert validate_hostname("pod-1.example") == "pod-1.example"
    for bad in ("-x", "a_b", "x" * 65, ""):
        with pytest.raises(InvalidArgument):
            validate_hostname(bad)


def test_exit_status_mapping_from_real_children():
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    assert exit_status(os.waitpid(pid, 0)[1]) == 7
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    assert exit_status(os.waitpid(pid, 0)[1]) == 137
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(0)
    assert exit_status(os.waitpid(pid, 0)[1]) == 143


async def test_reaper_keeps_exits_nobody_waited_for_yet():
    """A child reaped before its pid is known is parked, and claimed later (the pid-file race)."""
    r = Reaper()
    r.install(asyncio.get_running_loop())
    try:
        since = __import__("time").monotonic()
        pid = os.fork()
        if pid == 0:
            os._exit(3)
        # Let SIGCHLD be handled before anyone registers.
        for _ in range(200):
            await asyncio.sleep(0.01)
            if pid in r._unclaimed:
                break
        assert pid in r._unclaimed
        ex = await r.watch(pid, since)
        assert (ex.pid, ex.status) == (pid, 3)
        # An exit recorded before `since` belongs to an older process with the same pid.
        pid2 = os.fork()
        if pid2 == 0:
            os._exit(4)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if pid2 in r._unclaimed:
                break
        fut = r.watch(pid2, since=__import__("time").monotonic() + 1)
        assert not fut.done()
        r.forget(pid2)
    finally:
        r.uninstall()


def test_state_machine_happy_path():
    s = ProcessState("c")
    assert s.state == State.CREATED
    s.check("start")
    assert s.apply("started") and s.state == State.RUNNING
    s.check("pause")
    s.apply("paused")
    assert s.state == State.PAUSED
    with pytest.raises(FailedPrecondition):
        s.check("start")
    s.apply("resumed")
    s.apply("exited")
    assert s.state == State.STOPPED
    s.check("delete")
    assert s.apply("deleted") and s.state == State.DELETED


def test_state_machine_refusals():
    s = ProcessState("c")
    s.apply("started")
    with pytest.raises(FailedPrecondition, match="cannot delete a running"):
        s.check("delete")
    s.apply("exited")
    with pytest.raises(NotFound, match="already finished"):
        s.check("kill")
    with pytest.raises(FailedPrecondition, match="not running"):
        s.check("exec")
    assert not s.apply("started")  # an exit racing a start leaves the state alone
    s.apply("deleted")
    with pytest.raises(NotFound):
        s.check("start")
    # A created process may be deleted and killed, not paused
    c = ProcessState("d")
    c.check("delete")
    c.check("kill")
    with pytest.raises(FailedPrecondition):
        c.check("pause")


def _spec(**extra):
    s = {"ociVersion": "1.0.2", "process": {"args": ["sh"], "cwd": "/", "selinuxLabel": "x"},
         "root": {"path": "rootfs"},
         "hooks": {"prestart": [{"path": "/usr/bin/nvidia-hook"}]},
         "linux": {"cgroupsPath": "system.slice:cri:abc", "mountLabel": "l",
                   "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                                  {"type": "ipc"}]},
         "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]}
    s.update(extra)
    return s


def test_adapt_spec_rewrites_host_things():
    spec = _spec()
    out, notes = bundle.adapt_spec(spec, "c1", "/run/rootfs/c1", terminal=True, readonly=True)
    assert out["root"] == {"path": "/run/rootfs/c1", "readonly": True}
    assert out["linux"]["cgroupsPath"] == "/spinbox/c1"
    kinds = {ns["type"]: ns for ns in out["linux"]["namespaces"]}
    assert "network" not in kinds
    assert kinds["ipc"] == {"type": "ipc"}
    assert set(kinds) >= {"pid", "ipc", "uts", "mount"}
    assert out["process"]["terminal"] is True
    assert "selinuxLabel" not in out["process"] and "hooks" not in out and "mountLabel" not in out["linux"]
    assert notes
    assert spec["linux"]["cgroupsPath"] == "system.slice:cri:abc"  # input not modified


def test_adapt_spec_refuses_missing_bind_source(tmp_path):
    spec = _spec(mounts=[{"destination": "/data", "type": "bind", "source": "/no/such/host/dir",
                          "options": ["rbind"]}])
    with pytest.raises(InvalidArgument, match="does not exist in the guest"):
        bundle.adapt_spec(spec, "c1", "/r", terminal=False)
    (tmp_path / "data").mkdir()
    spec["mounts"][0]["source"] = "/data"
    out, _ = bundle.adapt_spec(spec, "c1", "/r", terminal=False, guest_root=str(tmp_path))
    assert out["mounts"][0]["source"] == "/data"


def test_adapt_spec_rejects_bad_input():
    with pytest.raises(InvalidArgument):
        bundle.parse_spec(b"{not json")
    with pytest.raises(InvalidArgument):
        bundle.parse_spec(b"[]")
    with pytest.raises(InvalidArgument, match="process.args"):
        bundle.adapt_spec({"process": {}}, "c", "/r", terminal=False)
    with pytest.raises(InvalidArgument):
        bundle.adapt_spec(_spec(), "c", "../r", terminal=False)


def test_adapt_process():
    p = bundle.adapt_process({"args": ["sleep", "1"], "apparmorProfile": "x"}, terminal=False)
    assert p == {"args": ["sleep", "1"], "cwd": "/", "terminal": False}
    with pytest.raises(InvalidArgument):
        bundle.adapt_process({"args": []}, terminal=False)


async def test_event_ring_resume_and_gap():
    log = EventLog(capacity=3)
    for i in range(5):
        log.publish("exit", id=f"c{i}")
    evs, gap = log.since(0)
    assert [e.seq for e in evs] == [3, 4, 5] and gap
    evs, gap = log.since(3)
    assert [e.seq for e in evs] == [4, 5] and not gap
    got = []

    async def follow():
        async for ev, _ in log.follow(5):
            got.append(ev.fields["id"])
            if len(got) == 2:
                return

    t = asyncio.ensure_future(follow())
    await asyncio.sleep(0)
    log.publish("exit", id="x")
    log.publish("oom", id="y")
    await asyncio.wait_for(t, 5)
    assert got == ["x", "y"]


def test_stats_summary_v1_and_v2_shapes():
    raw = {"type": "stats", "id": "c", "data": {
        "cpu": {"usage": {"total": 123, "user": 100, "kernel": 23}},
        "memory": {"usage": {"usage": 4096, "limit": 9223372036854771712}},
        "pids": {"current": 2, "limit": 0}}}
    s = cgroups.summarize_stats(raw)
    assert s == {"cpu_usage_ns": 123, "cpu_user_ns": 100, "cpu_system_ns": 23, "memory_usage_bytes": 4096,
                 "memory_limit_bytes": 0, "pids_current": 2, "pids_limit": 0}
    raw["data"]["memory"]["usage"]["limit"] = 64 << 20
    assert cgroups.summarize_stats(raw)["memory_limit_bytes"] == 64 << 20
    assert cgroups.summarize_stats({})["cpu_usage_ns"] == 0


def test_oom_kill_count_reads_v2_memory_events(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    d = tmp_path / "spinbox" / "c1"
    d.mkdir(parents=True)
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    assert cgroups.oom_kill_count("/spinbox/c1", str(tmp_path)) == 2
    assert cgroups.oom_kill_count("/spinbox/none", str(tmp_path)) == 0


SANDBOX_FILES = {"/etc/resolv.conf": "/etc/resolv.conf", "/etc/hosts": "/etc/hosts"}


def test_adapt_spec_binds_sandbox_dns_and_hosts():
    out, _ = bundle.adapt_spec(_spec(), "c1", "/r", terminal=False, sandbox_files=SANDBOX_FILES)
    binds = {m["destination"]: m for m in out["mounts"] if m["type"] == "bind"}
    assert set(binds) == {"/etc/resolv.conf", "/etc/hosts"}
    assert binds["/etc/hosts"]["source"] == "/etc/hosts" and "ro" in binds["/etc/hosts"]["options"]
    assert out["mounts"][0]["destination"] == "/proc"                 # appended after the spec's own
    assert "hostname" not in out                                    # never invented (own UTS ns)
    plain, _ = bundle.adapt_spec(_spec(), "c1", "/r", terminal=False, sandbox_files={})
    assert [m["destination"] for m in plain["mounts"]] == ["/proc"]   # before Configure: nothing


def test_adapt_spec_keeps_the_specs_own_resolv_conf(tmp_path):
    (tmp_path / "cri").mkdir()
    cri = {"destination": "/etc/resolv.conf/", "type": "bind", "source": "/cri/resolv.conf",
           "options": ["rbind", "ro"]}
    (tmp_path / "cri" / "resolv.conf").write_text("nameserver 1.1.1.1\n")
    spec = _spec(mounts=[cri], hostname="pod-a")
    out, notes = bundle.adapt_spec(spec, "c1", "/r", terminal=False, guest_root=str(tmp_path),
                                   sandbox_files=SANDBOX_FILES)
    dests = [(m["destination"], m["source"]) for m in out["mounts"]]
    assert dests == [("/etc/resolv.conf/", "/cri/resolv.conf"), ("/etc/hosts", "/etc/hosts")]
    assert any("/etc/resolv.conf: the spec mounts its own" in n for n in notes)
    assert out["hostname"] == "pod-a"


def test_adapt_spec_read_only_rootfs_needs_the_mount_point(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hosts").write_text("")
    out, notes = bundle.adapt_spec(_spec(), "c1", str(rootfs), terminal=False, readonly=True,
                                   sandbox_files=SANDBOX_FILES)
    assert [m["destination"] for m in out["mounts"]] == ["/proc", "/etc/hosts"]
    assert any("/etc/resolv.conf: not bind-mounted, the read-only rootfs" in n for n in notes)
    # a symlink is followed inside the rootfs, as runc does (an absolute one too)
    (rootfs / "run").mkdir()
    (rootfs / "run" / "resolv.conf").write_text("")
    (rootfs / "etc" / "resolv.conf").symlink_to("/run/resolv.conf")
    out, _ = bundle.adapt_spec(_spec(), "c1", str(rootfs), terminal=False, readonly=True,
                               sandbox_files=SANDBOX_FILES)
    assert "/etc/resolv.conf" in [m["destination"] for m in out["mounts"]]
    (rootfs / "run" / "resolv.conf").unlink()                      # dangling: runc would create it
    out, _ = bundle.adapt_spec(_spec(), "c1", str(rootfs), terminal=False, readonly=True,
                               sandbox_files=SANDBOX_FILES)
    assert "/etc/resolv.conf" not in [m["destination"] for m in out["mounts"]]
    # a writable rootfs: runc creates the mount point
    out, _ = bundle.adapt_spec(_spec(), "c1", str(tmp_path / "empty"), terminal=False,
                               sandbox_files=SANDBOX_FILES)
    assert {"/etc/resolv.conf", "/etc/hosts"} <= {m["destination"] for m in out["mounts"]}


def test_oci_runtime_from_the_kernel_cmdline():
    from spinbox.vminitd.main import oci_runtime
    assert oci_runtime({}) == "runc"
    assert oci_runtime({"spinbox.oci_runtime": "crun"}) == "crun"
    assert oci_runtime({"spinbox.oci_runtime": "runc"}) == "runc"
    assert oci_runtime({"spinbox.oci_runtime": "/bin/sh"}) == "runc"     # never an arbitrary binary


def test_crun_gets_a_1_0_spec_version_runc_the_spec_as_it_came():
    from spinbox.vminitd import bundle
    spec = {"ociVersion": "1.2.1"}
    assert bundle.pin_oci_version(spec, "runc") is None and spec["ociVersion"] == "1.2.1"
    note = bundle.pin_oci_version(spec, "/usr/bin/crun")
    assert spec["ociVersion"] == "1.0.2" and "pinned to 1.0.2 for crun" in note
    old = {"ociVersion": "1.0.2-dev"}
    assert bundle.pin_oci_version(old, "crun") is None and old["ociVersion"] == "1.0.2-dev"
