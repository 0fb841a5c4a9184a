"""The QEMU jail's launcher (shim/vm/jail_exec.py) run for real, with a program that reports
what it can see and do from inside: uid, groups, root contents, writes, /proc, privileges."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spinbox.shim.vm import jail
from spinbox.shim.vm.config import VMConfig

from .conftest import skip_or_fail

PROBE = r"""
import json, os
out = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
       "root": sorted(os.listdir("/")), "etc": sorted(os.listdir("/etc")),
       "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
out["nnp"] = status["NoNewPrivs"].strip()
out["capeff"] = status["CapEff"].strip()
out["ppid"] = os.getppid()
for path in ("/x", "/usr/x", "/dev/x"):
    try:
        open(path, "w")
        out[path] = "written"
    except OSError as e:
        out[path] = e.strerror
out["fsize"] = open("/proc/self/limits").read().split("Max file size")[1].split()[:2]
print(json.dumps(out))
"""


@pytest.fixture
def root_dir(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail(["not running as root (the jail needs mount namespaces)"])
    d = tmp_path / "jail"
    d.mkdir()
    return d


def test_a_jailed_program_runs_unprivileged_in_a_root_of_its_own(root_dir, tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    cfg = VMConfig(kernel=kernel, qemu_binary=sys.executable, memory_mb=64)
    uid = 0x70000000 + 65000
    spec = jail.jail_spec(cfg, root=root_dir, uid=uid, accel="tcg", nofile=256, parent=os.getpid())
    # the same launcher argv a QEMU gets, with python in QEMU's place
    argv = jail.launcher_argv(spec, [sys.executable, "-I", "-S", "-c", PROBE])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert (seen["uid"], seen["euid"], seen["gid"], seen["groups"]) == (uid, uid, uid, [])
    assert seen["nnp"] == "1" and int(seen["capeff"], 16) == 0
    # only what QEMU reads: /usr, the merged-/usr links, the loader cache, devices, /proc, and
    # the kernel at its own path; no /run (containerd's and other sandboxes' sockets), /var, /home
    # (and here the "QEMU" binary's own top dir: the venv's python)
    assert set(seen["root"]) <= {"usr", "bin", "sbin", "lib", "lib64", "etc", "dev", "proc",
                                 kernel.parts[1], sys.executable.split("/")[1]}, seen["root"]
    assert "run" not in seen["root"] and "var" not in seen["root"]
    assert seen["etc"] in (["ld.so.cache"], [])
    # it sees no other process (hidepid=invisible): only itself
    assert len(seen["pids"]) == 1
    assert all(seen[p] in ("Read-only file system", "Permission denied") for p in ("/x", "/usr/x", "/dev/x")), seen
    assert seen["fsize"] == [str(64 << 20)] * 2
    # nothing of the jail is left on the host: its root dir is empty, nothing mounted there
    assert list(root_dir.iterdir()) == []
    assert str(root_dir) not in open("/proc/self/mounts").read()


def test_a_launcher_failure_names_the_step_and_runs_nothing(root_dir, tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    cfg = VMConfig(kernel=kernel, qemu_binary=sys.executable)
    spec = jail.jail_spec(cfg, root=root_dir / "missing", uid=0x70000000 + 65001, accel="tcg", nofile=64,
                          parent=None)
    marker = tmp_path / "ran"
    r = subprocess.run(jail.launcher_argv(spec, ["/usr/bin/touch", str(marker)]), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 121 and r.stderr.startswith("jail: mount tmpfs on "), r.stderr
    assert not marker.exists()
