"""Image writers: a deterministic newc cpio (initramfs) and an erofs root disk (mkfs.erofs)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def write_cpio(root: Path, out: Path, only: list[str] | None = None) -> None:
    """newc archive of root (or of the listed relative paths), owner root, mtime 0, sorted."""
    if only is None:
        entries = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    else:
        entries = sorted(only)
    ino = 1
    with out.open("wb") as f:
        def emit(name: str, mode: int, data: bytes, nlink: int = 1, rdev: tuple = (0, 0)) -> None:
            nonlocal ino
            raw = name.encode() + b"\0"
            hdr = "070701" + "".join(f"{v:08x}" for v in (
                ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0))
            f.write(hdr.encode() + raw + _pad4(110 + len(raw)))
            f.write(data + _pad4(len(data)))
            ino += 1

        for rel in entries:
            path = root / rel
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                emit(rel, st.st_mode, os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                emit(rel, st.st_mode, b"", 2)
            elif stat.S_ISREG(st.st_mode):
                emit(rel, st.st_mode, path.read_bytes())
        # The kernel opens /dev/console for init before init can mount devtmpfs.
        emit("dev/console", stat.S_IFCHR | 0o600, b"", rdev=(5, 1))
        emit("TRAILER!!!", 0, b"")


def write_erofs(root: Path, out: Path, compression: str | None) -> None:
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        raise SystemExit("initrd: mkfs.erofs not found: apt-get install erofs-utils")
    out.unlink(missing_ok=True)
    cmd = [mkfs, "-T0", "--all-root", "-U", "00000000-0000-0000-0000-000000000000"]
    if compression:
        cmd.append(f"-z{compression}")
    subprocess.run(cmd + [str(out), str(root)], check=True, stdout=subprocess.DEVNULL)
