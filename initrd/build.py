#!/usr/bin/env python3
"""Build the spinbox guest image from Debian packages and install it into the share dir.

    python initrd/build.py [--share-dir DIR] [--cache-dir DIR] [--layout erofs|initramfs] [--force]

Cached by a content hash of every input (Debian package versions and .deb hashes, our Python
sources, the venv packages copied, this build code): an unchanged second run only checks.
Writes <share-dir>/image.json (format in initrd/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from imagebuild import debs, pack, tree  # noqa: E402

from spinbox.api import contract  # noqa: E402

MANIFEST_VERSION = 1
DEFAULT_LAYOUT = "erofs"  # decided by measurement, see README.md
DEFAULT_EROFS_COMPRESSION = "none"  # decided by measurement, see README.md
ROOT_SERIAL = "spinbox-root"
# What the selftest / launcher must be able to import from the finished tree.
MUST_IMPORT = ["asyncio", "json", "socket", "struct", "subprocess", "signal", "ctypes", "hashlib",
               "ttrpc", "google.protobuf", "google.protobuf.descriptor_pb2", "google.rpc.status_pb2",
               "spinbox.vminitd"]


def _site_packages() -> Path:
    venv = Path(os.environ.get("SPINBOX_VENV", REPO / ".venv"))
    found = sorted(venv.glob("lib/python3.11/site-packages"))
    if not found:
        raise SystemExit(f"initrd: no python3.11 site-packages in {venv} (run scripts/setup)")
    return found[0]


def _hash_tree(h: "hashlib._Hash", base: Path, skip: set[str]) -> None:
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if skip & set(rel.parts) or not path.is_file():
            continue
        h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")


def input_hash(deb_list: list[debs.Deb], site_packages: Path, layout: str, compression: str) -> str:
    h = hashlib.sha256()
    h.update(f"layout={layout} erofs={compression} manifest={MANIFEST_VERSION} "
             f"version={contract.version()}\n".encode())
    for deb in sorted(deb_list, key=lambda d: d.package):
        h.update(f"{deb.package}={deb.version} {deb.sha256()}\n".encode())
    skip = {"__pycache__", "testdata", "README.md"}
    _hash_tree(h, HERE, skip | {"measure.py"})
    for folder in ("vminitd", "api", "ttrpc"):
        _hash_tree(h, REPO / folder, skip | {"proto", "tests"})
    for rel in tree.VENV_PACKAGES:
        _hash_tree(h, site_packages / rel, skip)
    return h.hexdigest()


def assemble(work: Path, deb_list: list[debs.Deb], site_packages: Path) -> Path:
    full, root, pkgroot = work / "full", work / "root", work / "root" / tree.GUEST_PKG_DIR
    t0 = time.monotonic()
    debs.extract(deb_list, full)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    tree.stage_python_packages(REPO, site_packages, pkgroot)
    # the guest has no distribution metadata: the version it reports comes from this file
    (pkgroot / "spinbox" / "api" / contract.VERSION_FILE).write_text(contract.version() + "\n")
    found = tree.select_stdlib(full, pkgroot)
    tree.prune_api(pkgroot, found)
    copied = tree.copy_stdlib(full, root, found)
    tree.install_busybox(full, root)
    libs = tree.copy_elf_closure(full, root, [
        "usr/bin/python3.11", "usr/sbin/runc", "usr/bin/crun"])
    os.symlink("python3.11", root / "usr/bin/python3")
    (root / "lib64").mkdir(exist_ok=True)
    os.symlink("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", root / "lib64/ld-linux-x86-64.so.2")
    tree.install_guest_files(HERE / "guest", root)
    tree.compile_bytecode(full, root)
    tree.check_imports(root, MUST_IMPORT + tree.STDLIB_BASELINE)
    tree.check_imports(root, tree.vminitd_modules(root / tree.GUEST_PKG_DIR), strict=False)
    print(f"initrd: tree assembled in {time.monotonic() - t0:.1f}s: {len(copied)} stdlib modules, "
          f"libs {', '.join(libs)}")
    return root


# The stage-1 initramfs of the erofs layout: busybox and the init script only.
STAGE1_PATHS = ["init", "bin", "bin/busybox", "bin/sh", "sbin", "sbin/switch_root", "dev",
                "proc", "sys", "newroot", "usr", "usr/bin"]


def build_images(root: Path, out: Path, layout: str, compression: str, short: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if layout == "initramfs":
        initrd = out / f"spinbox-initrd-{short}.cpio"
        pack.write_cpio(root, initrd)
        return {"initrd": initrd.name, "root_disk": None, "root_disk_format": None,
                "cmdline": "rdinit=/init"}
    # Stage 1 only needs busybox applets that /init uses (all links to /bin/busybox).
    stage1 = [p for p in STAGE1_PATHS if (root / p).exists() or (root / p).is_symlink()]
    stage1 += [str(p.relative_to(root)) for p in (root / "bin").iterdir()]
    stage1 += [str(p.relative_to(root)) for p in (root / "sbin").iterdir()
               if p.is_symlink() and os.readlink(p) == "/bin/busybox"]
    stage1 += [str(p.relative_to(root)) for p in (root / "usr/bin").iterdir()
               if p.is_symlink() and os.readlink(p) == "/bin/busybox"]
    initrd = out / f"spinbox-initrd-{short}.cpio"
    pack.write_cpio(root, initrd, sorted(set(stage1)))
    disk = out / f"spinbox-root-{short}.erofs"
    pack.write_erofs(root, disk, None if compression == "none" else compression)
    return {"initrd": initrd.name, "root_disk": disk.name, "root_disk_format": "erofs",
            "cmdline": f"rdinit=/init spinbox.root=serial:{ROOT_SERIAL}"}


def install(share: Path, staged: Path, manifest: dict) -> None:
    share.mkdir(parents=True, exist_ok=True)
    old = share / "image.json"
    previous = json.loads(old.read_text()) if old.exists() else {}
    for key in ("initrd", "root_disk"):
        if manifest.get(key):
            shutil.copy2(staged / manifest[key], share / (manifest[key] + ".tmp"))
            os.replace(share / (manifest[key] + ".tmp"), share / manifest[key])
    tmp = share / "image.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, old)  # atomic: readers see the old or the new image, never half of one
    for key in ("initrd", "root_disk"):
        stale = previous.get(key)
        if stale and stale not in (manifest.get("initrd"), manifest.get("root_disk")):
            (share / stale).unlink(missing_ok=True)


def up_to_date(share: Path, digest: str) -> bool:
    try:
        manifest = json.loads((share / "image.json").read_text())
    except (OSError, ValueError):
        return False
    files = [manifest.get("initrd"), manifest.get("root_disk")]
    return manifest.get("hash") == digest and all((share / f).exists() for f in files if f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--share-dir", type=Path,
                    default=Path(os.environ.get("SPINBOX_SHARE_DIR", "/usr/share/spinbox")))
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("SPINBOX_CACHE_DIR", "/var/cache/spinbox")) / "initrd")
    ap.add_argument("--layout", choices=["erofs", "initramfs"], default=DEFAULT_LAYOUT)
    ap.add_argument("--erofs-compression", choices=["none", "lz4", "lz4hc"],
                    default=DEFAULT_EROFS_COMPRESSION)
    ap.add_argument("--force", action="store_true", help="rebuild even if the hash matches")
    ap.add_argument("--keep-tree", action="store_true", help="keep <cache>/work/root for chroot tests")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    site_packages = _site_packages()
    versions = debs.candidate_versions(debs.PACKAGES)
    deb_list = debs.fetch(versions, args.cache_dir / "debs")
    digest = input_hash(deb_list, site_packages, args.layout, args.erofs_compression)
    if not args.force and up_to_date(args.share_dir, digest):
        print(f"initrd: up to date ({digest[:12]}) in {args.share_dir} [{time.monotonic() - t0:.1f}s]")
        return 0

    work = args.cache_dir / "work"
    root = assemble(work, deb_list, site_packages)
    staged = work / "out"
    if staged.exists():
        shutil.rmtree(staged)
    images = build_images(root, staged, args.layout, args.erofs_compression, digest[:12])
    manifest = {
        "version": MANIFEST_VERSION,
        "hash": digest,
        **images,
        "python": versions["python3.11-minimal"],
        "runc": versions["runc"],
        "crun": versions["crun"],
        "busybox": versions["busybox-static"],
    }
    install(args.share_dir, staged, manifest)
    if not args.keep_tree:
        shutil.rmtree(work / "full")
    sizes = ", ".join(f"{manifest[k]} {(args.share_dir / manifest[k]).stat().st_size / 2**20:.1f} MiB"
                      for k in ("initrd", "root_disk") if manifest[k])
    print(f"initrd: built {args.layout} image {digest[:12]} ({sizes}) into {args.share_dir} "
          f"[{time.monotonic() - t0:.1f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
