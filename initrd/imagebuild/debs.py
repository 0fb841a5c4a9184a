"""Debian packages: resolve candidate versions, download them into a cache, extract them.

Nothing is installed on the host: `apt-get download` fetches the .deb files and `dpkg-deb -x`
unpacks them into a scratch tree.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Everything the guest tree may take files from. Libraries are listed explicitly; the ELF
# closure check in tree.py fails the build if a NEEDED library is missing from this set.
PACKAGES = [
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libffi8",  # _ctypes
    "libstdc++6",  # protobuf's upb extension
    "libgcc-s1",
    "runc",
    "libseccomp2",
    "crun",
    "libyajl2",
    "libcap2",
    "libsystemd0",  # crun -> libsystemd -> the libraries below
    "libgcrypt20",
    "libgpg-error0",
    "liblzma5",
    "libzstd1",
    "liblz4-1",
]


@dataclass(frozen=True)
class Deb:
    package: str
    version: str
    path: Path

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def candidate_versions(packages: list[str]) -> dict[str, str]:
    """The version apt would download for each package (one apt-cache call)."""
    out = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *packages],
        check=True, capture_output=True, text=True,
    ).stdout
    versions: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("Package: "):
            current = line.split(": ", 1)[1].strip()
        elif line.startswith("Version: ") and current and current not in versions:
            versions[current] = line.split(": ", 1)[1].strip()
    missing = [p for p in packages if p not in versions]
    if missing:
        raise SystemExit(f"initrd: apt has no candidate for {missing} (run apt-get update?)")
    return versions


def _deb_filename(package: str, version: str) -> str:
    # apt-get download names files <pkg>_<version with ':' as %3a>_<arch>.deb
    return f"{package}_{version.replace(':', '%3a')}_amd64.deb"


def fetch(versions: dict[str, str], cache: Path) -> list[Deb]:
    """Download missing .debs into `cache` (already present files are reused)."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = {p: cache / _deb_filename(p, v) for p, v in versions.items()}
    missing = [f"{p}={versions[p]}" for p, f in wanted.items() if not f.exists()]
    if missing:
        # _apt cannot write into a root-owned cache: that only costs a warning.
        subprocess.run(["apt-get", "download", "-q", *missing], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
    debs = []
    for package, path in wanted.items():
        if not path.exists():
            raise SystemExit(f"initrd: apt-get download did not produce {path}")
        debs.append(Deb(package, versions[package], path))
    return debs


def extract(debs: list[Deb], dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb.path), str(dest)], check=True)
