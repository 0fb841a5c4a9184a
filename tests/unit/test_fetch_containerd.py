"""scripts/fetch-containerd's choice of Debian mirror: the apt source that serves this machine's
own release, from one-line and deb822 files, never -security or a third-party repository."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch-containerd"


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    pytest.skip("no VERSION_CODENAME in /etc/os-release")


def mirror(etc: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--mirror"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SPINBOX_APT_ETC": str(etc)})


def test_deb822_skips_third_party_and_security_stanzas(tmp_path):
    rel = _codename()
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "0-vendor.sources").write_text(
        "Types: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\nComponents: main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        f"Types: deb\nURIs: http://security.example/debian-security\nSuites: {rel}-security\n"
        "Components: main\n\n"
        f"Types: deb deb-src\n# a comment inside the stanza\nURIs: http://mirror.example/debian/\n"
        f"Suites: {rel} {rel}-updates\nComponents: main\n")
    r = mirror(tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, "http://mirror.example/debian"), r.stderr


def test_one_line_format_with_options(tmp_path):
    rel = _codename()
    (tmp_path / "sources.list").write_text(
        f"# deb http://commented.example/debian {rel} main\n"
        f"deb-src http://src.example/debian {rel} main\n"
        f"deb http://security.example/debian-security {rel}-security main\n"
        f"deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://one.example/debian {rel} main\n")
    r = mirror(tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, "http://one.example/debian"), r.stderr


def test_no_source_of_this_release_is_a_named_error(tmp_path):
    (tmp_path / "sources.list").write_text("deb http://other.example/debian some-other-release main\n")
    r = mirror(tmp_path)
    assert r.returncode != 0 and r.stdout == ""
    assert "no Debian mirror for this release" in r.stderr and str(tmp_path) in r.stderr


def test_no_sources_at_all_names_the_dir(tmp_path):
    r = mirror(tmp_path)
    assert r.returncode != 0
    assert f"no apt sources in {tmp_path}/sources.list" in r.stderr
