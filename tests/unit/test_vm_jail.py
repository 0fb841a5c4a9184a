"""QEMU's jail as data (shim/vm/jail.py), the argv with passed fds, per-sandbox uids."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spinbox.shim.vm import jail, procinfo, uids
from spinbox.shim.vm.config import VMConfig
from spinbox.shim.vm.paths import VMPaths
from spinbox.shim.vm.qemu_args import PassedFds, Resolved, build_argv


def _config(tmp_path: Path, **kw) -> VMConfig:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    return VMConfig(kernel=kernel, qemu_binary=sys.executable, **kw)


def test_spec_binds_usr_and_the_guest_files_outside_it_read_only(tmp_path):
    cfg = _config(tmp_path, memory_mb=256, max_memory_mb=1024)
    spec = jail.jail_spec(cfg, root=tmp_path / "jail", uid=0x70000001, accel="tcg", nofile=4096, parent=123)
    assert "/usr" in spec.executable and sys.executable in spec.executable   # the QEMU binary's place
    assert str(cfg.kernel) in spec.read_only           # not below /usr: bound on its own, noexec
    assert (spec.uid, spec.gid, spec.groups) == (0x70000001, 0x70000001, ())
    assert "/dev/urandom" in spec.devices and "/dev/kvm" not in spec.devices
    # the biggest backend QEMU sizes itself: the 768 MiB virtio-mem room here
    assert spec.rlimits == {"RLIMIT_CORE": (0, 0), "RLIMIT_NOFILE": (4096, 4096),
                            "RLIMIT_FSIZE": (768 << 20, 768 << 20)}
    assert spec.parent == 123
    # nothing writable, no host dir of ours: /run, /etc, /var are not named
    assert not any(p.startswith(("/run", "/var", "/home", "/root")) for p in spec.read_only
                   + tuple(p for p in spec.executable if p != sys.executable))


def test_a_missing_guest_file_or_relative_path_is_refused_by_name(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(jail.JailError, match="initrd.img does not exist"):
        jail.jail_spec(VMConfig(kernel=cfg.kernel, initrd=tmp_path / "initrd.img", qemu_binary=sys.executable),
                       root=tmp_path, uid=0x70000000, accel="tcg", nofile=64, parent=None)
    with pytest.raises(jail.JailError, match="absolute paths"):
        jail.jail_spec(VMConfig(kernel=Path("vmlinux"), qemu_binary=sys.executable),
                       root=tmp_path, uid=0x70000000, accel="tcg", nofile=64, parent=None)


def test_kvm_needs_a_group_accessible_device(tmp_path, monkeypatch):
    # /dev/null is 0666 root:root: no non-root group could be given to the jailed QEMU
    monkeypatch.setattr(jail, "KVM_DEVICE", "/dev/null")
    with pytest.raises(jail.JailError, match="needs it read-write for a non-root group"):
        jail.jail_spec(_config(tmp_path), root=tmp_path, uid=0x70000000, accel="kvm", nofile=64, parent=None)


def test_launcher_argv_carries_the_spec_and_the_resolved_binary(tmp_path):
    spec = jail.jail_spec(_config(tmp_path), root=tmp_path, uid=0x70000005, accel="tcg", nofile=64, parent=None)
    argv = jail.launcher_argv(spec, ["python3", "-x"])
    assert argv[:4] == [sys.executable, "-I", "-S", jail.LAUNCHER]
    assert json.loads(argv[4])["uid"] == 0x70000005
    assert argv[5] == "--" and os.path.isabs(argv[6]) and argv[7:] == ["-x"]
    with pytest.raises(jail.JailError, match="not found on PATH"):
        jail.launcher_argv(spec, ["no-such-qemu-binary"])


def test_the_launcher_refuses_a_bad_command_line_with_its_own_status():
    r = subprocess.run([sys.executable, "-I", "-S", jail.LAUNCHER, "{}"], capture_output=True, text=True)
    assert r.returncode == 121 and "usage" in r.stderr
    r = subprocess.run([sys.executable, "-I", "-S", jail.LAUNCHER, "not json", "--", "/bin/true"],
                       capture_output=True, text=True)
    assert r.returncode == 121 and r.stderr.startswith("jail: ")


def test_argv_with_passed_fds_names_no_socket_path_and_no_pidfile(tmp_path):
    cfg = _config(tmp_path)
    paths = VMPaths(Path("/run/sbx/vm1"))   # argv only: a short path, whatever pytest's tmp dir is
    argv = build_argv(cfg, paths, Resolved("tcg", "virtio-serial"), fds=PassedFds(qmp=7, agent=8))
    line = " ".join(argv)
    assert "-pidfile" not in argv and str(paths.agent_socket) not in line
    # the QMP path only as the inert tag object (ps, leak checks, crash cleanup's argv tag)
    assert [a for a in argv if str(paths.qmp_socket) in a] == [
        f"secret,id=spinbox-tag,format=raw,data={paths.qmp_socket}"]
    assert "socket,id=qmp,fd=7,server=on,wait=off" in argv
    assert "socket,id=agent,fd=8,server=on,wait=off" in argv
    vs = build_argv(cfg, paths, Resolved("tcg", "vsock", cid=9), fds=PassedFds(qmp=7, vhost_vsock=11))
    assert any(a.endswith("guest-cid=9,vhostfd=11") for a in vs)
    plain = build_argv(cfg, paths, Resolved("tcg", "virtio-serial"))
    assert "-pidfile" in plain and f"socket,id=qmp,path={paths.qmp_socket},server=on,wait=off" in plain


def test_uids_are_distinct_while_held_and_reused_after_release(tmp_path):
    a = uids.allocate_uid(tmp_path, base=300000, count=3)
    b = uids.allocate_uid(tmp_path, base=300000, count=3)
    assert {a.uid, b.uid} == {300000, 300001}
    a.release()
    c = uids.allocate_uid(tmp_path, base=300000, count=3)
    assert c.uid == 300000
    d = uids.allocate_uid(tmp_path, base=300000, count=3)
    with pytest.raises(uids.UIDExhausted, match="no free QEMU uid in 300000..300002"):
        uids.allocate_uid(tmp_path, base=300000, count=3)
    for lease in (b, c, d):
        lease.release()
    assert list(tmp_path.iterdir()) == []


def test_a_uid_some_live_process_runs_as_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(uids, "uids_in_use", lambda lo, hi, proc_root="/proc": {300000})
    lease = uids.allocate_uid(tmp_path, base=300000, count=2)
    assert lease.uid == 300001
    lease.release()


def test_uids_in_use_reads_proc_owners():
    me = os.getuid()
    assert me in uids.uids_in_use(me, me + 1)


def test_same_process_checks_the_uid_when_given():
    start = procinfo.start_time(os.getpid())
    assert start is not None
    assert procinfo.is_same_process(os.getpid(), start, uid=os.getuid())
    assert not procinfo.is_same_process(os.getpid(), start, uid=os.getuid() + 4242)


def test_vm_config_refuses_a_uid_range_below_1000(tmp_path):
    from spinbox.shim.vm.config import VMConfigError
    with pytest.raises(VMConfigError, match="qemu_uid_base"):
        _config(tmp_path, qemu_uid_base=10).validate()
