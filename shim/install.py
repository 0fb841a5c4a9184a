"""`spinbox install` / `spinbox uninstall`: make the host's own containerd find and use spinbox.

    plan = plan_install(Host(root), InstallOptions(...))    # reads, never writes
    apply(plan)                                              # the writes, the manifest first
    plan = plan_uninstall(Host(root)); apply(plan)           # undo exactly what the manifest holds

What install does (every path below `--root`, default `/`):

- `/usr/local/bin/containerd-shim-spinbox-v1`: a small sh launcher that execs this installation's
  shim. containerd looks shims up on its own PATH, which never holds our virtualenv. A launcher
  rather than a symlink because it can say what is wrong when the virtualenv is gone (containerd
  shows the shim's output as the error; a dangling symlink only gives "binary not installed"),
  it drops the PYTHON* variables of containerd's environment (they would change the code a root
  process runs), and its bytes are ours, so uninstall removes it only while they are unchanged.
- `/etc/spinbox/config.json` when absent (never overwritten, never removed once edited).
- the containerd runtime entry (CRI handler `spinbox`), without clobbering `config.toml`:
  containerd 2.x merges imported files deeply, so a drop-in (`/etc/containerd/conf.d/spinbox.toml`)
  plus one `imports` line is safe. containerd 1.6/1.7 replace a whole plugin section with an
  imported one (a drop-in naming the CRI runtimes would wipe the config's CRI settings), so
  there install prints the snippet and edits nothing unless `--edit-config`, which appends the
  tables in place. A missing config.toml is created (nothing to clobber).
- optionally (`--cni`) the example CNI network for `ctr run`, only into an empty CNI conf dir.

`/var/lib/spinbox/install.json` (0600: it holds config.toml's original bytes) records every
file and directory install created and every edit with the bytes before it. It is written
before each change, so a crash leaves a manifest that names what may exist. Uninstall acts on
the manifest's paths only where they are ones install writes (a manifest is input, not a list
of paths to delete), removes a file only while its bytes are the ones written, and writes
config.toml's original bytes back only while the file is as install left it.

`ctr run --runtime io.containerd.spinbox.v1` needs only the launcher: no config entry.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpinboxError

SHIM_NAME = "containerd-shim-spinbox-v1"
RUNTIME_TYPE = "io.containerd.spinbox.v1"
HANDLER = "spinbox"

BIN_DIR = "/usr/local/bin"
LAUNCHER = f"{BIN_DIR}/{SHIM_NAME}"
SPINBOX_CONFIG = "/etc/spinbox/config.json"
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
DROPIN = "/etc/containerd/conf.d/spinbox.toml"
CNI_CONF_DIR = "/etc/cni/net.d"
CNI_CONFLIST = f"{CNI_CONF_DIR}/10-spinbox.conflist"
MANIFEST = "/var/lib/spinbox/install.json"
MANIFEST_VERSION = 1
DEFAULT_SHARE_DIR = "/usr/share/spinbox"

# The only paths uninstall ever touches, whatever a manifest says.
OWN_FILES = frozenset({LAUNCHER, SPINBOX_CONFIG, CONTAINERD_CONFIG, DROPIN, CNI_CONFLIST})
EDITABLE = frozenset({CONTAINERD_CONFIG})
OWN_DIR_PREFIXES = ("/usr", "/etc", "/var")     # created parents of the files above

CRI_V2 = "io.containerd.grpc.v1.cri"           # config version 2 (containerd 1.6/1.7, 2.x migrates)
CRI_V3 = "io.containerd.cri.v1.runtime"        # config version 3 (containerd 2.x)
CNI_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cni" / "10-spinbox.conflist"


class InstallError(SpinboxError):
    """install/uninstall cannot go on; the message names the file or value and what to do."""


# ---------------------------------------------------------------------------------------------
# reading the host (below the root)

class Host:
    """Reads below `root`; every path argument is absolute as seen from inside the root."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        r = Path(root)
        if not r.is_absolute():
            r = Path.cwd() / r
        if not r.exists():
            raise InstallError(f"--root {root}: no such directory")
        if not r.is_dir():
            raise InstallError(f"--root {root}: not a directory")
        self.root = r.resolve()

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def read(self, path: str) -> bytes | None:
        """The file's bytes; None when absent. A directory or symlink there is an error: we
        would replace the link (or write into its target) instead of what the user sees."""
        p = self.at(path)
        try:
            if p.is_symlink():
                raise InstallError(f"{p} is a symlink: spinbox install writes only regular files; "
                                   f"move it away or edit the file it points to yourself")
            return p.read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise InstallError(f"{p} is a directory, expected a file or nothing") from None
        except PermissionError as e:
            raise InstallError(f"{p}: {e.strerror} (run as root)") from None

    def is_dir(self, path: str) -> bool:
        return self.at(path).is_dir()

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self.at(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def has_systemd(self) -> bool:
        return self.is_dir("/run/systemd/system")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# the plan

@dataclass(frozen=True)
class MakeDir:
    path: str

    def describe(self) -> str:
        return f"create directory {self.path}"


@dataclass(frozen=True)
class WriteFile:
    """Create `path` (absent before) or replace it; `before` is what must be there now."""
    path: str
    content: bytes
    mode: int
    what: str
    before: bytes | None = None

    def describe(self) -> str:
        return f"{'write' if self.before is None else 'edit'} {self.path} ({self.what})"


@dataclass(frozen=True)
class RemoveFile:
    path: str
    expect_sha256: str
    what: str

    def describe(self) -> str:
        return f"remove {self.path} ({self.what})"


@dataclass(frozen=True)
class RemoveDir:
    path: str

    def describe(self) -> str:
        return f"remove directory {self.path} (if empty)"


Action = MakeDir | WriteFile | RemoveFile | RemoveDir


@dataclass
class Plan:
    host: Host
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None     # what to save first; None: remove it at the end
    manifest_changed: bool = True

    def render(self, dry_run: bool) -> str:
        lines = []
        if not self.actions:
            lines.append("nothing to change")
        for a in self.actions:
            lines.append(("would " if dry_run else "") + a.describe())
        return "\n".join(lines + self.notes)


def empty_manifest() -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "files": {}, "edits": {}, "dirs": []}


def load_manifest(host: Host) -> dict[str, Any] | None:
    """The manifest, checked: only our own paths, well-formed entries."""
    raw = host.read(MANIFEST)
    if raw is None:
        return None
    where = host.at(MANIFEST)
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InstallError(f"{where}: not valid JSON ({e}); fix or remove it") from None
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION:
        raise InstallError(f"{where}: not a spinbox install manifest of version {MANIFEST_VERSION}")
    files, edits, dirs = m.get("files"), m.get("edits"), m.get("dirs")
    if not isinstance(files, dict) or not isinstance(edits, dict) or not isinstance(dirs, list):
        raise InstallError(f"{where}: files/edits/dirs missing or of the wrong type")
    for p, ent in files.items():
        if p not in OWN_FILES or not isinstance(ent, dict) or not isinstance(ent.get("sha256"), str):
            raise InstallError(f"{where}: files entry {p!r} is not one spinbox install writes")
    for p, ent in edits.items():
        if (p not in EDITABLE or not isinstance(ent, dict) or not isinstance(ent.get("before_b64"), str)
                or not isinstance(ent.get("after_sha256"), str) or not isinstance(ent.get("inserted"), str)):
            raise InstallError(f"{where}: edits entry {p!r} is not one spinbox install makes")
        try:
            base64.b64decode(ent["before_b64"], validate=True)
        except ValueError:
            raise InstallError(f"{where}: edits entry {p!r}: before_b64 is not base64") from None
    for d in dirs:
        if not isinstance(d, str) or not _is_own_dir(d):
            raise InstallError(f"{where}: dirs entry {d!r} is not a parent of a file spinbox install writes")
    return m


def _is_own_dir(d: str) -> bool:
    return (d.startswith("/") and ".." not in d.split("/")
            and any(f == d or f.startswith(d.rstrip("/") + "/") for f in OWN_FILES | {MANIFEST}))


# ---------------------------------------------------------------------------------------------
# what gets written

def launcher_script(shim: str) -> bytes:
    if "\n" in shim or "\0" in shim:
        raise InstallError(f"shim path {shim!r}: contains a newline or NUL")
    q = shlex.quote(shim)
    return f"""#!/bin/sh
# {SHIM_NAME}, written by `spinbox install` (`spinbox uninstall` removes it).
# containerd finds shims on its own PATH; this runs the shim of the spinbox installation below.
shim={q}
if [ ! -x "$shim" ]; then
    echo "{SHIM_NAME}: $shim is missing: its spinbox installation was moved or removed" \\
         "(run spinbox install from the new one, or spinbox uninstall)" >&2
    exit 1
fi
# Python variables from containerd's environment would change what a root process runs.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONINSPECT PYTHONUSERBASE
export PYTHONNOUSERSITE=1
exec "$shim" "$@"
""".encode()


def spinbox_config(share_dir: str) -> bytes:
    from .config import from_dict

    data = {"paths": {"share_dir": share_dir}}
    from_dict(data, source="spinbox install")        # what we write must load
    return (json.dumps(data, indent=2) + "\n").encode()


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) from `containerd --version` ("containerd <module> 1.6.20~ds1 <rev>",
    "containerd github.com/containerd/containerd/v2 v2.1.9 <rev>") or a bare "1.7"."""
    m = re.search(r"(?:^|\s)v?(\d+)\.(\d+)(?:[.~+-]|\s|$)", text.strip())
    if not m:
        raise InstallError(f"cannot read a containerd version from {text.strip()!r} "
                           f"(pass --containerd-version, e.g. 1.7 or 2.1)")
    return int(m.group(1)), int(m.group(2))


def detect_version(binary: str = "containerd") -> tuple[int, int]:
    path = shutil.which(binary)
    if path is None:
        raise InstallError(f"{binary!r} not found on PATH: cannot tell containerd's version "
                           f"(pass --containerd or --containerd-version)")
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InstallError(f"{path} --version: {e}") from None
    if r.returncode != 0:
        raise InstallError(f"{path} --version failed ({r.returncode}): {r.stderr.strip()}")
    return parse_version(r.stdout)


def _q(s: str) -> str:
    return json.dumps(s)     # a TOML basic string for the values we write (paths, names)


def runtime_tables(config_version: int, with_runc: bool, written: bool = True) -> str:
    """The CRI runtime handler `spinbox` in the schema of `config_version` (2 or 3); `written`:
    install writes it (else it is printed for the user to add, and uninstall never sees it)."""
    cri = CRI_V2 if config_version == 2 else CRI_V3
    base = f"plugins.{_q(cri)}.containerd.runtimes"
    out = [f"# CRI runtime handler {_q(HANDLER)}" +
           (": added by spinbox install (spinbox uninstall removes it)" if written else " (spinbox)")]
    if with_runc:
        # naming one runtime replaces containerd's built-in list: keep runc, the default handler
        out += [f"[{base}.runc]", '  runtime_type = "io.containerd.runc.v2"', ""]
    out += [f"[{base}.{HANDLER}]", f"  runtime_type = {_q(RUNTIME_TYPE)}"]
    if config_version == 3:
        out.append('  sandboxer = "podsandbox"       # spinbox does not implement the shim Sandbox API')
    out.append('  pod_annotations = ["spinbox.io/*"]')
    return "\n".join(out) + "\n"


def dropin_file(config_version: int, with_runc: bool) -> bytes:
    # a drop-in may not have a higher version than the root config (containerd 2.x refuses)
    return (f"version = {config_version}\n\n" + runtime_tables(config_version, with_runc)).encode()


# ---------------------------------------------------------------------------------------------
# containerd's config.toml

def _parse_toml(data: bytes, where: Path, ours: str = "") -> dict[str, Any]:
    """`ours`: the text is the file with our lines added (a failure is then ours to explain)."""
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        if ours:
            raise InstallError(f"{where}: with spinbox's lines added it would not be valid TOML ({e}), "
                               f"e.g. a table defined inline; nothing was changed. Add them yourself:\n"
                               f"{ours}") from None
        raise InstallError(f"{where}: not valid TOML ({e}); fix it before spinbox install") from None


def _cri_runtimes(cfg: dict[str, Any], version: int) -> dict[str, Any]:
    cri = CRI_V2 if version == 2 else CRI_V3
    r = cfg.get("plugins", {}).get(cri, {}).get("containerd", {}).get("runtimes", {})
    return r if isinstance(r, dict) else {}


def config_version(cfg: dict[str, Any], where: Path, major: int) -> int:
    v = cfg.get("version", 1)
    allowed = (2, 3) if major >= 2 else (2,)
    if v not in allowed:
        raise InstallError(f"{where}: config version {v!r}; spinbox install handles version "
                           f"{' or '.join(map(str, allowed))} for containerd {major}.x "
                           f"(`containerd config migrate` converts older ones)")
    return int(v)


def _top_level_end(lines: list[str]) -> int:
    """Index of the first table header: top-level keys must come before it."""
    for i, line in enumerate(lines):
        if line.lstrip().startswith("["):
            return i
    return len(lines)


_IMPORTS_LINE = re.compile(r"^(\s*imports\s*=\s*\[)(.*)\]\s*(#.*)?$")


def imports_covers(imports: list[Any], config_path: str, dropin: str) -> bool:
    base = os.path.dirname(config_path)
    for imp in imports:
        if not isinstance(imp, str):
            continue
        p = os.path.normpath(imp if os.path.isabs(imp) else os.path.join(base, imp))
        if p == dropin or ("*" in p and fnmatch.fnmatchcase(dropin, p)):
            return True
    return False


def add_import(text: str, dropin: str) -> tuple[str, str]:
    """config.toml's text with `dropin` in its top-level `imports`; returns (text, inserted).
    A single-line `imports = [...]` gets the path appended; without one, a line goes after
    `version = N` (or first). A multi-line imports array is refused."""
    lines = text.splitlines(keepends=True)
    end = _top_level_end(lines)
    for i in range(end):
        if re.match(r"^\s*imports\s*=", lines[i]):
            m = _IMPORTS_LINE.match(lines[i].rstrip("\r\n"))
            if not m:
                raise InstallError("its `imports` array spans several lines: add "
                                   f"{_q(dropin)} to it yourself")
            inner = m.group(2).rstrip()
            sep = ", " if inner.strip() and not inner.strip().endswith(",") else ""
            inserted = f"{sep}{_q(dropin)}"
            newline = lines[i][len(lines[i].rstrip("\r\n")):]
            lines[i] = f"{m.group(1)}{inner}{inserted}]{' ' + m.group(3) if m.group(3) else ''}{newline}"
            return "".join(lines), inserted
    nl = "\r\n" if "\r\n" in text else "\n"
    inserted = f"imports = [{_q(dropin)}]   # added by spinbox install{nl}"
    at = 0
    for i in range(end):
        if re.match(r"^\s*version\s*=", lines[i]):
            at = i + 1
            break
    if at and not lines[at - 1].endswith(("\n", "\r")):
        lines[at - 1] += nl
    lines.insert(at, inserted)
    return "".join(lines), inserted


def _without(cfg: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """A deep copy of `cfg` without the key path `drop`, and without the tables that leaves
    empty (to compare a file before and after our lines)."""
    out: dict[str, Any] = json.loads(json.dumps(cfg, default=str))
    chain = [out]
    for k in drop[:-1]:
        nxt = chain[-1].get(k)
        if not isinstance(nxt, dict):
            return out
        chain.append(nxt)
    chain[-1].pop(drop[-1], None)
    for node, key in reversed(list(zip(chain[:-1], drop[:-1], strict=True))):
        if node.get(key) == {}:
            node.pop(key)
    return out


# ---------------------------------------------------------------------------------------------
# install

@dataclass(frozen=True)
class InstallOptions:
    shim: str                                 # the venv's containerd-shim-spinbox-v1
    containerd_version: tuple[int, int]
    share_dir: str = DEFAULT_SHARE_DIR
    edit_config: bool = False                 # containerd 1.x: edit config.toml in place
    cni: bool = False


class _Builder:
    """Collects the actions and the manifest entries of one install."""

    def __init__(self, host: Host, manifest: dict[str, Any] | None) -> None:
        self.host = host
        self.old = manifest
        self.manifest = json.loads(json.dumps(manifest)) if manifest else empty_manifest()
        self.actions: list[Action] = []
        self.notes: list[str] = []
        self._dirs: set[str] = set()

    def _parents(self, path: str) -> None:
        missing = []
        d = os.path.dirname(path)
        while d != "/" and d not in self._dirs and not self.host.is_dir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            self._dirs.add(d)
            self.actions.append(MakeDir(d))
            if d not in self.manifest["dirs"]:
                self.manifest["dirs"].append(d)

    def create(self, path: str, content: bytes, mode: int, what: str) -> None:
        self._parents(path)
        self.actions.append(WriteFile(path, content, mode, what))
        self.manifest["files"][path] = {"sha256": sha256(content), "what": what}

    def replace_own(self, path: str, before: bytes, content: bytes, mode: int, what: str) -> None:
        self.actions.append(WriteFile(path, content, mode, what, before=before))
        self.manifest["files"][path] = {"sha256": sha256(content), "what": what}

    def edit(self, path: str, before: bytes, after: bytes, inserted: str, what: str) -> None:
        self.actions.append(WriteFile(path, after, 0o644, what, before=before))
        self.manifest["edits"][path] = {"before_b64": base64.b64encode(before).decode(),
                                        "after_sha256": sha256(after), "inserted": inserted}

    def ours(self, path: str, current: bytes) -> bool:
        e = self.manifest["files"].get(path)
        return e is not None and e["sha256"] == sha256(current)

    def place(self, path: str, content: bytes, mode: int, what: str) -> None:
        """A file that is wholly ours: create it, leave it when identical, update our own older
        version, refuse to replace anybody else's."""
        current = self.host.read(path)
        if current is None:
            self.create(path, content, mode, what)
        elif current == content:
            if path not in self.manifest["files"]:
                self.manifest["files"][path] = {"sha256": sha256(content), "what": what}
        elif self.ours(path, current):
            self.replace_own(path, current, content, mode, what)
        else:
            raise InstallError(f"{self.host.at(path)} exists and was not written by spinbox install: "
                               f"move it away first (it is never overwritten)")

    def plan(self) -> Plan:
        return Plan(self.host, self.actions, self.notes, self.manifest,
                    manifest_changed=self.manifest != self.old)


def plan_install(host: Host, opts: InstallOptions) -> Plan:
    b = _Builder(host, load_manifest(host))
    shim = Path(opts.shim)
    if not shim.is_absolute() or not os.access(shim, os.X_OK) or not shim.is_file():
        raise InstallError(f"--shim {opts.shim}: not an absolute path to an executable file (the shim "
                           f"the launcher runs: pip install the project first)")

    b.place(LAUNCHER, launcher_script(str(shim)), 0o755, f"launcher of {shim}")
    b.notes.append(f"ctr run --runtime {RUNTIME_TYPE} needs no containerd config entry: containerd "
                   f"finds {LAUNCHER} on its PATH (a service's PATH holds {BIN_DIR}).")

    if host.read(SPINBOX_CONFIG) is None:
        b.create(SPINBOX_CONFIG, spinbox_config(opts.share_dir), 0o644, "spinbox config")
        if not host.at(os.path.join(opts.share_dir, "image.json")).is_file():
            b.notes.append(f"warning: no guest image in {host.at(opts.share_dir)} (image.json): sandboxes "
                           f"will not start until `task build` installs one or --share-dir names it.")
    else:
        b.notes.append(f"{host.at(SPINBOX_CONFIG)} exists: kept as it is (never overwritten).")

    config_changed = _plan_containerd(b, opts)
    if opts.cni:
        _plan_cni(b)

    if config_changed:
        b.notes.append("Restart containerd to load the runtime entry: " + (
            "systemctl restart containerd" if host.has_systemd() else
            "this host has no systemd: stop containerd and start it again "
            f"(containerd --config {CONTAINERD_CONFIG})."))
    b.notes.append("Kubernetes: a RuntimeClass with handler \"spinbox\" (examples/runtimeclass.yaml) "
                   "makes pods with runtimeClassName: spinbox run in microVMs.")
    return b.plan()


def _plan_containerd(b: _Builder, opts: InstallOptions) -> bool:
    """Add (or show) the CRI runtime entry; True when containerd's config changes."""
    host = b.host
    major, minor = opts.containerd_version
    where = host.at(CONTAINERD_CONFIG)
    current = host.read(CONTAINERD_CONFIG)
    if current is not None and CONTAINERD_CONFIG in b.manifest["files"] and b.ours(CONTAINERD_CONFIG, current):
        return False                  # the config.toml a previous install created
    if current is None:
        if major >= 2:
            b.create(CONTAINERD_CONFIG, f"version = 3\nimports = [{_q(DROPIN)}]\n".encode(), 0o644,
                     "containerd config importing the drop-in")
            b.place(DROPIN, dropin_file(3, with_runc=False), 0o644, "containerd drop-in")
        else:
            b.create(CONTAINERD_CONFIG, b"version = 2\n\n" + runtime_tables(2, with_runc=True).encode(),
                     0o644, "containerd config with the spinbox runtime")
        return True

    cfg = _parse_toml(current, where)
    version = config_version(cfg, where, major)
    runtimes = _cri_runtimes(cfg, version)
    dropin_now = host.read(DROPIN)
    edit = b.manifest["edits"].get(CONTAINERD_CONFIG)
    if major < 2 and edit is not None and edit["after_sha256"] == sha256(current):
        b.notes.append(f"{where} holds the runtime entry a previous spinbox install added.")
        return False
    if HANDLER in runtimes:
        b.notes.append(f"{where} already names the CRI runtime {_q(HANDLER)}: left as it is.")
        return False

    if major >= 2:
        content = dropin_file(version, with_runc=version == 2 and "runc" not in runtimes)
        b.place(DROPIN, content, 0o644, "containerd drop-in")
        imports = cfg.get("imports", [])
        changed = dropin_now != content
        if isinstance(imports, list) and imports_covers(imports, CONTAINERD_CONFIG, DROPIN):
            return changed
        try:
            text, inserted = add_import(current.decode(), DROPIN)
        except InstallError as e:
            raise InstallError(f"{where}: {e}") from None
        after = text.encode()
        parsed = _parse_toml(after, where, ours=inserted)
        if _without(parsed, ("imports",)) != _without(cfg, ("imports",)) \
                or not imports_covers(parsed.get("imports", []), CONTAINERD_CONFIG, DROPIN):
            raise InstallError(f"{where}: adding the imports line would change more than imports; "
                               f"add {_q(DROPIN)} to its imports yourself")
        b.edit(CONTAINERD_CONFIG, current, after, inserted, f"imports {DROPIN}")
        return True

    tables = runtime_tables(2, with_runc="runc" not in runtimes)
    if not opts.edit_config:
        shown = runtime_tables(2, with_runc="runc" not in runtimes, written=False)
        b.notes += [
            f"containerd {major}.{minor}: {where} NOT changed. containerd 1.6/1.7 replace a whole plugin "
            "section with an imported one, so a drop-in would wipe this file's CRI settings. "
            "Add these lines to it yourself, or run spinbox install --edit-config "
            "(it appends them and spinbox uninstall restores the file byte for byte):",
            "", shown.rstrip("\n"), ""]
        return False
    text = current.decode()
    nl = "\r\n" if "\r\n" in text else "\n"
    inserted = ("" if text.endswith(("\n", "\r")) or not text else nl) + nl + tables.replace("\n", nl)
    after = (text + inserted).encode()
    parsed = _parse_toml(after, where, ours=tables)
    if _without(parsed, ("plugins", CRI_V2, "containerd", "runtimes")) != \
            _without(cfg, ("plugins", CRI_V2, "containerd", "runtimes")) or \
            HANDLER not in _cri_runtimes(parsed, 2):
        raise InstallError(f"{where}: appending the runtime tables would change more than the "
                           f"runtimes; add them yourself:\n{tables}")
    b.edit(CONTAINERD_CONFIG, current, after, inserted, f"CRI runtime {_q(HANDLER)} appended")
    return True


def _plan_cni(b: _Builder) -> None:
    try:
        content = CNI_EXAMPLE.read_bytes()
    except OSError as e:
        raise InstallError(f"--cni: the example network {CNI_EXAMPLE} is not readable ({e.strerror}): "
                           f"install from a checkout of the project") from None
    others = [n for n in b.host.listdir(CNI_CONF_DIR) if n != os.path.basename(CNI_CONFLIST)
              and n.endswith((".conf", ".conflist", ".json"))]
    if others:
        # the first config in the dir is the one CNI users (ours, and CRI's) pick: adding one
        # could change the network of someone else's pods
        b.notes.append(f"--cni: {b.host.at(CNI_CONF_DIR)} already holds {', '.join(others)}: "
                       f"no network added (sandboxes use the first of those).")
        return
    b.place(CNI_CONFLIST, content, 0o644, "CNI network for ctr run")


# ---------------------------------------------------------------------------------------------
# uninstall

def plan_uninstall(host: Host) -> Plan:
    m = load_manifest(host)
    if m is None:
        p = Plan(host, manifest=None, manifest_changed=False)
        p.notes.append(f"{host.at(MANIFEST)} not found: nothing was installed here.")
        return p
    actions: list[Action] = []
    notes: list[str] = []
    for path, e in sorted(m["edits"].items()):
        current = host.read(path)
        before = base64.b64decode(e["before_b64"])
        where = host.at(path)
        if current is None:
            notes.append(f"{where} is gone: not restored.")
        elif current == before:
            pass
        elif sha256(current) == e["after_sha256"]:
            actions.append(WriteFile(path, before, 0o644, "restored as before install", before=current))
        else:
            text = current.decode(errors="surrogateescape")
            if text.count(e["inserted"]) != 1:
                raise InstallError(f"{where} changed since install and no longer holds what install added "
                                   f"exactly once: restore it yourself (its original bytes are in "
                                   f"{host.at(MANIFEST)}, edits.{path}.before_b64); nothing was changed")
            restored = text.replace(e["inserted"], "", 1).encode(errors="surrogateescape")
            actions.append(WriteFile(path, restored, 0o644, "install's lines removed", before=current))
            notes.append(f"{where} changed since install: only install's lines were removed "
                         f"(the file is not byte for byte as before install).")
    for path, e in sorted(m["files"].items()):
        current = host.read(path)
        if current is None:
            continue
        if sha256(current) == e["sha256"]:
            actions.append(RemoveFile(path, e["sha256"], e.get("what", "installed file")))
        else:
            notes.append(f"{host.at(path)} changed since install: kept (remove it yourself if unwanted).")
    actions.append(RemoveFile(MANIFEST, "", "install manifest"))
    for d in sorted(m["dirs"], key=len, reverse=True):
        actions.append(RemoveDir(d))
    # measured with containerd 1.6: it keeps the shim path it resolved, so until a restart a new
    # sandbox fails with "fork/exec <launcher>: no such file or directory"
    notes.append("Restart containerd: it remembers where it found the shim (and loaded the runtime "
                 "entry, if any) until it restarts.")
    return Plan(host, actions, notes, manifest=None)


# ---------------------------------------------------------------------------------------------
# apply

def _write_atomic(path: Path, data: bytes, mode: int, like: Path | None = None) -> None:
    tmp = path.with_name(f".{path.name}.spinbox-install.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        if like is not None:           # an edited file keeps its owner and mode
            st = like.stat()
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, st.st_mode & 0o7777)
        else:
            os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_manifest(host: Host, manifest: dict[str, Any]) -> None:
    p = host.at(MANIFEST)
    for d in reversed(Path(MANIFEST).parents[:-1]):
        if not host.is_dir(str(d)):
            host.at(str(d)).mkdir(mode=0o755)
            if str(d) not in manifest["dirs"]:
                manifest["dirs"].append(str(d))
    _write_atomic(p, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), 0o600)


def apply(plan: Plan) -> list[str]:
    """Carry the plan out; returns what was done. The manifest is saved before any change
    (install) and removed only after every other one (uninstall)."""
    host = plan.host
    done: list[str] = []
    try:
        if plan.manifest is not None and plan.manifest_changed:
            _save_manifest(host, plan.manifest)
        for a in plan.actions:
            p = host.at(a.path)
            if isinstance(a, MakeDir):
                if not p.is_dir():
                    p.mkdir(mode=0o755)
            elif isinstance(a, WriteFile):
                if host.read(a.path) != a.before:
                    raise InstallError(f"{p} changed while spinbox install ran: stopped before writing it")
                _write_atomic(p, a.content, a.mode, like=p if a.before is not None else None)
            elif isinstance(a, RemoveFile):
                cur = host.read(a.path)
                if cur is None:
                    continue
                if a.expect_sha256 and sha256(cur) != a.expect_sha256:
                    raise InstallError(f"{p} changed while spinbox uninstall ran: kept")
                p.unlink()
                p.with_name(f".{p.name}.spinbox-install.tmp").unlink(missing_ok=True)
            elif isinstance(a, RemoveDir):
                try:
                    p.rmdir()
                except FileNotFoundError:
                    continue
                except OSError:
                    done.append(f"kept directory {a.path} (not empty)")
                    continue
            done.append(a.describe())
    except PermissionError as e:
        raise InstallError(f"{e.filename}: {e.strerror} (run as root)") from None
    except OSError as e:
        raise InstallError(f"{e.filename}: {e.strerror}") from None
    return done


# ---------------------------------------------------------------------------------------------
# the commands (shim.cli calls these)

def venv_shim() -> str:
    """The shim of the Python running this command (the venv's console script)."""
    return str(Path(sys.executable).parent / SHIM_NAME)


@contextlib.contextmanager
def exclusive(host: Host) -> Iterator[None]:
    """One install/uninstall per root at a time: a flock on the root directory itself (nothing
    to clean up after a crash; the kernel drops it with the process)."""
    fd = os.open(host.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstallError(f"another spinbox install or uninstall is running on {host.root}") from None
        yield
    finally:
        os.close(fd)


def _report(done: list[str], plan: Plan) -> None:
    print("\n".join(done or ["nothing to change"]) + ("\n" + "\n".join(plan.notes) if plan.notes else ""))


def run_install(root: str, *, dry_run: bool, edit_config: bool, cni: bool,
                containerd: str, containerd_version: str | None, shim: str | None,
                share_dir: str) -> int:
    try:
        host = Host(root)
        version = parse_version(containerd_version) if containerd_version else detect_version(containerd)
        opts = InstallOptions(shim=shim or venv_shim(), containerd_version=version,
                              share_dir=share_dir, edit_config=edit_config, cni=cni)
        with exclusive(host):
            plan = plan_install(host, opts)
            if dry_run:
                print(plan.render(dry_run=True))
                return 0
            done = apply(plan)
    except SpinboxError as e:
        print(f"spinbox install: {e}", file=sys.stderr)
        return 1
    _report(done, plan)
    return 0


def run_uninstall(root: str, *, dry_run: bool) -> int:
    try:
        host = Host(root)
        with exclusive(host):
            plan = plan_uninstall(host)
            if dry_run:
                print(plan.render(dry_run=True))
                return 0
            done = apply(plan) if plan.actions else []
    except SpinboxError as e:
        print(f"spinbox uninstall: {e}", file=sys.stderr)
        return 1
    _report(done, plan)
    return 0
