"""Confinement of a running sandbox's host processes (shim/vm/confine.py, shim/vm/jail.py,
docs/security.md): QEMU's jail and rlimits, virtiofsd's sandbox, seccomp and dropped
capabilities, read from /proc."""
from __future__ import annotations

import os
from pathlib import Path

from .test_ctr_run import _comm_is, env, kill_quietly, our_processes, uid  # noqa: F401  (env: fixture)

CAP_MKNOD, CAP_SETFCAP, CAP_SETUID = 27, 31, 7


def _status(pid: int) -> dict[str, str]:
    rows = (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: v.strip() for k, v in rows}


def _limit(pid: int, name: str) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name):
            soft, hard = line[len(name):].split()[:2]
            return soft, hard
    raise AssertionError(f"no {name!r} in /proc/{pid}/limits")


def test_running_sandbox_qemu_and_virtiofsd_are_confined(env):  # noqa: F811
    id = uid("confine")
    env.ctr(*env.run_args("-d", env.ref, id, "sleep", "300"))
    try:
        env.wait_status(id, "RUNNING")
        qemus = env.qemu_pids(id)
        assert len(qemus) == 1, qemus
        q = qemus[0]
        assert _limit(q, "Max core file size") == ("0", "0")
        assert _limit(q, "Max open files") == ("4096", "4096")
        assert _status(q)["Seccomp"] == "2"              # -sandbox on
        # the jail (shim/vm/jail.py): a uid of its own, no privileges, a root of its own
        st = _status(q)
        quid = int(st["Uid"].split()[0])
        assert 0x70000000 <= quid < 0x70000000 + 65536, st["Uid"]
        assert st["Uid"].split() == [str(quid)] * 4 and st["Gid"].split() == [str(quid)] * 4
        assert st["Groups"] == "" and int(st["CapEff"], 16) == 0 and st["NoNewPrivs"] == "1"
        assert os.readlink(f"/proc/{q}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        seen = set(os.listdir(f"/proc/{q}/root"))
        assert "usr" in seen and not seen & {"run", "var", "home", "root", "tmp"}, seen
        assert not Path(f"/proc/{q}/root/run").exists()
        soft, hard = _limit(q, "Max file size")
        assert soft == hard and int(soft) > 0                     # RLIMIT_FSIZE: bounded
        assert Path(f"/run/spinbox/qemu-uid/{quid}.lock").exists()
        vfsds = [p for p in our_processes(env) if _comm_is(p, "virtiofsd")]
        assert vfsds, "no virtiofsd for the container's rootfs"
        # the C virtiofsd forks: the child serving the share is the sandboxed one
        served = [p for p in vfsds if _status(p)["Seccomp"] == "2"]
        assert served, [(p, _status(p)["Seccomp"]) for p in vfsds]
        for p in served:
            caps = int(_status(p)["CapEff"], 16)
            assert not caps & (1 << CAP_MKNOD), f"virtiofsd {p} keeps CAP_MKNOD ({caps:#x})"
            assert not caps & (1 << CAP_SETFCAP), f"virtiofsd {p} keeps CAP_SETFCAP ({caps:#x})"
            assert caps & (1 << CAP_SETUID)                # per-request guest credentials need it
            # its own mount namespace (sandbox=namespace), not the host's
            assert os.readlink(f"/proc/{p}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    finally:
        kill_quietly(env, id)
