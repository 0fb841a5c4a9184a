"""Accelerator / transport detection against fake /dev, /sys and /proc trees, and the vsock CID
allocator (including two processes racing for CIDs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from spinbox.shim.vm import accel
from spinbox.shim.vm.cid import CIDExhausted, allocate_cid, cids_in_use_by_processes


def fake_host(tmp_path, *, kvm=True, pvm=False, flags="fpu sse2 vmx", intel=True):
    dev, sys_, proc = tmp_path / "dev", tmp_path / "sys", tmp_path / "proc"
    for d in (dev, sys_ / "module", proc):
        d.mkdir(parents=True)
    if kvm:
        (dev / "kvm").write_bytes(b"")
    if pvm:
        (sys_ / "module" / "kvm_pvm").mkdir()
    if intel:
        (sys_ / "module" / "kvm_intel").mkdir()
    (proc / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return {"dev_root": dev, "sys_root": sys_, "proc_root": proc, "api_version": lambda fd: 12}


def test_auto_picks_kvm_on_a_vmx_host(tmp_path):
    c = accel.select_accel("auto", **fake_host(tmp_path))
    assert c.value == "kvm" and "vmx" in c.reason


def test_auto_picks_tcg_on_nested_pvm(tmp_path):
    c = accel.select_accel("auto", **fake_host(tmp_path, pvm=True, flags="fpu sse2"))
    assert c.value == "tcg"
    assert "PVM" in c.reason and "kvm_pvm" in c.reason


def test_pvm_wins_even_with_vmx_flag(tmp_path):
    assert accel.select_accel("auto", **fake_host(tmp_path, pvm=True)).value == "tcg"


def test_auto_picks_tcg_without_vmx_svm(tmp_path):
    c = accel.select_accel("auto", **fake_host(tmp_path, flags="fpu sse2"))
    assert c.value == "tcg" and "vmx/svm" in c.reason


def test_auto_picks_tcg_without_dev_kvm(tmp_path):
    c = accel.select_accel("auto", **fake_host(tmp_path, kvm=False))
    assert c.value == "tcg" and "does not exist" in c.reason


def test_wrong_api_version(tmp_path):
    roots = fake_host(tmp_path)
    roots["api_version"] = lambda fd: 11
    c = accel.select_accel("auto", **roots)
    assert c.value == "tcg" and "API version 11" in c.reason


def test_unopenable_dev_kvm(tmp_path):
    roots = fake_host(tmp_path)
    (roots["dev_root"] / "kvm").unlink()
    (roots["dev_root"] / "kvm").mkdir()  # open(O_RDWR) on a directory fails
    c = accel.select_accel("auto", **roots)
    assert c.value == "tcg" and "cannot be opened" in c.reason


def test_fake_regular_file_is_not_kvm_with_the_real_ioctl(tmp_path):
    roots = fake_host(tmp_path)
    del roots["api_version"]
    c = accel.select_accel("auto", **roots)
    assert c.value == "tcg" and "not a character device" in c.reason


def test_explicit_choices(tmp_path):
    assert accel.select_accel("tcg", **fake_host(tmp_path)).value == "tcg"
    assert accel.select_accel("kvm", **fake_host(tmp_path / "a")).value == "kvm"
    with pytest.raises(RuntimeError, match="PVM"):
        accel.select_accel("kvm", **fake_host(tmp_path / "b", pvm=True))
    with pytest.raises(ValueError):
        accel.select_accel("hvf", **fake_host(tmp_path / "c"))


def test_transport(tmp_path):
    assert accel.select_transport("auto", tmp_path).value == "virtio-serial"
    assert "does not exist" in accel.select_transport("auto", tmp_path).reason
    with pytest.raises(RuntimeError, match="vhost-vsock"):
        accel.select_transport("vsock", tmp_path)
    (tmp_path / "vhost-vsock").write_bytes(b"")
    assert accel.select_transport("auto", tmp_path).value == "vsock"
    assert accel.select_transport("virtio-serial", tmp_path).value == "virtio-serial"


def test_vhost_net_only_where_the_device_opens(tmp_path):
    ok, why = accel.vhost_net_status(tmp_path)
    assert not ok and "vhost-net" in why and "does not exist" in why
    (tmp_path / "vhost-net").write_bytes(b"")
    assert accel.vhost_net_status(tmp_path) == (True, f"{tmp_path / 'vhost-net'} usable")


# ------------------------------------------------------------------------------ CID allocator

def test_cid_allocation_and_release(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    a = allocate_cid(tmp_path / "cids", proc_root=proc)
    b = allocate_cid(tmp_path / "cids", proc_root=proc)
    assert (a.cid, b.cid) == (4, 5)  # 3 is skipped by default
    assert (tmp_path / "cids" / "4.lock").read_text().strip() == str(os.getpid())
    a.release()
    assert not (tmp_path / "cids" / "4.lock").exists()
    a.release()  # idempotent
    with allocate_cid(tmp_path / "cids", proc_root=proc) as c:
        assert c.cid == 4
    b.release()
    assert list((tmp_path / "cids").iterdir()) == []
    assert allocate_cid(tmp_path / "cids", start=3, proc_root=proc).cid == 3


def _fake_process(proc, pid: int, exe, cmdline: bytes, uid: int = 0) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(cmdline)
    (d / "exe").symlink_to(exe)
    if uid != os.stat(d).st_uid:
        os.chown(d, uid, uid)


def _fake_qemu(tmp_path):
    qemu = tmp_path / "bin" / "qemu-system-x86_64"
    qemu.parent.mkdir()
    qemu.write_bytes(b"")
    return qemu


def test_cid_skips_ones_an_orphaned_qemu_uses(tmp_path):
    proc = tmp_path / "proc"
    qemu = _fake_qemu(tmp_path)
    _fake_process(proc, 4242, qemu, b"qemu-system-x86_64\0-device\0vhost-vsock-pci,id=v,guest-cid=4\0")
    (proc / "self").mkdir()
    assert cids_in_use_by_processes(proc, [str(qemu)]) == {4}
    with allocate_cid(tmp_path / "cids", proc_root=proc, qemu_binaries=[str(qemu)]) as lease:
        assert lease.cid == 5


def test_cid_in_any_other_command_line_is_not_a_qemu_of_ours(tmp_path):
    """Any user can put `guest-cid=` in an argv: only a root-owned process running the configured
    QEMU binary holds a CID (one replaced by an upgrade since it started still does)."""
    proc = tmp_path / "proc"
    qemu = _fake_qemu(tmp_path)
    argv = b"-device\0vhost-vsock-pci,guest-cid=%d\0"
    _fake_process(proc, 10, "/bin/sleep", b"sleep\0" + argv % 4)
    _fake_process(proc, 11, f"{qemu} (deleted)", b"qemu\0" + argv % 5)
    if os.geteuid() == 0:
        _fake_process(proc, 12, qemu, b"qemu\0" + argv % 6, uid=1000)
    assert cids_in_use_by_processes(proc, [str(qemu)]) == {5}
    with allocate_cid(tmp_path / "cids", proc_root=proc, qemu_binaries=[str(qemu)]) as lease:
        assert lease.cid == 4


def test_cid_exhausted(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    with allocate_cid(tmp_path / "c", start=10, end=10, proc_root=proc):
        with pytest.raises(CIDExhausted, match="10..10"):
            allocate_cid(tmp_path / "c", start=10, end=10, proc_root=proc)
    with pytest.raises(ValueError):
        allocate_cid(tmp_path / "c", start=2, proc_root=proc)


RACER = textwrap.dedent("""
    import json, sys, time
    from spinbox.shim.vm.cid import allocate_cid
    runtime, proc, go, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    while time.time() < go:
        pass
    held, churn = [], []
    for i in range(n):
        lease = allocate_cid(runtime, start=3, end=3 + 4 * n, proc_root=proc)
        if i % 3 == 2:      # release some at once: exercises unlink-while-locked vs. acquire
            churn.append(lease.cid)
            lease.release()
        else:
            held.append(lease)
    print(json.dumps([l.cid for l in held]))
    sys.stdout.flush()
    sys.stdin.read()        # hold the leases until the parent has compared both sets
""")


def test_two_processes_never_get_the_same_cid(tmp_path):
    import time
    proc = tmp_path / "proc"
    proc.mkdir()
    runtime = tmp_path / "cids"
    go = time.time() + 0.5
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(runtime), str(proc), str(go), "60"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        got = [json.loads(r.stdout.readline()) for r in racers]
        a, b = set(got[0]), set(got[1])
        assert len(a) == len(got[0]) == 40 and len(b) == len(got[1]) == 40
        assert not a & b, f"CIDs held by both processes: {sorted(a & b)}"
        on_disk = {int(p.stem) for p in runtime.iterdir()}
        assert on_disk == a | b  # released ones left no lock file behind
    finally:
        for r in racers:
            r.stdin.close()
            r.wait(10)
    # the holders are gone: their flocks died with them, every CID is free again
    with allocate_cid(runtime, start=3, proc_root=proc) as lease:
        assert lease.cid == 3
