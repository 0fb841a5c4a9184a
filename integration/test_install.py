"""`spinbox install` for real, on this host: the machine's /usr/local/bin and /etc/spinbox, its
own containerd config (left untouched where containerd is 1.6/1.7: install refuses to edit it),
then a containerd on that same config finds the installed shim with a service's PATH (no
virtualenv on it) and `ctr run --runtime io.containerd.spinbox.v1` prints "hi" from a microVM;
then `spinbox uninstall`, and every file install could touch is as it was (hashes, modes).
(Under SPINBOX_TEST_CONTAINERD_BIN=<2.x dir> install adds its imports line to the real
config.toml and uninstall takes it out again.)

Then, per containerd release at hand (the system's and those scripts/fetch-containerd unpacked),
the runtime entry install writes into a copy of the host's config is loaded by that containerd:
its CRI plugin is ok and its merged config has both runtimes and the host's CNI dirs.

The containerd here is private: it runs on a copy of /etc/containerd/config.toml whose system
paths (its root and state dirs, the CNI conf dir, the opt dir) point into a temp dir and whose
socket is its own, so the host's containerd paths are not touched. The shims get a spinbox
config of their own (a private state dir, cold boots, no CNI) through containerd's environment,
so the leak checks of the ctr suite apply and no VM template is left in /run.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from integration.conftest import skip_or_fail
from integration.containerd import CONTAINERD, Containerd, missing_prerequisites
from integration.images import import_busybox
from integration.test_ctr_run import SHARE_DIR, Env, leftovers, wait_until
from spinbox.shim import config as config_mod
from spinbox.shim import install
from spinbox.shim.cli import main as cli_main

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.spinbox.v1"
SPINBOX = Path(sys.executable).parent / "spinbox"
HOST_CONFIG = Path(install.CONTAINERD_CONFIG)
# systemd's default PATH for services (what containerd.service runs with): no virtualenv on it
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# every place install writes or could write, and the system paths of containerd's config (the
# sandboxes' own leftovers are the ctr suite's `leftovers`; /run/spinbox holds host-wide lock
# dirs that are meant to stay, and other sessions' sandboxes)
WATCHED = ("/usr/local/bin", "/etc/spinbox", "/var/lib/spinbox", "/etc/containerd", "/etc/cni",
           "/var/lib/containerd")
# system paths in the host's containerd config that a private containerd must not use
MOVED = (("/var/lib/containerd", "root"), ("/run/containerd", "state"), ("/etc/cni/net.d", "cni-conf"))


def tree(paths: tuple[str, ...]) -> dict[str, str]:
    """path -> kind, mode and sha256 for every entry below each path ("absent" if none)."""
    out = {}
    for top in paths:
        if not os.path.lexists(top):
            out[top] = "absent"
            continue
        entries = [top]
        for dirpath, dirnames, filenames in os.walk(top):
            entries += [os.path.join(dirpath, n) for n in dirnames + filenames]
        for p in entries:
            st = os.lstat(p)
            if os.path.islink(p):
                out[p] = f"link {os.readlink(p)}"
            elif os.path.isdir(p):
                out[p] = f"dir {st.st_mode:o}"
            else:
                out[p] = f"file {st.st_mode:o} {hashlib.sha256(Path(p).read_bytes()).hexdigest()}"
    return out


def machine_config(base: Path, source: Path = HOST_CONFIG, rewrites: tuple[tuple[str, str], ...] = ()) -> str:
    """A containerd config (the host's by default) with its system paths moved below `base`,
    `rewrites` (old, new) applied, and a private socket."""
    text = source.read_text()
    parsed = tomllib.loads(text)
    for key in ("root", "state", "grpc", "ttrpc"):
        if key in parsed:
            pytest.skip(f"{source} sets `{key}`: this test only moves the default paths")
    for old, new in rewrites:
        text = text.replace(old, new)
    for system, mine in MOVED:
        for quote in ('"', "'"):
            text = text.replace(quote + system, quote + str(base / mine))
    lines = text.splitlines(keepends=True)
    at = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("version")), 0)
    lines.insert(at, f'root = "{base}/root"\nstate = "{base}/state"\n')
    return "".join(lines) + f'\n[grpc]\n  address = "{base}/containerd.sock"\n\n[ttrpc]\n  address = ""\n'


class MachineConfigContainerd(Containerd):
    """A private containerd on the machine's own config (see machine_config), with the PATH a
    service has; `binary`, `source` and `rewrites` pick another containerd and config."""

    def __init__(self, base: Path, *, binary: str = CONTAINERD, source: Path = HOST_CONFIG,
                 rewrites: tuple[tuple[str, str], ...] = (), **kw) -> None:
        super().__init__(base, **kw)
        self.binary, self.source, self.rewrites = binary, source, rewrites

    def start(self, timeout: float = 30.0) -> None:
        for d in ("root", "state", "cni-conf", "opt", "fifo"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(machine_config(self.base, self.source, self.rewrites))
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen([shutil.which(self.binary) or self.binary, "--config", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        self._wait_ready(timeout)

    def _env(self) -> dict[str, str]:
        return {"PATH": SERVICE_PATH, **self.extra_env}


def _run(env: Env, id: str) -> subprocess.CompletedProcess:
    return env.c.ctr("run", "--runtime", RUNTIME, "--rm", "--fifo-dir", str(env.c.fifo_dir), env.ref,
                     id, "echo", "hi", check=False, timeout=240)


def test_install_then_ctr_run_with_the_host_containerd_config_then_uninstall():
    why = missing_prerequisites()
    for tool in ("qemu-system-x86_64",):
        if shutil.which(tool) is None:
            why.append(f"`{tool}` not found")
    if not (SHARE_DIR / "image.json").exists():
        why.append(f"no guest image in {SHARE_DIR}")
    if not HOST_CONFIG.is_file():
        why.append(f"no {HOST_CONFIG}")
    if why:
        skip_or_fail(why)
    if os.path.lexists(install.MANIFEST) or os.path.lexists(install.LAUNCHER):
        pytest.skip(f"spinbox is installed on this host ({install.MANIFEST} or {install.LAUNCHER} "
                    f"exists): this test would uninstall it (`spinbox uninstall` if a crashed run of it left them)")
    assert shutil.which(install.SHIM_NAME, path=SERVICE_PATH) is None, "a shim is on the service PATH already"
    version = install.detect_version(CONTAINERD)
    before = tree(WATCHED)
    config_before = HOST_CONFIG.read_bytes()

    work = Path(tempfile.mkdtemp(prefix="sbx-inst-", dir="/tmp"))
    state_dir = work / "st"
    cfg = work / "config.json"
    cfg.write_text(json.dumps({"paths": {"state_dir": str(state_dir), "cni_conf_dir": str(work / "no-cni")},
                               "runtime": {"start": "cold"}}))
    c = MachineConfigContainerd.create(env={"SPINBOX_CONFIG": str(cfg)}, namespace="spinbox-install-it")
    env = Env(c, "", work, state_dir)
    try:
        env.ref = import_busybox(c)
        # the proof that the PATH has no shim: before install containerd cannot find it
        id0 = f"noshim-{uuid.uuid4().hex[:6]}"
        r = _run(env, id0)
        assert r.returncode != 0 and b"not installed" in r.stderr, r.stderr
        c.ctr("containers", "delete", id0, check=False)

        out = err = ""
        try:
            t0 = time.monotonic()
            r = subprocess.run([str(SPINBOX), "install", "--containerd", CONTAINERD], capture_output=True,
                               text=True, timeout=120)
            install_s = time.monotonic() - t0
            out, err = r.stdout, r.stderr
            assert r.returncode == 0, err
            assert Path(install.LAUNCHER).is_file() and Path(install.SPINBOX_CONFIG).is_file()
            if version[0] < 2:
                assert HOST_CONFIG.read_bytes() == config_before
                assert "NOT changed" in out and "--edit-config" in out, out
            else:
                assert Path(install.DROPIN).is_file()
                assert install.imports_covers(tomllib.loads(HOST_CONFIG.read_text()).get("imports", []),
                                              install.CONTAINERD_CONFIG, install.DROPIN)
            assert "needs no containerd config entry" in out and "no guest image" not in out
            # the config.json install wrote is one the shim loads, and names this host's guest image
            installed = config_mod.load(env={config_mod.CONFIG_ENV: install.SPINBOX_CONFIG})
            assert config_mod.guest_image(installed).hash

            id1 = f"inst-{uuid.uuid4().hex[:6]}"
            t0 = time.monotonic()
            r = _run(env, id1)
            run_s = time.monotonic() - t0
            assert r.returncode == 0, (r.stderr.decode(errors="replace") + "\n" + c.log_tail(60))
            assert r.stdout == b"hi\n"
            print(f"spinbox install {install_s:.2f} s; ctr run --rm echo hi through the installed "
                  f"launcher {run_s:.2f} s (cold boot)")
        finally:
            u = subprocess.run([str(SPINBOX), "uninstall"], capture_output=True, text=True, timeout=120)
        assert u.returncode == 0, u.stderr
        # the shims' own state first (the shim's delete may still be running)
        wait_until(lambda: not leftovers(env), 30, lambda: f"the runtime to release everything: {leftovers(env)}")
        assert HOST_CONFIG.read_bytes() == config_before
        assert tree(WATCHED) == before, (out, u.stdout)

        # containerd remembers where it found a shim: until it restarts, a new sandbox fails on
        # the removed launcher (uninstall says to restart it); after a restart it is not found
        id2 = f"gone-{uuid.uuid4().hex[:6]}"
        r = _run(env, id2)
        assert r.returncode != 0 and (b"not installed" in r.stderr or
                                      f"fork/exec {install.LAUNCHER}: no such file".encode() in r.stderr), r.stderr
        c.ctr("containers", "delete", id2, check=False)
        c.restart()
        r = _run(env, id2)
        assert r.returncode != 0 and b"not installed" in r.stderr, r.stderr
        c.ctr("containers", "delete", id2, check=False)
        assert c.ctr("containers", "ls", "-q").stdout.split() == []
    finally:
        c.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    assert tree(WATCHED) == before


# ---------------------------------------------------------------------------------------------
# the runtime entry, loaded by each containerd release at hand

FETCH_CACHE = Path(os.environ.get("SPINBOX_CONTAINERD_CACHE", "/var/cache/spinbox/containerd"))


def _releases() -> list[str]:
    """The system containerd and those scripts/fetch-containerd unpacked (docs/testing.md)."""
    found = [b for b in [shutil.which(CONTAINERD)] if b]
    found += sorted(glob.glob(str(FETCH_CACHE / "*" / "usr" / "bin" / "containerd")))
    return [b for b in found if os.access(b, os.X_OK)]


@pytest.mark.parametrize("binary", _releases() or ["containerd"],
                         ids=lambda b: b.split("/")[-4] if str(FETCH_CACHE) in b else "system")
def test_the_runtime_entry_loads_in_real_containerd(binary, tmp_path, capsys):
    """Install into a temp root holding a copy of this host's config.toml (1.x: --edit-config,
    2.x: the drop-in), start that containerd release on the result: its CRI plugin loads, its
    merged config has the spinbox and runc runtimes and still the host's CNI dirs; uninstall
    puts the file back byte for byte."""
    why = missing_prerequisites()
    if not HOST_CONFIG.is_file():
        why.append(f"no {HOST_CONFIG}")
    if why:
        skip_or_fail(why)
    major, minor = install.detect_version(binary)
    root = tmp_path / "root"
    cfg = root / install.CONTAINERD_CONFIG.lstrip("/")
    cfg.parent.mkdir(parents=True)
    shutil.copy2(HOST_CONFIG, cfg)
    original = cfg.read_bytes()
    argv = ["install", "--root", str(root), "--containerd", binary] + (["--edit-config"] if major < 2 else [])
    assert cli_main(argv) == 0, capsys.readouterr()
    capsys.readouterr()

    dropin = root / install.DROPIN.lstrip("/")
    c = MachineConfigContainerd.create(binary=binary, source=cfg, cri=True, namespace="spinbox-install-cfg",
                                       rewrites=((_q(install.DROPIN), _q(str(dropin))),))
    try:
        dump = subprocess.run([binary, "--config", str(c.config_path), "config", "dump"],
                              capture_output=True, text=True, timeout=60, check=True).stdout
        merged = tomllib.loads(dump)
        cri_id = install.CRI_V2 if major < 2 else install.CRI_V3
        cri = merged["plugins"][cri_id]
        runtimes = cri["containerd"]["runtimes"]
        assert runtimes["spinbox"]["runtime_type"] == "io.containerd.spinbox.v1"
        assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"
        host_cni = tomllib.loads(HOST_CONFIG.read_text())["plugins"][install.CRI_V2]["cni"]
        bin_dirs = cri["cni"].get("bin_dirs") or [cri["cni"]["bin_dir"]]
        assert host_cni["bin_dir"] in bin_dirs
        # the CRI plugin (and, on 2.x, its runtime half) loaded: a missing default runtime or a
        # broken table would leave it in error
        plugins = c.ctr("plugins", "ls").stdout.decode().splitlines()
        cri_rows = [ln.split() for ln in plugins if " cri " in f" {ln} " or "io.containerd.cri.v1" in ln]
        assert cri_rows and all(row[-1] == "ok" for row in cri_rows), "\n".join(plugins)
        print(f"containerd {major}.{minor} ({binary}): CRI plugin ok, runtimes {sorted(runtimes)}")
    finally:
        c.cleanup()
    assert cli_main(["uninstall", "--root", str(root)]) == 0
    assert cfg.read_bytes() == original
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == \
        ["etc", "etc/containerd", "etc/containerd/config.toml"]


def _q(s: str) -> str:
    return json.dumps(s)
