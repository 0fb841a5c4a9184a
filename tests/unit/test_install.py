"""spinbox install / uninstall in temp roots: what is written for each containerd config shape,
that an existing config.toml is never clobbered, that uninstall puts every byte back, that a
second install changes nothing, and that bad input stops before anything is written."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from spinbox.shim import cli, install

# the CRI section this machine's /etc/containerd/config.toml has (Debian's containerd 1.6)
CONFIG_16 = b"""version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""

CONFIG_2X = b"""version = 3
# keep this comment

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ['/usr/lib/cni']
"""


@pytest.fixture
def shim(tmp_path) -> Path:
    """A stand-in for the venv's shim: prints its argv and the PYTHON* variables it got."""
    p = tmp_path / "venv" / "bin" / install.SHIM_NAME
    p.parent.mkdir(parents=True)
    p.write_text('#!/bin/sh\necho "args:$*"\necho "pythonpath:${PYTHONPATH-unset}"\n'
                 'echo "nousersite:${PYTHONNOUSERSITE-unset}"\n')
    p.chmod(0o755)
    return p


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def snapshot(root: Path) -> dict[str, tuple[str, bytes | None, int]]:
    """Every entry below root: kind, bytes (files), mode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            rel = str(p.relative_to(root))
            out[rel] = ("dir", None, st.st_mode) if stat.S_ISDIR(st.st_mode) else \
                       ("file", p.read_bytes(), st.st_mode)
    return out


def put(root: Path, path: str, data: bytes) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def run(root: Path, shim: Path, *extra: str, version: str = "1.6", capsys=None) -> tuple[int, str, str]:
    rc = cli.main(["install", "--root", str(root), "--shim", str(shim),
                   "--containerd-version", version, *extra])
    out, err = capsys.readouterr() if capsys else ("", "")
    return rc, out, err


def uninstall(root: Path, capsys) -> tuple[int, str, str]:
    rc = cli.main(["uninstall", "--root", str(root)])
    out, err = capsys.readouterr()
    return rc, out, err


def toml_at(root: Path, path: str) -> dict:
    return tomllib.loads((root / path.lstrip("/")).read_text())


# ---------------------------------------------------------------------------------------------

def test_fresh_root_gets_launcher_config_json_and_a_containerd_config(root, shim, capsys):
    before = snapshot(root)
    rc, out, _ = run(root, shim, capsys=capsys)
    assert rc == 0
    launcher = root / install.LAUNCHER.lstrip("/")
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o755
    # the launcher runs the shim with containerd's argv, without containerd's PYTHON* variables
    r = subprocess.run([str(launcher), "-namespace", "k8s.io", "start"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "/tmp/evil"}, check=True)
    assert r.stdout.splitlines() == ["args:-namespace k8s.io start", "pythonpath:unset", "nousersite:1"]
    cfg = json.loads((root / "etc/spinbox/config.json").read_text())
    assert cfg == {"paths": {"share_dir": install.DEFAULT_SHARE_DIR}}
    # no config.toml before: one is written, with runc kept as the default handler
    runtimes = toml_at(root, install.CONTAINERD_CONFIG)["plugins"][install.CRI_V2]["containerd"]["runtimes"]
    assert runtimes["spinbox"]["runtime_type"] == "io.containerd.spinbox.v1"
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert "needs no containerd config entry" in out and "Restart containerd" in out
    assert "warning: no guest image in" in out        # the temp root has none
    manifest = root / install.MANIFEST.lstrip("/")
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600

    rc, out, err = uninstall(root, capsys)
    assert rc == 0, err
    assert snapshot(root) == before


def test_a_16_config_is_refused_and_the_snippet_printed(root, shim, capsys):
    put(root, install.CONTAINERD_CONFIG, CONFIG_16)
    rc, out, _ = run(root, shim, capsys=capsys)
    assert rc == 0
    assert (root / "etc/containerd/config.toml").read_bytes() == CONFIG_16
    assert not (root / "etc/containerd/conf.d").exists()
    assert "NOT changed" in out and "--edit-config" in out
    snippet = out[out.index("# CRI runtime handler"):out.index("\n\nKubernetes")]
    # the snippet, appended by the user, gives a config with both runtimes and the CNI dirs kept
    merged = tomllib.loads(CONFIG_16.decode() + "\n" + snippet)
    cri = merged["plugins"][install.CRI_V2]
    assert set(cri["containerd"]["runtimes"]) == {"runc", "spinbox"}
    assert cri["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": "/etc/cni/net.d"}
    # the launcher and config.json are installed all the same
    assert (root / install.LAUNCHER.lstrip("/")).exists()


def test_edit_config_on_16_appends_in_place_and_uninstall_restores_the_bytes(root, shim, capsys):
    p = put(root, install.CONTAINERD_CONFIG, CONFIG_16)
    p.chmod(0o640)
    rc, out, err = run(root, shim, "--edit-config", capsys=capsys)
    assert rc == 0, err
    after = p.read_bytes()
    assert after.startswith(CONFIG_16)
    cri = tomllib.loads(after.decode())["plugins"][install.CRI_V2]
    assert cri["cni"]["bin_dir"] == "/usr/lib/cni"
    assert cri["containerd"]["runtimes"]["spinbox"]["runtime_type"] == "io.containerd.spinbox.v1"
    assert stat.S_IMODE(p.stat().st_mode) == 0o640      # an edited file keeps its mode
    manifest = json.loads((root / install.MANIFEST.lstrip("/")).read_text())
    assert install.CONTAINERD_CONFIG in manifest["edits"]

    assert uninstall(root, capsys)[0] == 0
    assert p.read_bytes() == CONFIG_16
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert sorted(str(x.relative_to(root)) for x in root.rglob("*")) == \
        ["etc", "etc/containerd", "etc/containerd/config.toml"]


def test_a_16_config_that_names_runc_gets_only_the_spinbox_table(root, shim, capsys):
    cfg = CONFIG_16 + b'\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n    SystemdCgroup = true\n'
    p = put(root, install.CONTAINERD_CONFIG, cfg)
    assert run(root, shim, "--edit-config", capsys=capsys)[0] == 0
    added = p.read_bytes()[len(cfg):].decode()
    assert "runtimes.runc]" not in added and "runtimes.spinbox]" in added
    runc = tomllib.loads(p.read_text())["plugins"][install.CRI_V2]["containerd"]["runtimes"]["runc"]
    assert runc["options"] == {"SystemdCgroup": True}


def test_2x_config_gets_a_dropin_and_one_imports_line(root, shim, capsys):
    p = put(root, install.CONTAINERD_CONFIG, CONFIG_2X)
    rc, out, err = run(root, shim, version="2.1", capsys=capsys)
    assert rc == 0, err
    text = p.read_text()
    assert text.splitlines()[0] == "version = 3"
    assert text.splitlines()[1].startswith('imports = ["/etc/containerd/conf.d/spinbox.toml"]')
    parsed = tomllib.loads(text)
    assert parsed["imports"] == [install.DROPIN]
    assert {k: v for k, v in parsed.items() if k != "imports"} == tomllib.loads(CONFIG_2X.decode())
    dropin = toml_at(root, install.DROPIN)
    assert dropin["version"] == 3           # never higher than the root config's
    rt = dropin["plugins"][install.CRI_V3]["containerd"]["runtimes"]
    assert rt == {"spinbox": {"runtime_type": "io.containerd.spinbox.v1", "sandboxer": "podsandbox",
                              "pod_annotations": ["spinbox.io/*"]}}
    assert "Restart containerd" in out

    assert uninstall(root, capsys)[0] == 0
    assert p.read_bytes() == CONFIG_2X
    assert not (root / "etc/containerd/conf.d").exists()


def test_2x_with_a_version_2_config_gets_a_version_2_dropin(root, shim, capsys):
    put(root, install.CONTAINERD_CONFIG, CONFIG_16)
    assert run(root, shim, version="2.0", capsys=capsys)[0] == 0
    dropin = toml_at(root, install.DROPIN)
    assert dropin["version"] == 2
    assert set(dropin["plugins"][install.CRI_V2]["containerd"]["runtimes"]) == {"runc", "spinbox"}


def test_2x_imports_already_covering_the_dropin_leave_config_toml_alone(root, shim, capsys):
    cfg = b'version = 3\nimports = ["conf.d/*.toml"]\n'
    p = put(root, install.CONTAINERD_CONFIG, cfg)
    assert run(root, shim, version="2.1", capsys=capsys)[0] == 0
    assert p.read_bytes() == cfg
    assert (root / install.DROPIN.lstrip("/")).exists()


def test_2x_single_line_imports_get_the_dropin_appended(root, shim, capsys):
    cfg = b'version = 3\nimports = ["/etc/containerd/other.toml"]  # theirs\n[plugins.x]\n  a = 1\n'
    p = put(root, install.CONTAINERD_CONFIG, cfg)
    assert run(root, shim, version="2.1", capsys=capsys)[0] == 0
    assert tomllib.loads(p.read_text())["imports"] == ["/etc/containerd/other.toml", install.DROPIN]
    assert "# theirs" in p.read_text()
    assert uninstall(root, capsys)[0] == 0
    assert p.read_bytes() == cfg


def test_2x_multiline_imports_are_refused_before_anything_is_written(root, shim, capsys):
    put(root, install.CONTAINERD_CONFIG, b'version = 3\nimports = [\n  "/a.toml",\n]\n')
    before = snapshot(root)
    rc, _, err = run(root, shim, version="2.1", capsys=capsys)
    assert rc == 1
    assert "config.toml" in err and "several lines" in err
    assert snapshot(root) == before


def test_a_second_install_changes_nothing(root, shim, capsys):
    put(root, install.CONTAINERD_CONFIG, CONFIG_2X)
    assert run(root, shim, version="2.1", capsys=capsys)[0] == 0
    first = snapshot(root)
    rc, out, _ = run(root, shim, version="2.1", capsys=capsys)
    assert rc == 0
    assert out.splitlines()[0] == "nothing to change"
    assert snapshot(root) == first
    # and on 1.6 with --edit-config
    root2 = root.parent / "root2"
    root2.mkdir()
    put(root2, install.CONTAINERD_CONFIG, CONFIG_16)
    assert run(root2, shim, "--edit-config", capsys=capsys)[0] == 0
    first = snapshot(root2)
    rc, out, _ = run(root2, shim, "--edit-config", capsys=capsys)
    assert rc == 0 and out.splitlines()[0] == "nothing to change"
    assert snapshot(root2) == first


def test_dry_run_lists_the_changes_and_makes_none(root, shim, capsys):
    put(root, install.CONTAINERD_CONFIG, CONFIG_2X)
    before = snapshot(root)
    rc, out, _ = run(root, shim, "--dry-run", version="2.1", capsys=capsys)
    assert rc == 0
    assert f"would write {install.LAUNCHER}" in out and f"would edit {install.CONTAINERD_CONFIG}" in out
    assert snapshot(root) == before
    assert run(root, shim, version="2.1", capsys=capsys)[0] == 0
    installed = snapshot(root)
    assert cli.main(["uninstall", "--root", str(root), "--dry-run"]) == 0
    assert f"would remove {install.LAUNCHER}" in capsys.readouterr().out
    assert snapshot(root) == installed


def test_an_existing_config_json_is_never_overwritten_nor_an_edited_one_removed(root, shim, capsys):
    mine = b'{"runtime": {"accel": "tcg"}}\n'
    p = put(root, install.SPINBOX_CONFIG, mine)
    rc, out, _ = run(root, shim, capsys=capsys)
    assert rc == 0 and p.read_bytes() == mine and "kept as it is" in out
    assert uninstall(root, capsys)[0] == 0
    assert p.read_bytes() == mine                    # not ours: uninstall leaves it

    root2 = root.parent / "root2"
    root2.mkdir()
    assert run(root2, shim, capsys=capsys)[0] == 0
    cfg = root2 / install.SPINBOX_CONFIG.lstrip("/")
    cfg.write_text('{"runtime": {"accel": "kvm"}}\n')  # edited after install
    rc, out, _ = uninstall(root2, capsys)
    assert rc == 0 and "changed since install: kept" in out
    assert cfg.read_text() == '{"runtime": {"accel": "kvm"}}\n'


def test_a_config_toml_edited_after_install_loses_only_our_line(root, shim, capsys):
    p = put(root, install.CONTAINERD_CONFIG, CONFIG_2X)
    assert run(root, shim, version="2.1", capsys=capsys)[0] == 0
    p.write_bytes(p.read_bytes() + b"\n[plugins.'io.containerd.gc.v1.scheduler']\n  pause_threshold = 0.03\n")
    rc, out, _ = uninstall(root, capsys)
    assert rc == 0 and "only install's lines were removed" in out
    assert p.read_bytes() == CONFIG_2X + b"\n[plugins.'io.containerd.gc.v1.scheduler']\n  pause_threshold = 0.03\n"


def test_someone_elses_shim_binary_is_not_replaced(root, shim, capsys):
    put(root, install.LAUNCHER, b"#!/bin/sh\necho another build\n")
    before = snapshot(root)
    rc, _, err = run(root, shim, capsys=capsys)
    assert rc == 1 and "was not written by spinbox install" in err
    assert snapshot(root) == before


def test_bad_root_and_bad_input_are_named(root, shim, tmp_path, capsys):
    rc, _, err = run(tmp_path / "nope", shim, capsys=capsys)
    assert rc == 1 and "--root" in err and "no such directory" in err
    f = tmp_path / "afile"
    f.write_text("")
    rc, _, err = run(f, shim, capsys=capsys)
    assert rc == 1 and "not a directory" in err
    rc, _, err = run(root, tmp_path / "no-shim", capsys=capsys)
    assert rc == 1 and "not an absolute path to an executable file" in err
    rc, _, err = run(root, shim, version="latest", capsys=capsys)
    assert rc == 1 and "cannot read a containerd version" in err
    put(root, install.CONTAINERD_CONFIG, b"version = 2\n[plugins\n")
    rc, _, err = run(root, shim, capsys=capsys)
    assert rc == 1 and "config.toml: not valid TOML" in err
    put(root, install.CONTAINERD_CONFIG, b'[plugins.cri]\n  x = 1\n')   # version 1
    rc, _, err = run(root, shim, capsys=capsys)
    assert rc == 1 and "config version 1" in err
    assert not (root / "usr").exists()          # nothing was written by any of these


def test_a_manifest_naming_other_files_is_refused(root, capsys):
    victim = put(root, "/etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    put(root, install.MANIFEST, json.dumps({
        "version": 1, "edits": {}, "dirs": [],
        "files": {"/etc/passwd": {"sha256": install.sha256(victim.read_bytes())}}}).encode())
    rc, _, err = uninstall(root, capsys)
    assert rc == 1 and "'/etc/passwd' is not one spinbox install writes" in err
    assert victim.exists()


def test_a_crash_midway_leaves_a_manifest_that_uninstall_cleans_up(root, shim, monkeypatch, capsys):
    put(root, install.CONTAINERD_CONFIG, CONFIG_2X)
    before = snapshot(root)
    host = install.Host(root)
    plan = install.plan_install(host, install.InstallOptions(shim=str(shim), containerd_version=(2, 1)))
    real = install._write_atomic
    calls = []

    def crash_on_third(path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:                   # manifest, launcher, then "power loss"
            raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(install, "_write_atomic", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        install.apply(plan)
    monkeypatch.setattr(install, "_write_atomic", real)
    assert (root / install.LAUNCHER.lstrip("/")).exists()
    assert uninstall(root, capsys)[0] == 0
    assert snapshot(root) == before


def test_cni_network_only_into_an_empty_conf_dir(root, shim, capsys):
    assert run(root, shim, "--cni", capsys=capsys)[0] == 0
    conflist = root / install.CNI_CONFLIST.lstrip("/")
    assert conflist.read_bytes() == install.CNI_EXAMPLE.read_bytes()
    assert json.loads(conflist.read_text())["name"] == "spinbox"
    assert uninstall(root, capsys)[0] == 0
    assert not (root / "etc/cni").exists()

    put(root, "/etc/cni/net.d/05-theirs.conflist", b"{}")
    rc, out, _ = run(root, shim, "--cni", capsys=capsys)
    assert rc == 0 and "already holds 05-theirs.conflist" in out
    assert not conflist.exists()


@pytest.mark.parametrize("text, want", [
    ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n", (1, 6)),
    ("containerd github.com/containerd/containerd v1.7.24 61f9fd88\n", (1, 7)),
    ("containerd github.com/containerd/containerd/v2 v2.1.9 abc\n", (2, 1)),
    ("containerd github.com/containerd/containerd/v2 2.1.9+unknown \n", (2, 1)),
    ("2.0", (2, 0)),
])
def test_parse_version(text, want):
    assert install.parse_version(text) == want


def test_add_import_places_the_line_at_top_level():
    text, inserted = install.add_import("# head\n[plugins.a]\n  version = 9\n", install.DROPIN)
    assert text.startswith("imports = ")           # not after the table's own `version` key
    assert tomllib.loads(text)["plugins"]["a"] == {"version": 9}
    assert text.replace(inserted, "", 1) == "# head\n[plugins.a]\n  version = 9\n"


def test_restart_hint_follows_the_init_system(root, shim, capsys):
    (root / "run/systemd/system").mkdir(parents=True)
    rc, out, _ = run(root, shim, capsys=capsys)
    assert rc == 0 and "systemctl restart containerd" in out
    root2 = root.parent / "root2"
    root2.mkdir()
    rc, out, _ = run(root2, shim, capsys=capsys)
    assert rc == 0 and "no systemd" in out and "systemctl" not in out


def test_uninstall_without_a_manifest_and_with_a_broken_one(root, capsys):
    rc, out, _ = uninstall(root, capsys)
    assert rc == 0 and "nothing was installed here" in out
    put(root, install.MANIFEST, json.dumps({
        "version": 1, "files": {}, "dirs": [],
        "edits": {install.CONTAINERD_CONFIG: {"before_b64": "not base64!", "after_sha256": "x",
                                              "inserted": "x"}}}).encode())
    rc, _, err = uninstall(root, capsys)
    assert rc == 1 and "before_b64 is not base64" in err
    put(root, install.MANIFEST, b"{")
    rc, _, err = uninstall(root, capsys)
    assert rc == 1 and "not valid JSON" in err


def test_a_second_install_at_the_same_time_is_refused(root, shim, capsys):
    import fcntl

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # as a running install holds it
        rc, _, err = run(root, shim, capsys=capsys)
        assert rc == 1 and "another spinbox install or uninstall is running" in err
        assert not any(root.iterdir())
    finally:
        os.close(fd)
    assert run(root, shim, capsys=capsys)[0] == 0


def test_a_config_whose_runtimes_are_an_inline_table_is_refused_with_the_lines(root, shim, capsys):
    cfg = b'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n'
    put(root, install.CONTAINERD_CONFIG, cfg)
    before = snapshot(root)
    rc, _, err = run(root, shim, "--edit-config", capsys=capsys)
    assert rc == 1 and "would not be valid TOML" in err and "runtimes.spinbox]" in err
    assert snapshot(root) == before


def test_the_printed_snippet_does_not_claim_uninstall_removes_it(root, shim, capsys):
    put(root, install.CONTAINERD_CONFIG, CONFIG_16)
    out = run(root, shim, capsys=capsys)[1]
    assert "spinbox uninstall removes it" not in out
