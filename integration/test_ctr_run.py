"""`ctr` end to end on the spinbox runtime: the REAL ctr against a private containerd 1.6, each
container in its own QEMU microVM (TCG here), runc inside the guest.

What is proven, one test each: stdout/stderr and exit codes (0, 7, 137 after SIGKILL, 143 after
SIGTERM to an exec), a line piped to stdin, a TTY (`ctr run -t` under a pty), `ctr task exec`,
`pause`/`resume` (the counter really stops), `ps`, `metrics`, `kill --all`, 5 containers at
once, a containerd restart while a task runs, a SIGKILLed shim daemon, a SIGKILLed QEMU, a
guest flooding its console (the host's file stays within its cap).

Cost: every `ctr run` boots a VM (~3-6 s under TCG), so one long-running container (`svc`,
printing a counter) serves the exec/ps/metrics/pause tests, and the image is imported once.

After the suite the environment fixture checks, before it tears containerd down, that nothing
was left: no QEMU, virtiofsd or shim daemon of ours, no mount under our dirs, an empty spinbox
state dir, no new entry in /run/spinbox, no task bundle in containerd's state dir.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.containerd import Containerd, missing_prerequisites
from integration.images import import_busybox
from spinbox.shim.network import cni

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.spinbox.v1"
START = os.environ.get("SPINBOX_TEST_START", "template")     # runtime.start of the suite's shims
SHIM_BIN_DIR = Path(sys.executable).parent          # .venv/bin: containerd-shim-spinbox-v1
SHARE_DIR = Path(os.environ.get("SPINBOX_SHARE_DIR", "/usr/share/spinbox"))
DEFAULT_STATE_DIR = Path("/run/spinbox")
OUR_PROCESS_NAMES = ("qemu-system", "virtiofsd", "containerd-shim-spinbox")
CTR_TIMEOUT = 180.0


# ---------------------------------------------------------------------------------------------
# environment: one private containerd + one image for the whole file

@dataclass
class Env:
    c: Containerd
    ref: str
    work: Path
    state_dir: Path

    def run_args(self, *extra: str) -> list[str]:
        """`ctr run` options every test uses (runtime, FIFOs under our temp dir)."""
        return ["run", "--runtime", RUNTIME, "--fifo-dir", str(self.c.fifo_dir), *extra]

    def ctr(self, *args: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("timeout", CTR_TIMEOUT)
        return self.c.ctr(*args, **kw)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return self.c.ctr_popen(*args, **kw)

    def tasks(self) -> dict[str, str]:
        """`ctr task ls` as {task id: status}."""
        out = self.ctr("task", "ls").stdout.decode()
        rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
        return {r[0]: r[-1] for r in rows}

    def wait_status(self, id: str, status: str, timeout: float = 120.0) -> None:
        wait_until(lambda: self.tasks().get(id) == status, timeout,
                   lambda: f"task {id} to be {status} (tasks: {self.tasks()})")

    def shim_pids(self, id: str) -> list[int]:
        return [p for p in self.c.shim_pids() if _argv_has(p, "-id", id) and b"serve" in _cmdline(p)]

    def qemu_pids(self, id: str) -> list[int]:
        """QEMU processes of sandbox `id` (the shim names the VM after the group id)."""
        return [p for p in our_processes(self) if _comm_is(p, "qemu-system")
                and any(a.startswith(id.encode() + b",") for a in _cmdline(p).split(b"\0"))]

    def bundle_dir(self) -> Path:
        return self.c.base / "state" / "io.containerd.runtime.v2.task" / self.c.namespace


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _argv_has(pid: int, flag: str, value: str) -> bool:
    argv = _cmdline(pid).split(b"\0")
    return any(a == flag.encode() and b == value.encode() for a, b in zip(argv, argv[1:]))


def _comm_is(pid: int, prefix: str) -> bool:
    argv0 = _cmdline(pid).split(b"\0")[0]
    return os.path.basename(argv0).startswith(prefix.encode())


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def our_processes(env: Env) -> list[int]:
    """Live QEMU / virtiofsd / shim processes that belong to this test's containerd or state
    dir (other test sessions on the machine may run their own; they are not ours)."""
    marks = (str(env.state_dir).encode(), env.c.address.encode())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        cmd = _cmdline(pid)
        if not cmd or not any(m in cmd for m in marks):
            continue
        argv = cmd.split(b"\0")
        names = [os.path.basename(argv[0])] + [os.path.basename(a) for a in argv[1:2]]
        if any(n.startswith(k.encode()) for n in names for k in OUR_PROCESS_NAMES) and _alive(pid):
            found.append(pid)
    return found


def _describe(pid: int) -> str:
    return _cmdline(pid).replace(b"\0", b" ")[:160].decode(errors="replace")


def our_mounts(env: Env) -> list[str]:
    prefixes = (str(env.state_dir) + "/", str(env.c.base) + "/", str(env.work) + "/")
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefixes) or p in (str(env.state_dir),)]


def wait_until(pred, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(0.2)


def leftovers(env: Env) -> list[str]:
    """Everything the runtime should have released by now ([] = clean)."""
    problems = []
    procs = our_processes(env)
    if procs:
        problems.append("processes: " + "; ".join(f"{p}: {_describe(p)}" for p in procs))
    mounts = our_mounts(env)
    if mounts:
        problems.append(f"mounts: {mounts}")
    if env.state_dir.exists():
        left = sorted(str(p.relative_to(env.state_dir)) for p in env.state_dir.rglob("*"))
        # the namespace dir and the vm/ parent may stay (empty dirs); files may not, except the
        # VM template cache (templates/<shape>/ and its lock: kept on purpose, for the next start)
        files = [p for p in left if not (env.state_dir / p).is_dir() and not _is_template_file(p)]
        if files:
            problems.append(f"files under the spinbox state dir {env.state_dir}: {files}")
    cgroups = env.c.new_sandbox_cgroups()
    if cgroups:
        problems.append(f"host cgroups: {[str(d) for d in cgroups]}")
    bundles = env.bundle_dir()
    if bundles.exists() and any(bundles.iterdir()):
        problems.append(f"task bundles in containerd's state dir: {sorted(os.listdir(bundles))}")
    return problems


def _is_template_file(rel: str) -> bool:
    """Under templates/ (the suite's template dirs too), except a build in progress (`.b-*`):
    none may be left once every `ctr run` returned."""
    parts = rel.split("/")
    return parts[0].startswith("templates") and not any(p.startswith((".b-", ".vm-")) for p in parts)


# Host-wide flock files are meant to stay: removing one while another shim waits on it would
# let two holders in (the CNI lock serialises every shim's CNI calls on the host).
_PERSISTENT_ENTRIES = {os.path.basename(cni.DEFAULT_LOCK_PATH)}


def _default_state_entries() -> set[str]:
    entries = set(os.listdir(DEFAULT_STATE_DIR)) if DEFAULT_STATE_DIR.is_dir() else set()
    return entries - _PERSISTENT_ENTRIES


@pytest.fixture(scope="session")
def env():
    why = missing_prerequisites()
    for tool in ("qemu-system-x86_64", "runc"):
        if shutil.which(tool) is None:
            why.append(f"`{tool}` not found")
    if not (SHARE_DIR / "image.json").exists():
        why.append(f"no guest image in {SHARE_DIR} (run scripts/setup / `task build`)")
    if not (SHIM_BIN_DIR / "containerd-shim-spinbox-v1").exists():
        why.append(f"{SHIM_BIN_DIR}/containerd-shim-spinbox-v1 missing (pip install -e .)")
    if why:
        msg = "integration prerequisites missing: " + "; ".join(why)
        if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
            pytest.fail(msg)
        pytest.skip(msg)
    default_before = _default_state_entries()
    work = Path(tempfile.mkdtemp(prefix="sbx-ctr-", dir="/tmp"))
    state_dir = work / "st"                  # short: unix sockets live under it
    cfg = work / "config.json"
    # an empty CNI conf dir: loopback-only sandboxes (networking has its own suite, test_ctr_network)
    # SPINBOX_TEST_START=cold runs the suite with cold boots (task test runs it both ways)
    cfg.write_text(json.dumps({"paths": {"state_dir": str(state_dir), "cni_conf_dir": str(work / "no-cni")},
                               "runtime": {"start": START}}))
    c = Containerd.create(path_prefix=[SHIM_BIN_DIR], env={"SPINBOX_CONFIG": str(cfg)}, cri=False)
    e = Env(c, "", work, state_dir)
    problems: list[str] = []
    try:
        e.ref = import_busybox(c)
        yield e
        # ---- the session-level leak check (before teardown: it would hide leaks) ----
        if not c.running:
            c.start()
        for cid in c.ctr("containers", "ls", "-q").stdout.decode().split():
            problems.append(f"container record left: {cid}")
        try:
            wait_until(lambda: not leftovers(e), 20, "the runtime to release everything")
        except AssertionError:
            problems.extend(leftovers(e))
        new_default = _default_state_entries() - default_before
        if new_default:
            problems.append(f"new entries in {DEFAULT_STATE_DIR}: {sorted(new_default)}")
    finally:
        log_tail = c.log_tail(80) if problems else ""
        c.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    assert not problems, "left behind after the ctr suite:\n  " + "\n  ".join(problems) + \
        "\ncontainerd log tail:\n" + log_tail


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def finish(p: subprocess.Popen, timeout: float = CTR_TIMEOUT) -> tuple[int, bytes, bytes]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out or b"", err or b""


def kill_quietly(env: Env, id: str) -> None:
    """Best-effort teardown of a task a failed test left running."""
    env.ctr("task", "kill", "-s", "SIGKILL", id, check=False)
    for _ in range(50):
        if env.tasks().get(id) in (None, "STOPPED"):
            break
        time.sleep(0.2)
    env.ctr("task", "delete", id, check=False)
    env.ctr("containers", "delete", id, check=False)


def test_host_bind_mounts_reach_the_container(env):
    """`--mount type=bind`: a directory (read-write, writes land on the host) and a single file
    (read-only: the container cannot write it, and neither could the guest)."""
    id = uid("bind")
    token = uuid.uuid4().hex
    vol = env.work / f"vol-{id}"
    vol.mkdir()
    (vol / "in.txt").write_text(token + "\n")
    conf_dir = env.work / f"conf-{id}"
    conf_dir.mkdir()
    (conf_dir / "app.conf").write_text(f"conf-{token}\n")
    (conf_dir / "secret").write_text("not for the guest\n")
    r = env.ctr(*env.run_args("--rm", "--mount", f"type=bind,src={vol},dst=/data,options=rbind:rw",
                              "--mount", f"type=bind,src={conf_dir / 'app.conf'},dst=/etc/app.conf,options=rbind:ro"),
                env.ref, id, "sh", "-c",
                "cat /data/in.txt /etc/app.conf; echo from-guest > /data/out.txt; "
                "(echo x >> /etc/app.conf) 2>/dev/null && echo WROTE || echo ro-refused", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == [token, f"conf-{token}", "ro-refused"], r.stdout
    assert (vol / "out.txt").read_text() == "from-guest\n"
    assert (conf_dir / "app.conf").read_text() == f"conf-{token}\n"
    wait_until(lambda: not [m for m in our_mounts(env) if id in m], 30, "the bind staging mounts to go")


def test_a_hostile_guest_cannot_write_through_read_only_shares(env):
    """The guest mounts the shares itself (a privileged container can): a `ro` rbind is still
    read-only below its submounts, and a read-only rootfs on the host side too."""
    from spinbox.shim import mounts

    id = uid("hostile")
    src = env.work / f"vol-{id}"
    (src / "sub").mkdir(parents=True)
    mounts.mount_syscall("tmpfs", str(src / "sub"), 0, fstype="tmpfs", data="size=1m")
    try:
        (src / "sub" / "inner.txt").write_text("inner\n")
        script = ("for t in binds rootfs; do for n in 1 2 3 4 5 6 7 8 9; do "
                  "  d=/tmp; [ $t = rootfs ] && d=/root; mount -t virtiofs $t-$n $d 2>/dev/null && break; done; done; "
                  "grep -q ' /root virtiofs ' /proc/mounts && echo rootfs-mounted; "
                  "cat /tmp/b0/sub/inner.txt; "
                  "(echo x > /tmp/b0/sub/evil) 2>/dev/null && echo WROTE-SUB || echo sub-refused; "
                  "(echo x > /tmp/b0/evil) 2>/dev/null && echo WROTE-TOP || echo top-refused; "
                  "(echo x > /root/evil) 2>/dev/null && echo WROTE-ROOTFS || echo rootfs-refused")
        r = env.ctr(*env.run_args("--rm", "--privileged", "--read-only", "--mount",
                                  f"type=bind,src={src},dst=/var,options=rbind:ro"),
                    env.ref, id, "sh", "-c", script, check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().split() == ["rootfs-mounted", "inner", "sub-refused", "top-refused",
                                        "rootfs-refused"], r.stdout
        assert sorted(os.listdir(src / "sub")) == ["inner.txt"] and sorted(os.listdir(src)) == ["sub"]
    finally:
        mounts.unmount_all(src / "sub")
    wait_until(lambda: not [m for m in our_mounts(env) if id in m], 30, "the staging and rootfs mounts to go")


def test_a_missing_bind_source_fails_the_create_by_name(env):
    id = uid("nobind")
    missing = env.work / f"missing-{id}"
    r = env.ctr(*env.run_args("--rm", "--mount", f"type=bind,src={missing},dst=/data,options=rbind:ro"),
                env.ref, id, "true", check=False)
    assert r.returncode != 0
    assert str(missing) in r.stderr.decode() and "does not exist" in r.stderr.decode(), r.stderr
    env.ctr("containers", "delete", id, check=False)


# ---------------------------------------------------------------------------------------------
# one-shot containers

def test_stdout_stderr_and_exit_codes(env):
    r = env.ctr(*env.run_args("--rm"), env.ref, uid("out"),
                "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (7, b"to-stdout\n", b"to-stderr\n")
    r = env.ctr(*env.run_args("--rm"), env.ref, uid("ok"), "uname", "-s", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"Linux\n", b"")


def test_every_ctr_run_leaves_one_timeline_line(env):
    """The shim logs where the time of a `ctr run --rm` went (containerd copies the shim's log
    into its own): one line, in order, from the rootfs to the VM's stop."""
    id = uid("tl")
    r = env.ctr(*env.run_args("--rm"), env.ref, id, "true", check=False)
    assert r.returncode == 0, r.stderr
    def found() -> list[str]:
        return [ln for ln in env.c.log_path.read_text(errors="replace").splitlines() if f"timeline {id}:" in ln]
    wait_until(found, 20, "the timeline line in containerd's log")
    lines = found()
    assert len(lines) == 1, lines
    marks = re.findall(r"(\w+)=(?:\w+:)?\+([0-9.]+)", lines[0].split(f"timeline {id}:", 1)[1])
    names = [n for n, _ in marks]
    for step in ("rootfs", "sandbox", "shared", "created", "started", "exit", "deleted", "vm_stopped"):
        assert step in names, (step, lines[0])
    assert re.search(r" sandbox=(cold|template):\+" if START == "template" else r" sandbox=cold:\+",
                     lines[0]), lines[0]
    times = [float(t) for _, t in marks]
    assert times == sorted(times) and names[-1] == "vm_stopped"


def test_crun_in_the_guest_by_runtime_options(env):
    """`runtime.oci_runtime = crun` from ctr's --runtime-config-path (runtime options, layered
    over the config file): the container runs under crun in the guest, same output and codes."""
    opts = env.work / f"crun-{uuid.uuid4().hex[:6]}.json"
    opts.write_text(json.dumps({"runtime": {"oci_runtime": "crun"}}))
    r = env.ctr(*env.run_args("--rm", "--runtime-config-path", str(opts)), env.ref, uid("crun"),
                "sh", "-c", "echo under-crun; exit 3", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"under-crun\n", b"")


def test_a_line_piped_to_stdin(env):
    r = env.ctr(*env.run_args("--rm"), env.ref, uid("in"),
                "sh", "-c", "read line; echo got:$line; cat | wc -c", input=b"hello spinbox\nrest\n",
                check=False)
    assert (r.returncode, r.stderr) == (0, b"")
    assert r.stdout.split() == [b"got:hello", b"spinbox", b"5"]


def _pty_session(argv: list[str], script: list[tuple[bytes, bytes]], size: tuple[int, int],
                 timeout: float = CTR_TIMEOUT) -> tuple[int, bytes]:
    """Run argv on a new pty of `size` (rows, cols); for each (expect, send): wait for `expect`
    in the output, then type `send`. Returns (exit code, all output)."""
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
        os.execvp(argv[0], argv)
    out = b""
    deadline = time.monotonic() + timeout
    steps = list(script)
    try:
        while True:
            if steps and steps[0][0] in out:
                os.write(fd, steps.pop(0)[1])
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"pty session timed out; output so far: {out!r}")
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if r:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:          # EIO: the child closed the pty
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def test_tty(env):
    argv = env.c.ctr_argv(*env.run_args("--rm", "-t"), env.ref, uid("tty"), "sh")
    code, out = _pty_session(argv, [(b"# ", b"tty; echo $((6*7))xx; stty size\r"),
                                    (b"42xx", b"exit 3\r")], size=(37, 111))
    assert code == 3, out
    assert b"/dev/pts/" in out and b"42xx" in out, out
    assert b"37 111" in out, f"the container's tty did not get ctr's window size: {out!r}"


def test_five_containers_at_once(env):
    ids = [uid(f"par{i}") for i in range(5)]

    def one(i: int) -> subprocess.CompletedProcess:
        return env.ctr(*env.run_args("--rm"), env.ref, ids[i],
                       "sh", "-c", f"echo hello-from-{i}; echo err-{i} >&2; exit {10 + i}", check=False)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, range(5)))
    for i, r in enumerate(results):
        assert (r.returncode, r.stdout, r.stderr) == (10 + i, f"hello-from-{i}\n".encode(),
                                                      f"err-{i}\n".encode()), (i, r)


# ---------------------------------------------------------------------------------------------
# VM templates (runtime.start = template, the default): each test uses a template dir of its
# own through runtime options, so it sees the cache from empty

def _template_opts(env: Env, name: str) -> tuple[list[str], Path]:
    tdir = env.state_dir / f"templates-{name}"          # beside the suite's default cache, not in it
    opts = env.work / f"tpl-{name}.json"
    opts.write_text(json.dumps({"paths": {"template_dir": str(tdir)}, "runtime": {"start": "template"}}))
    return ["--runtime-config-path", str(opts)], tdir


def _log_lines(env: Env, needle: str) -> list[str]:
    return [ln for ln in env.c.log_path.read_text(errors="replace").splitlines() if needle in ln]


def _template_dirs(tdir: Path) -> list[Path]:
    return sorted(p for p in tdir.iterdir() if p.is_dir()) if tdir.is_dir() else []


def test_sandboxes_started_at_once_build_one_template_and_are_distinct_machines(env):
    """Three `ctr run` at once with no template yet: it is built once (host-wide lock), all
    three are restored from it, and each clone is its own machine: its own boot id, its own
    random bytes, the host's clock."""
    opts, tdir = _template_opts(env, "par")
    ids = [uid(f"tp{i}") for i in range(3)]
    script = "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"

    def one(i: int) -> subprocess.CompletedProcess:
        return env.ctr(*env.run_args("--rm", *opts), env.ref, ids[i], "sh", "-c", script, check=False)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(3)))
    now = time.time()
    outs = []
    for r in results:
        assert r.returncode == 0, r.stderr
        boot_id, rnd, clock = r.stdout.decode().split()
        outs.append((boot_id, rnd, int(clock)))
    built = _log_lines(env, f"vm template {tdir}/")
    assert len([ln for ln in built if " built in " in ln]) == 1, _log_lines(env, "template")[-10:]
    assert len(_template_dirs(tdir)) == 1, _log_lines(env, "template")[-10:]
    for id in ids:
        assert _log_lines(env, f"timeline {id}: ") and " sandbox=template:+" in _log_lines(env, f"timeline {id}: ")[0]
    assert len({b for b, _, _ in outs}) == 3, outs          # boot ids differ
    assert len({x for _, x, _ in outs}) == 3, outs          # random bytes differ
    assert all(abs(c - now) < 30 for _, _, c in outs), (outs, now)   # the host's clock, not the template's


def test_a_corrupt_template_is_removed_and_the_sandbox_boots_cold(env):
    opts, tdir = _template_opts(env, "bad")
    r = env.ctr(*env.run_args("--rm", *opts), env.ref, uid("tb"), "true", check=False)
    assert r.returncode == 0, r.stderr
    [t] = _template_dirs(tdir)
    state = t / "state"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    id = uid("tb")
    r = env.ctr(*env.run_args("--rm", *opts), env.ref, id, "sh", "-c", "echo still-runs", check=False)
    assert (r.returncode, r.stdout) == (0, b"still-runs\n"), r.stderr
    refused = _log_lines(env, "checksum mismatch")
    assert any(str(t) in ln and "booting cold" in ln for ln in refused), refused
    assert " sandbox=cold:+" in _log_lines(env, f"timeline {id}: ")[0]
    assert not t.exists()                                    # removed: the next start builds afresh
    r = env.ctr(*env.run_args("--rm", *opts), env.ref, uid("tb"), "true", check=False)
    assert r.returncode == 0 and len(_template_dirs(tdir)) == 1, r.stderr


def test_removing_the_templates_while_sandboxes_run_breaks_none(env):
    opts, tdir = _template_opts(env, "rm")
    ids = [uid("tr"), uid("tr")]
    for id in ids:
        env.ctr(*env.run_args("-d", *opts), env.ref, id, "sleep", "600")
    try:
        wait_until(lambda: all(env.tasks().get(i) == "RUNNING" for i in ids), 120, "both sandboxes to run")
        shutil.rmtree(tdir)
        for id in ids:
            r = env.ctr("task", "exec", "--exec-id", "after-rm", id, "sh", "-c", "echo alive", check=False)
            assert (r.returncode, r.stdout) == (0, b"alive\n"), r.stderr
    finally:
        for id in ids:
            kill_quietly(env, id)


# ---------------------------------------------------------------------------------------------
# one long-running container for exec / ps / metrics / pause (printing a counter)

COUNTER = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done"


@dataclass
class Svc:
    id: str
    proc: subprocess.Popen      # the attached `ctr run`
    out: Path                   # its stdout (the counter lines)

    def lines(self) -> int:
        return self.out.read_bytes().count(b"\n")


@pytest.fixture(scope="module")
def svc(env):
    id = uid("svc")
    out = env.work / f"{id}.out"
    with open(out, "wb") as f:
        proc = env.popen(*env.run_args("--rm"), env.ref, id, "sh", "-c", COUNTER,
                         stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE)
    s = Svc(id, proc, out)
    try:
        wait_until(lambda: s.lines() >= 3 or proc.poll() is not None, 120,
                   "the counter container to print")
        assert proc.poll() is None, f"ctr run exited {proc.returncode}: {proc.stderr.read()!r}"
        yield s
    finally:
        if proc.poll() is None:
            kill_quietly(env, id)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stderr.close()


def test_exec_output_and_exit_code(env, svc):
    r = env.ctr("task", "exec", "--exec-id", "e-out", svc.id,
                "sh", "-c", "echo exec-out; echo exec-err >&2; exit 5", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (5, b"exec-out\n", b"exec-err\n")
    # an exec sees the init's world: same rootfs, init is PID 1
    r = env.ctr("task", "exec", "--exec-id", "e-ps", svc.id, "cat", "/proc/1/cmdline", check=False)
    assert r.returncode == 0 and r.stdout.startswith(b"sh\0-c\0"), r


def test_exec_stdin(env, svc):
    r = env.ctr("task", "exec", "--exec-id", "e-in", svc.id, "tr", "a-z", "A-Z",
                input=b"shout\n", check=False)
    assert (r.returncode, r.stdout) == (0, b"SHOUT\n"), r


def test_exec_large_output_arrives_whole(env, svc):
    # ~2 MB: many windows of the per-stream flow control, in order, nothing lost or duplicated
    r = env.ctr("task", "exec", "--exec-id", "e-big", svc.id, "seq", "1", "300000", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"{i}\n" for i in range(1, 300001)).encode()


def _ps(env: Env, id: str) -> list[tuple[str, str]]:
    """`ctr task ps` as [(pid, info)]; info is "-" or the exec's ProcessDetails."""
    out = env.ctr("task", "ps", id).stdout.decode()
    return [tuple(line.split(None, 1)) for line in out.splitlines()[1:] if line.strip()]


def test_ps_and_sigterm_to_an_exec(env, svc):
    before = _ps(env, svc.id)
    assert before and all(pid.isdigit() for pid, _ in before), before
    sleeper = env.popen("task", "exec", "--exec-id", "e-term", svc.id, "sleep", "1000",
                        stdin=subprocess.DEVNULL)
    try:
        # the exec shows up with its exec id (ProcessDetails), beside the init's processes
        wait_until(lambda: any("e-term" in info for _, info in _ps(env, svc.id)), 60,
                   lambda: f"the exec to show in ctr task ps: {_ps(env, svc.id)} (exec: {sleeper.poll()})")
        assert len(_ps(env, svc.id)) >= 2
        env.ctr("task", "kill", "-s", "SIGTERM", "--exec-id", "e-term", svc.id)
        code, _, err = finish(sleeper)
        assert code == 143, (code, err)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    wait_until(lambda: not any("e-term" in info for _, info in _ps(env, svc.id)), 30,
               "the exec to leave ps")
    assert svc.proc.poll() is None, "the init must survive an exec's death"


def test_metrics(env, svc):
    out = env.ctr("task", "metrics", svc.id).stdout.decode()
    values = dict(re.findall(r"^(\S+)\s+(\d+)\s*$", out, re.M))
    assert int(values.get("memory.usage", 0)) > 0, out
    assert int(values.get("pids.current", 0)) >= 1, out


def test_pause_stops_the_process_and_resume_continues(env, svc):
    env.ctr("task", "pause", svc.id)
    try:
        assert env.tasks()[svc.id] == "PAUSED"
        time.sleep(1.0)                    # lines already in flight reach the file
        frozen = svc.lines()
        time.sleep(2.0)                    # a running counter prints ~20 lines in this time
        assert svc.lines() == frozen, "the counter advanced while the task was paused"
    finally:
        env.ctr("task", "resume", svc.id)
    assert env.tasks()[svc.id] == "RUNNING"
    wait_until(lambda: svc.lines() > frozen + 3, 60, "the counter to advance after resume")


def test_sigkill_to_init_exits_137(env, svc):
    # the counter's PID 1 (sh) has no SIGTERM handler: only SIGKILL ends it
    env.ctr("task", "kill", "-s", "SIGKILL", svc.id)
    code, _, err = finish(svc.proc)
    assert code == 137, (code, err)
    wait_until(lambda: svc.id not in env.tasks(), 60, "ctr run --rm to delete the task")
    assert not env.qemu_pids(svc.id) and not env.shim_pids(svc.id)


def test_kill_all(env):
    id = uid("all")
    init = env.popen(*env.run_args("--rm"), env.ref, id, "sleep", "1000", stdin=subprocess.DEVNULL)
    execs = []
    try:
        env.wait_status(id, "RUNNING")
        execs = [env.popen("task", "exec", "--exec-id", f"x{i}", id, "sleep", "1000",
                           stdin=subprocess.DEVNULL) for i in range(2)]
        wait_until(lambda: len(_ps(env, id)) == 3, 60, lambda: f"3 pids in {id}: {_ps(env, id)}")
        env.ctr("task", "kill", "--all", "-s", "SIGKILL", id)
        codes = [finish(p)[0] for p in execs] + [finish(init)[0]]
        assert codes == [137, 137, 137]
    finally:
        for p in [*execs, init]:
            if p.poll() is None:
                p.kill()
                p.wait()
        if id in env.tasks():
            kill_quietly(env, id)


# ---------------------------------------------------------------------------------------------
# failures around the task

@contextlib.contextmanager
def ctr_events(env: Env, name: str):
    """`ctr events` into a log file, subscribed (an event containerd itself publishes has shown
    up) before the body runs; yields `lines(topic, id)` -> the matching event lines so far."""
    log = env.work / f"{name}.events"
    with open(log, "wb") as f:
        events = env.popen("events", stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: env.ctr("images", "label", env.ref, f"probe={time.time_ns()}")
                   and "/images/update" in log.read_text(), 30, "ctr events to subscribe")
        yield lambda topic, id: [ln for ln in log.read_text().splitlines() if topic in ln and id in ln]
    finally:
        events.terminate()
        events.wait(30)


def test_containerd_restart_while_a_task_runs(env):
    id = uid("rst")
    env.ctr(*env.run_args("-d"), env.ref, id, "sleep", "1000")
    try:
        env.wait_status(id, "RUNNING")
        shim = env.shim_pids(id)
        env.c.restart()
        assert env.tasks().get(id) == "RUNNING"
        assert env.shim_pids(id) == shim, "the shim daemon must outlive a containerd restart"
        # the shim's event publisher must find the new containerd: watch for the exit event
        with ctr_events(env, id) as lines:
            env.ctr("task", "kill", "-s", "SIGKILL", id)
            env.wait_status(id, "STOPPED")
            wait_until(lambda: lines("/tasks/exit", id), 30, f"a /tasks/exit event for {id}")
            assert '"exit_status":137' in lines("/tasks/exit", id)[0]
        env.ctr("task", "delete", id)
        env.ctr("containers", "delete", id)
        wait_until(lambda: not env.qemu_pids(id) and not env.shim_pids(id), 30,
                   "QEMU and the shim to exit after delete")
        assert not (env.bundle_dir() / id).exists()
    finally:
        if not env.c.running:
            env.c.start()
        if id in env.tasks():
            kill_quietly(env, id)


def test_oom_kill_in_the_guest_reaches_containerd_as_tasks_oom(env):
    """`--memory-limit` becomes the container's memory cgroup limit in the guest; a process
    that needs more is OOM-killed there, and containerd publishes /tasks/oom for it, then
    /tasks/exit with 137."""
    id = uid("oom")
    with ctr_events(env, id) as lines:
        # dd's 96 MiB block buffer is filled by its first read: over the 32 MiB limit
        r = env.ctr(*env.run_args("--rm", "--memory-limit", str(32 << 20)), env.ref, id,
                    "dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=1", check=False)
        assert r.returncode == 137, (r.returncode, r.stderr)
        wait_until(lambda: lines("/tasks/oom", id) and lines("/tasks/exit", id), 30,
                   f"/tasks/oom and /tasks/exit for {id}")
        assert '"exit_status":137' in lines("/tasks/exit", id)[0]


def _vm_dir(env: Env, id: str) -> Path:
    """The VM dir of sandbox `id` (its QMP socket's, named in QEMU's argv)."""
    pids = env.qemu_pids(id)
    assert pids, f"no QEMU for {id}"
    argv = _cmdline(pids[0]).split(b"\0")
    tagged = [a for a in argv if a.endswith(b"/qmp.sock")]
    assert tagged, argv
    return Path(tagged[0].decode().rsplit("=", 1)[-1]).parent


def test_a_guest_flooding_its_console_keeps_the_file_within_the_cap(env):
    """A privileged container writes 3 MiB into the serial console: the host's console file
    (console.log + console.log.1) stays within guest.console_log_max_mb, keeps the newest
    output, and the sandbox answers exec while and after the guest writes."""
    id = uid("con")
    opts = env.work / "console-cap.json"
    opts.write_text(json.dumps({"guest": {"console_log_max_mb": 1}}))
    cap = 1 << 20
    flood = "yes spinbox-console-flood-0123456789abcdefghijklmnopqrstuvwxyz | head -c 3145728 > /dev/ttyS0"
    env.ctr(*env.run_args("-d", "--privileged", "--runtime-config-path", str(opts)), env.ref, id,
            "sh", "-c", f"{flood}; echo written > /tmp/flood-done; sleep 600")
    try:
        env.wait_status(id, "RUNNING")
        vm = _vm_dir(env, id)
        files = [vm / "console.log", vm / "console.log.1"]

        def on_disk() -> int:
            return sum(f.stat().st_size for f in files if f.exists())

        sizes = []
        deadline = time.monotonic() + 150
        n = 0
        while True:
            n += 1
            r = env.ctr("task", "exec", "--exec-id", f"e{n}", id, "cat", "/tmp/flood-done", check=False,
                        timeout=60)
            sizes.append(on_disk())
            assert sizes[-1] <= cap, sizes
            if r.returncode == 0 and r.stdout == b"written\n":
                break
            assert time.monotonic() < deadline, f"the guest never finished writing its console ({sizes})"
            time.sleep(1)
        assert files[1].exists(), f"3 MiB into a 1 MiB console never rotated it ({sizes})"
        assert on_disk() <= cap
        assert b"spinbox-console-flood-0123456789" in files[0].read_bytes()[-4096:] + files[1].read_bytes()[-4096:]
        r = env.ctr("task", "exec", "--exec-id", "after", id, "echo", "alive", check=False)
        assert (r.returncode, r.stdout) == (0, b"alive\n"), r.stderr
    finally:
        kill_quietly(env, id)


def test_killed_shim_daemon_is_cleaned_up_by_delete(env):
    id = uid("shk")
    env.ctr(*env.run_args("-d"), env.ref, id, "sleep", "1000")
    try:
        env.wait_status(id, "RUNNING")
        shim, qemu = env.shim_pids(id), env.qemu_pids(id)
        assert len(shim) == 1 and len(qemu) == 1, (shim, qemu)
        os.kill(shim[0], signal.SIGKILL)
        # containerd sees the connection drop and runs our `delete` (its cleanupAfterDeadShim);
        # `ctr task delete` then finds the task stopped or already gone
        wait_until(lambda: env.tasks().get(id) in (None, "STOPPED"), 60, "the task to stop")
        r = env.ctr("task", "delete", id, check=False)
        assert r.returncode == 0 or b"not found" in r.stderr, r
        env.ctr("containers", "delete", id)
        # containerd runs `delete` in the background: give it a bounded moment
        wait_until(lambda: not _alive(qemu[0]) and not [m for m in our_mounts(env) if id in m], 30,
                   lambda: f"QEMU to be killed and the rootfs unmounted (mounts: {our_mounts(env)})")
        assert not env.shim_pids(id)
    finally:
        if id in env.tasks():
            kill_quietly(env, id)


def test_killed_qemu_ends_the_task(env):
    id = uid("qk")
    ctr = env.popen(*env.run_args("--rm"), env.ref, id, "sleep", "1000", stdin=subprocess.DEVNULL)
    try:
        env.wait_status(id, "RUNNING")
        qemu = env.qemu_pids(id)
        assert len(qemu) == 1, qemu
        os.kill(qemu[0], signal.SIGKILL)
        code, _, err = finish(ctr)
        assert code != 0, err
        wait_until(lambda: id not in env.tasks() and not env.shim_pids(id), 60,
                   "the task and its shim to go away")
        assert not [m for m in our_mounts(env) if id in m]
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
        if id in env.tasks():
            kill_quietly(env, id)


def test_a_privileged_workload_can_build_its_own_network_in_the_guest(env):
    """The guest kernel's network features for workloads that make their own networks
    (kernel/spinbox.config): a Linux bridge with a veth pair on it, TUN, and netfilter's
    connection tracking, all inside the container's own network namespace in the guest."""
    id = uid("netfeat")
    script = ("ip link add sbxbr0 type bridge && ip link add sbxv0 type veth && "
              "ip link set sbxv0 master sbxbr0 && ip link set sbxbr0 up && "
              "ip -o link | grep sbxv0 | grep -q 'master sbxbr0' && echo bridge-veth-ok || ip -o link >&2; "
              "cat /dev/net/tun 2>&1 | grep -q 'bad state' && echo tun-ok; "
              "test -f /proc/sys/net/netfilter/nf_conntrack_max && echo conntrack-ok")
    r = env.ctr(*env.run_args("--rm", "--privileged"), env.ref, id, "sh", "-c", script, check=False)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    # TUN: opening /dev/net/tun works; reading before TUNSETIFF is EBADFD ("bad state"), where
    # a kernel without TUN answers ENODEV
    assert out.split() == ["bridge-veth-ok", "tun-ok", "conntrack-ok"], (out, r.stderr)
