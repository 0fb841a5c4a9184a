"""Assemble the guest root tree from extracted Debian packages and the project's Python code.

Layout of the guest (paths as Debian ships them, nothing else):
  /bin/busybox + applet links, /usr/bin/python3(.11), /usr/sbin/runc, /usr/bin/crun,
  /lib/x86_64-linux-gnu/* (only the ELF NEEDED closure), /usr/lib/python3.11 (stdlib subset,
  sourceless unchecked-hash .pyc), /usr/lib/spinbox (spinbox.vminitd, spinbox.api, ttrpc, google.*),
  /init (stage 1), /sbin/spinbox-stage2, /sbin/vminitd (Python launcher run as PID 1).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import elf

PYVER = "3.11"
LIBDIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
GUEST_PKG_DIR = "usr/lib/spinbox"  # on the launcher's sys.path, first

# Imported by vminitd's job even if no module names them yet (PID 1 duties, runc driver, stdio).
STDLIB_BASELINE = [
    "asyncio", "json", "socket", "struct", "subprocess", "signal", "ctypes", "hashlib",
    "logging", "os", "selectors", "shlex", "shutil", "tempfile", "errno", "fcntl", "termios",
    "pty", "tty", "resource", "ipaddress", "base64", "dataclasses", "enum", "typing",
    "contextlib", "functools", "traceback", "argparse", "pathlib", "stat", "time", "datetime",
    "random", "weakref", "collections", "itertools", "heapq", "queue", "threading",
    "concurrent.futures", "io", "zlib", "textwrap", "string", "re", "copy", "uuid", "mmap",
    "encodings.idna", "encodings.ascii", "encodings.latin_1", "encodings.utf_8",
    "encodings.utf_16", "encodings.utf_32", "encodings.raw_unicode_escape",
    "encodings.unicode_escape", "encodings.aliases", "importlib.util", "importlib.machinery",
]

# Never shipped: no use in the guest, or they drag in big libraries (libssl, sqlite, ncurses).
STDLIB_EXCLUDE = [
    "tkinter", "_tkinter", "test", "idlelib", "lib2to3", "pydoc", "pydoc_data", "distutils",
    "ensurepip", "venv", "ssl", "_ssl", "_hashlib", "sqlite3", "_sqlite3", "curses", "_curses",
    "readline", "doctest", "pdb", "unittest", "multiprocessing", "xml", "xmlrpc", "email",
    "http", "urllib.request", "urllib.response", "urllib.robotparser", "urllib.error", "bz2", "_bz2", "lzma", "_lzma", "dbm", "_dbm", "turtle", "turtledemo",
    "_ctypes_test", "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
    "ctypes.test", "sqlite3.test", "asyncio.windows_events", "asyncio.windows_utils",
    "_winapi", "_overlapped", "msvcrt", "winreg", "nt", "_scproxy", "cProfile", "profile",
    "pstats", "trace", "_osx_support", "_aix_support", "_pyio", "pickletools", "webbrowser",
    "mailbox", "smtplib", "imaplib", "poplib", "ftplib", "nntplib", "telnetlib", "cgi",
    "wsgiref", "zoneinfo", "_zoneinfo", "tomllib", "plistlib", "netrc", "getpass", "pyexpat",
    "decimal", "_decimal", "_pydecimal", "statistics", "fractions", "_uuid", "_crypt", "crypt",
    "nis", "spwd", "ossaudiodev", "audioop", "_lsprof",
]

# Third-party packages copied whole from the venv (minus tests and build-time-only parts).
VENV_PACKAGES = ["google/protobuf", "google/_upb", "google/rpc"]
VENV_SKIP_PARTS = {"testdata", "__pycache__", "compiler"}


def guest_python(root: Path) -> list[str]:
    """argv prefix that runs the guest's Python on the build host, with the guest's own libc."""
    libpath = ":".join(str(root / d) for d in LIBDIRS)
    return [str(root / "lib64/ld-linux-x86-64.so.2"), "--library-path", libpath,
            str(root / f"usr/bin/python{PYVER}")]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        os.symlink(os.readlink(src), dst)
    else:
        shutil.copy2(src, dst)


_TEST_SUFFIXES = ("_test", "_benchmark", "testing_refleaks")


def _copy_py_tree(src: Path, dst: Path, skip_parts: set[str] = frozenset({"__pycache__"})) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if skip_parts & set(rel.parts) or not path.is_file():
            continue
        if path.suffix in (".py", ".so") and not path.stem.endswith(_TEST_SUFFIXES):
            _copy(path, dst / rel)


def stage_python_packages(repo: Path, site_packages: Path, dst: Path) -> None:
    """Our packages + the venv packages vminitd needs, laid out as import paths under dst."""
    (dst / "spinbox").mkdir(parents=True)
    # A regular package in the guest (the host's namespace package costs a path scan per import).
    (dst / "spinbox/__init__.py").write_text('"""spinbox (guest side)."""\n')
    _copy_py_tree(repo / "vminitd", dst / "spinbox/vminitd", {"__pycache__", "tests"})
    _copy_py_tree(repo / "api", dst / "spinbox/api", {"__pycache__", "proto"})
    (dst / "spinbox/api/protogen.py").unlink(missing_ok=True)  # build-time tool (grpc_tools)
    _copy_py_tree(repo / "ttrpc", dst / "ttrpc")
    for rel in VENV_PACKAGES:
        src = site_packages / rel
        if not src.is_dir():
            raise SystemExit(f"initrd: {src} missing: is the project venv installed (scripts/setup)?")
        _copy_py_tree(src, dst / rel, VENV_SKIP_PARTS)
    # On the host `google` is a namespace package spread over several distributions; in the
    # guest all of it lives in one folder, so a regular package works (and modulefinder, which
    # cannot follow namespace packages, sees into it).
    for folder in [dst / "google", *(p for p in (dst / "google").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


_FINDER = r'''
import json, modulefinder, sys
stdlib, dynload, pkgroot, excludes, entry = sys.argv[1:6]
mf = modulefinder.ModuleFinder(path=[pkgroot, stdlib, dynload], excludes=json.loads(excludes))
for name in json.loads(entry):
    try:
        mf.import_hook(name)
    except ImportError as e:
        print(f"warning: {name}: {e}", file=sys.stderr)
out = {name: getattr(m, "__file__", None) for name, m in mf.modules.items()}
json.dump({"modules": out, "missing": sorted(mf.badmodules)}, sys.stdout)
'''


def vminitd_modules(pkgroot: Path) -> list[str]:
    return [n for n in _module_names(pkgroot) if n.startswith("spinbox.vminitd")]


def _module_names(pkgroot: Path) -> list[str]:
    names = []
    for py in sorted(pkgroot.rglob("*.py")):
        parts = list(py.relative_to(pkgroot).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        # spinbox.api is only taken as far as vminitd imports it.
        if parts and not (parts[:2] == ["spinbox", "api"] and len(parts) > 2):
            names.append(".".join(parts))
    return names


def select_stdlib(full: Path, pkgroot: Path) -> dict:
    """Run modulefinder with the guest's own Python over our packages + the baseline."""
    stdlib = full / f"usr/lib/python{PYVER}"
    entry = STDLIB_BASELINE + _module_names(pkgroot)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_FINDER)
    try:
        proc = subprocess.run(
            guest_python(full) + ["-I", "-S", f.name, str(stdlib), str(stdlib / "lib-dynload"),
                                  str(pkgroot), json.dumps(STDLIB_EXCLUDE), json.dumps(entry)],
            capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise SystemExit(f"initrd: modulefinder failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def copy_stdlib(full: Path, root: Path, found: dict) -> list[str]:
    stdlib = full / f"usr/lib/python{PYVER}"
    copied = []
    for name, file in sorted(found["modules"].items()):
        if not file or not file.startswith(str(stdlib) + "/"):
            continue
        rel = Path(file).relative_to(full)
        _copy(Path(file), root / rel)
        copied.append(name)
    # Every encoding by name (codecs are looked up dynamically), minus the CJK ones that need
    # extension modules we do not ship.
    for py in sorted((stdlib / "encodings").glob("*.py")):
        if "import _codecs_" not in py.read_text(errors="replace"):
            _copy(py, root / py.relative_to(full))
    return copied


def prune_api(pkgroot: Path, found: dict) -> None:
    """Drop generated spinbox.api modules that nothing imports (keep package __init__s)."""
    api = pkgroot / "spinbox/api"
    keep = {f for f in found["modules"].values() if f}
    for py in sorted(api.rglob("*.py")):
        if py.name != "__init__.py" and str(py) not in keep:
            py.unlink()


def copy_elf_closure(full: Path, root: Path, binaries: list[str]) -> list[str]:
    """Copy binaries and every shared library they (transitively) need; fail on a missing one."""
    pending = []
    for rel in binaries:
        _copy(full / rel, root / rel)
        pending.append(root / rel)
    for so in root.rglob("*.so"):
        pending.append(so)
    seen: set[str] = set()
    missing = []
    while pending:
        path = pending.pop()
        if path.is_symlink() or not elf.is_elf(path):
            continue
        for soname in elf.needed(path):
            if soname in seen:
                continue
            seen.add(soname)
            for libdir in LIBDIRS:
                src = full / libdir / soname
                if src.exists():
                    dst = root / libdir / soname
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src.resolve(), dst)  # the real file under its soname
                    pending.append(dst)
                    break
            else:
                missing.append(f"{soname} (needed by {path.relative_to(root)})")
    if missing:
        raise SystemExit("initrd: shared libraries not in the package set: " + ", ".join(missing))
    return sorted(seen)


def install_busybox(full: Path, root: Path) -> None:
    _copy(full / "bin/busybox", root / "bin/busybox")
    listing = subprocess.run([str(full / "bin/busybox"), "--list-full"], check=True,
                             capture_output=True, text=True).stdout.split()
    for rel in listing:
        link = root / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)


def install_guest_files(guest: Path, root: Path) -> None:
    for name, mode in (("init", 0o755), ("spinbox-stage2", 0o755), ("vminitd", 0o755)):
        dst = root / ("init" if name == "init" else f"sbin/{name}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(guest / name, dst)
        dst.chmod(mode)
    for d in ("proc", "sys", "dev", "run", "tmp", "var/lib", "var/run", "root", "etc", "newroot",
              "mnt", "opt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc/hostname").write_text("spinbox\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    (root / "etc/resolv.conf").write_text("")
    (root / "etc/nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")


def compile_bytecode(full: Path, root: Path) -> None:
    """Unchecked-hash .pyc: imports never stat sources or compare mtimes.

    The stdlib subset is sourceless (legacy .pyc beside where the .py was): fewer files and
    half the bytes in RAM. Our packages keep their sources for readable tracebacks.
    """
    py = guest_python(full)  # the same interpreter, with the complete stdlib (compileall)
    stdlib = root / f"usr/lib/python{PYVER}"
    common = ["-I", "-S", "-m", "compileall", "-q", "-j", "2", "--invalidation-mode",
              "unchecked-hash", "-s", str(root), "-p", "/"]
    subprocess.run(py + common + ["-b", str(stdlib)], check=True)
    for src in stdlib.rglob("*.py"):
        src.unlink()
    subprocess.run(py + common + [str(root / GUEST_PKG_DIR)], check=True)


def check_imports(root: Path, modules: list[str], strict: bool = True) -> str:
    """Import the given modules with the finished tree's own Python; returns the importtime log.

    strict=False only warns: used for vminitd's own modules, which may be mid-edit; the guest
    launcher reports a broken vminitd on the console and powers off.
    """
    code = f"import sys; sys.path.insert(0, {str(root / GUEST_PKG_DIR)!r}); import " + ", ".join(modules)
    proc = subprocess.run(guest_python(root) + ["-I", "-S", "-X", "importtime", "-c", code],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        msg = f"the guest tree cannot import {modules}:\n{proc.stderr[-3000:]}"
        if strict:
            raise SystemExit("initrd: " + msg)
        print("initrd: WARNING: " + msg, file=sys.stderr)
    return proc.stderr
