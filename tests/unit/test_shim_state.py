"""Crash-safe state: atomic records, release of real resources (files, sockets, dirs, a child
process), verified kills, idempotent cleanup, the group lock."""
from __future__ import annotations

import record_kinds  # noqa: F401  (registers the test-only kinds "file", "process")

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from spinbox.shim.state import GroupLock, GroupPaths, State, StateError, cleanup_all, release
from spinbox.shim.vm import procinfo


@pytest.fixture
def paths(tmp_path):
    return GroupPaths(tmp_path / "st", "ns1", "grp1")


@pytest.fixture
def child():
    """A real child process (a sleeper whose argv carries a tag)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "spinbox-test-tag"])
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_paths_layout(paths):
    assert paths.state_file == paths.state_dir / "ns1" / "grp1" / "state.json"
    assert paths.lock_file == paths.state_dir / "ns1" / "grp1.lock"
    # the VM dir is short whatever the ids: 16 hex chars under <state>/vm
    long = GroupPaths(paths.state_dir, "n" * 76, "g" * 76)
    assert long.vm_dir.parent == paths.state_dir / "vm" and len(long.vm_dir.name) == 16


async def test_record_is_persisted_before_the_body_runs(paths):
    st = State.open(paths)
    target = paths.state_dir / "made.txt"
    async with st.recording("file", str(target), path=str(target)):
        on_disk = json.loads(paths.state_file.read_text())
        assert [r["key"] for r in on_disk["resources"]] == [str(target)]
        target.write_text("x")
    again = State.load(paths)
    assert again.find("file", str(target)).data["path"] == str(target)
    # no temp files left behind by the atomic writes
    assert sorted(p.name for p in paths.dir.iterdir()) == ["state.json"]


async def test_failed_create_is_released_and_forgotten(paths):
    st = State.open(paths)
    target = paths.state_dir / "half.txt"
    with pytest.raises(RuntimeError):
        async with st.recording("file", str(target), path=str(target)):
            target.write_text("half")
            raise RuntimeError("create failed")
    assert not target.exists()
    assert State.load(paths).find("file", str(target)) is None


async def test_cleanup_all_releases_real_resources(paths, child, tmp_path):
    st = State.open(paths)
    f = tmp_path / "file"
    f.write_text("x")
    d = tmp_path / "tree"             # a bind staging dir as shim.binds leaves it unmounted
    (d / "b0").mkdir(parents=True)
    (d / "b1").mkdir()
    (d / "b1" / "hosts").write_text("")
    sock_path = str(tmp_path / "s.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    s.close()
    sst = os.stat(sock_path)
    st.record("file", str(f), path=str(f))
    st.record("dir", str(d), path=str(d))
    st.record("socket", sock_path, path=sock_path, ino=sst.st_ino, dev=sst.st_dev)
    async with st.recording("process", "sleeper", tag="spinbox-test-tag") as rec:
        rec.update(pid=child.pid, start_time=procinfo.start_time(child.pid))
    # a "crash": a fresh process would only have the file
    loaded = State.load(paths)
    report = await cleanup_all(loaded)
    assert report.ok, report.failed
    assert not f.exists() and not d.exists() and not os.path.exists(sock_path)
    assert child.wait(timeout=10) == -9
    assert report.done[0].startswith("killed sleeper")       # newest first
    assert State.load(paths).doc["resources"] == []
    # idempotent: a second run finds nothing to do and fails on nothing
    assert (await cleanup_all(State.load(paths))).ok


async def test_kill_is_verified_by_start_time_and_tag(paths, child):
    st = State.open(paths)
    start = procinfo.start_time(child.pid)
    st.record("process", "wrong-start", pid=child.pid, start_time=start + 1)
    st.record("process", "wrong-tag", pid=child.pid, start_time=start, tag="not-in-argv")
    report = await cleanup_all(st)
    assert report.ok
    assert all("already gone" in line for line in report.done)
    assert child.poll() is None            # never killed: not provably ours


async def test_socket_replaced_by_someone_else_is_kept(paths, tmp_path):
    st = State.open(paths)
    p = str(tmp_path / "s.sock")
    s1 = socket.socket(socket.AF_UNIX)
    s1.bind(p)
    s1.close()
    st1 = os.stat(p)
    st.record("socket", p, path=p, ino=st1.st_ino, dev=st1.st_dev)
    os.unlink(p)
    keep = open(tmp_path / "pin", "w")    # keep the old inode number from being reused at once
    s2 = socket.socket(socket.AF_UNIX)
    s2.bind(p)
    s2.close()
    keep.close()
    if os.stat(p).st_ino == st1.st_ino:
        pytest.skip("the filesystem reused the inode number")
    report = await cleanup_all(st)
    assert os.path.exists(p) and "belongs to someone else" in report.done[0]


async def test_failures_stay_recorded_and_others_still_run(paths, tmp_path):
    st = State.open(paths)
    f = tmp_path / "f"
    f.write_text("x")
    st.record("file", str(f), path=str(f))
    st.record("custom", "broken", release="spinbox.shim.state:no_such_function")
    report = await cleanup_all(st)
    assert not f.exists()
    assert len(report.failed) == 1 and "broken" in report.failed[0]
    assert [r["key"] for r in State.load(paths).doc["resources"]] == ["broken"]


async def test_unknown_kinds_and_foreign_releasers_are_refused(paths):
    st = State.open(paths)
    with pytest.raises(ValueError, match="unknown resource kind"):
        st.record("spaceship", "x")
    with pytest.raises(StateError, match="must be spinbox.shim"):
        await release({"kind": "x", "key": "k", "release": "os:system"})


async def test_owner_scoped_cleanup_and_tasks(paths, tmp_path):
    st = State.open(paths)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    st.record("file", str(a), owner="c1", path=str(a))
    st.record("file", str(b), owner="c2", path=str(b))
    st.set_task("c1", pid=42, exit_status=3)
    assert (await cleanup_all(st, owner="c1")).ok
    assert not a.exists() and b.exists()
    assert State.load(paths).tasks == {"c1": {"pid": 42, "exit_status": 3}}


def test_daemon_identity(paths, child):
    st = State.open(paths)
    st.set_daemon(child.pid, "unix:///x")
    assert State.load(paths).daemon_alive()
    child.kill()
    child.wait()
    assert not State.load(paths).daemon_alive()


def test_corrupt_state_is_reported(paths):
    paths.dir.mkdir(parents=True)
    paths.state_file.write_text("{nope")
    with pytest.raises(StateError, match="corrupt state file"):
        State.load(paths)


def test_remove_files(paths):
    st = State.open(paths)
    st.remove_files()
    assert not paths.dir.exists() and not paths.dir.parent.exists()


def test_group_lock_excludes_and_survives_removal(paths):
    first = GroupLock(paths).acquire()
    got = []

    def other():
        with GroupLock(paths, timeout=10):
            got.append(time.monotonic())

    t = threading.Thread(target=other)
    t.start()
    time.sleep(0.2)
    assert got == []                       # still held by `first`
    first.release(remove=True)             # the holder removes the file (group gone)
    t.join(10)
    assert len(got) == 1
    with pytest.raises(TimeoutError, match="held by another"):
        with GroupLock(paths):
            GroupLock(paths, timeout=0.1).acquire()


# ---------------------------------------------------------------------------------------------
# releasers: registered by the modules that own each kind

def test_every_recorded_kind_has_its_owners_releaser():
    from spinbox.shim import releasers

    kinds = releasers.kinds()
    # what the shim records (task service, sandbox, network, manager/daemon) ...
    assert {"mount", "dir", "vm", "network", "socket"} <= kinds
    # ... and nothing that nobody records
    assert not {"netns", "tap"} & kinds
    assert releasers.lookup("mount").__module__ == "spinbox.shim.mounts"
    assert releasers.lookup("dir").__module__ == "spinbox.shim.binds"
    assert releasers.lookup("vm").__module__ == "spinbox.shim.vm.machine"
    assert releasers.lookup("network").__module__ == "spinbox.shim.network.attachment"


async def test_an_older_shims_network_record_is_released_by_the_registered_kind(paths):
    """Older shims wrote `release: <module>:<function>` into network records; the module may be
    gone now, the kind's registered releaser answers."""
    old = {"kind": "network", "key": "sb1", "owner": "sb1", "net": None,
           "release": "spinbox.shim.network.no_longer_here:release_record"}
    assert await release(old) == "network: nothing recorded"


async def test_mount_and_dir_releasers_on_nothing_mounted(tmp_path):
    d = tmp_path / "stage"
    (d / "b0").mkdir(parents=True)
    assert await release({"kind": "mount", "key": "m", "path": str(tmp_path / "rootfs")}) \
        == f"{tmp_path / 'rootfs'} not mounted"
    assert await release({"kind": "dir", "key": str(d), "path": str(d)}) == f"removed {d}"
    assert not d.exists()
    assert await release({"kind": "dir", "key": "/run", "path": "/run"}) == "refused to remove '/run'"


def test_mountinfo_paths_are_decoded():
    from spinbox.shim import mounts

    assert mounts.decode_mountinfo_path(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert mounts.decode_mountinfo_path("/plain") == "/plain"
    assert "/" in mounts.mount_points() and mounts.is_mountpoint("/")
    assert mounts.mounts_under("/no/such/dir") == [] and mounts.unmount_all("/no/such/dir") == 0
