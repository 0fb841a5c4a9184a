"""Crash cleanup from vm.json (kill only what is provably ours) and the console follower."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spinbox.shim.vm import procinfo
from spinbox.shim.vm.console import ConsoleLog
from spinbox.shim.vm.machine import VM, VMState, VMStateError, kill_from_state


@pytest.fixture
def sleeper(tmp_path):
    tag = str(tmp_path / "qmp.sock")
    # the tag must appear in the argv, as the QMP socket path does in QEMU's (and stay there:
    # `sh -c "sleep 60"` may exec sleep, which drops the tag from the argv at a random moment)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", tag], start_new_session=True)
    try:
        yield p, tag
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def write_state(d, pid, start, tag, files=()):
    (d / "vm.json").write_text(json.dumps({"version": 1, "pid": pid, "start_time": start, "tag": tag,
                                           "helpers": {}, "files": [str(d / f) for f in files]}))


def test_kill_from_state_kills_the_recorded_process(tmp_path, sleeper):
    p, tag = sleeper
    (tmp_path / "qemu.log").write_text("x")
    write_state(tmp_path, p.pid, procinfo.start_time(p.pid), tag, files=["qemu.log", "vm.json"])
    done = kill_from_state(tmp_path)
    assert f"killed qemu pid {p.pid}" in done
    assert p.wait(5) == -9
    assert not (tmp_path / "qemu.log").exists() and not (tmp_path / "vm.json").exists()
    assert kill_from_state(tmp_path) == []


async def test_the_vm_record_releaser_kills_from_state_and_removes_the_dir(tmp_path, sleeper):
    """What `delete` runs for a "vm" state record (registered by shim.vm.machine)."""
    from spinbox.shim.state import release

    p, tag = sleeper
    d = tmp_path / "vm" / "0123456789abcdef"
    d.mkdir(parents=True)
    write_state(d, p.pid, procinfo.start_time(p.pid), tag, files=["vm.json"])
    out = await release({"kind": "vm", "key": str(d), "path": str(d)})
    assert out == f"vm {d}: killed qemu pid {p.pid}, removed vm.json"
    assert p.wait(5) == -9 and not d.exists() and not d.parent.exists()


def test_kill_from_state_spares_a_reused_pid(tmp_path, sleeper):
    p, tag = sleeper
    write_state(tmp_path, p.pid, procinfo.start_time(p.pid) - 1, tag)  # another process's start time
    assert kill_from_state(tmp_path) == [f"qemu pid {p.pid} already gone"]
    assert p.poll() is None


def test_kill_from_state_spares_a_process_without_the_tag(tmp_path, sleeper):
    p, _ = sleeper
    write_state(tmp_path, p.pid, procinfo.start_time(p.pid), "/somewhere/else/qmp.sock")
    kill_from_state(tmp_path)
    assert p.poll() is None


def test_kill_from_state_never_deletes_outside_the_state_dir(tmp_path):
    outside = tmp_path / "precious"
    outside.write_text("keep")
    d = tmp_path / "vm"
    d.mkdir()
    (d / "vm.json").write_text(json.dumps({"version": 1, "files": [str(outside)]}))
    kill_from_state(d)
    assert outside.read_text() == "keep"


def test_console_log_lines_and_wait(tmp_path):
    con = ConsoleLog(0.0)
    assert con.poll() == 0  # nothing yet
    assert con.feed(b"one\r\ntw") == 1
    assert [ln.text for ln in con.lines()] == ["one"]
    assert con.tail() == ["one", "tw"]
    con.feed(b"o\nthree\n" + b"x" * 10000)
    assert [ln.text for ln in con.lines(after=1)][:2] == ["two", "three"]
    assert con.find(r"^thr").index == 2
    assert len(con.lines()[-1].text) == 4096  # a guest cannot grow one line without bound


async def test_console_wait_times_out_with_tail(tmp_path):
    con = ConsoleLog(0.0)
    con.feed(b"booting\n")
    with pytest.raises(TimeoutError, match="booting"):
        await con.wait_for("never", 0.1)


async def test_vm_state_rules(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"x")
    from spinbox.shim.vm.config import VMConfig
    vm = VM(VMConfig(kernel=k), tmp_path / "st")
    assert vm.state is VMState.CREATED
    with pytest.raises(VMStateError):
        await vm.execute("query-status")
    assert await vm.stop() is None  # stopping a never-started VM is fine
    assert vm.state is VMState.STOPPED
    with pytest.raises(VMStateError, match="starts once"):
        await vm.start()
    assert not (tmp_path / "st").exists()
