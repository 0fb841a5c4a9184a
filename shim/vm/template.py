"""VM templates: boot the generic part of a VM once, save it, start each sandbox from it.

A template is a directory:

    ram            the guest RAM (a memory-backend-file; keep it on tmpfs: /dev/shm, /run)
    state          QEMU's device state (migration stream with x-ignore-shared: no RAM in it)
    manifest.json  format version, the key (below) and what it was made of, sizes, the state's
                   sha256, the agent's next stream id

Recipe (QEMU 7.2, measured on the TCG dev host, docs in the module's tests):
- build: the cold-boot argv with `memory-backend-file,mem-path=<dir>/ram,share=on` and
  `-device vmgenid,guid=auto`; vminitd answers a ping; QMP `stop`, `migrate-set-capabilities
  x-ignore-shared=on`, `migrate fd:` (a file passed with getfd: seccomp's spawn=deny rules out
  `exec:`; 7.2 has no `file:`), QEMU quits.
- clone: the same argv with a new vmgenid guid and `-incoming defer`; QMP x-ignore-shared=on,
  `migrate-incoming fd:` on the state file; QEMU runs the guest on by itself.
  Its RAM is one of (`CloneRAM`):
  * `private`: the template's file share=off (MAP_PRIVATE): untouched pages shared by every
    clone, writes private. vhost-user (virtiofsd) cannot work: it would map the shared file,
    not the clone's private pages (the guest hangs on its first virtiofs request, and
    virtiofsd could write into the template). The clone's config says `memory_backend=ram`, so
    `devices.add_virtiofs` refuses.
  * `copy`: a memfd holding a sparse copy of the file, share=on (QEMU opens /proc/self/fd/N):
    virtiofs works; each clone holds its own copy of the used RAM. The memfd leaves nothing
    behind if the shim dies.

A template is keyed (`template_key`) by everything that shapes the guest or the migration
stream; a template whose manifest, key or files do not match is refused by `load_template`
with a reason (the caller boots cold). Files are identified by path, size, mtime and inode
(the image's files carry their content hash in their names), not hashed on every start.

Every clone is restored from the same kernel boot: the template must not hold secrets or
sandbox data; nothing reads `boot_id` before the save (the kernel makes it on first read, so
each clone gets its own); the guest clock is the template's until the host sets it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HostError
from .config import VMConfig
from .qemu_args import Resolved, TemplateArgv, kernel_cmdline

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RAM_FILE = "ram"
STATE_FILE = "state"
MAX_MANIFEST_BYTES = 64 * 1024
BUILDING_PREFIX = ".b-"     # a template being built (or the leftover of a builder that died)


class TemplateError(HostError):
    """A template could not be built or used."""


class CloneRAM(enum.Enum):
    PRIVATE = "private"   # MAP_PRIVATE of the template's RAM file: shared pages, no vhost-user
    COPY = "copy"         # a per-clone memfd copy, share=on: vhost-user (virtiofs) works


@dataclass(frozen=True)
class Template:
    dir: Path
    key: str
    manifest: dict[str, Any]

    @property
    def ram_file(self) -> Path:
        return self.dir / RAM_FILE

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def memory_mb(self) -> int:
        return int(self.manifest["memory_mb"])

    @property
    def next_stream_id(self) -> int:
        """The template's agent client used stream ids below this; the guest may not have
        seen that client go, so a clone's client starts here."""
        return int(self.manifest["next_stream_id"])


# ---------------------------------------------------------------------------------------------
# the key

def qemu_identity(binary: str) -> str:
    """The QEMU binary as part of a key: its resolved path, size, mtime and inode (an upgrade
    changes them). A stat, not `qemu --version`: the key is computed on every sandbox start,
    and running QEMU costs 20-80 ms there."""
    path = shutil.which(binary) or binary
    ident = _file_identity(Path(path))
    return " ".join(map(str, ident or ()))


def _file_identity(p: Path | None) -> list[Any] | None:
    if p is None:
        return None
    try:
        st = os.stat(p)
    except OSError as e:
        raise TemplateError(f"template key: cannot stat {p}: {e}") from None
    return [str(Path(p).resolve()), st.st_size, st.st_mtime_ns, st.st_ino]


def key_fields(config: VMConfig, resolved: Resolved, qemu: str, image_hash: str = "") -> dict[str, Any]:
    """Everything that shapes the guest or the saved state. Host-only choices (seccomp, TCG
    cache size, console log, timeouts, binaries' paths) are left out on purpose; the RAM
    backend kind is the clone's choice (CloneRAM), not the template's."""
    if resolved.transport == "vsock":
        raise TemplateError("templates need the virtio-serial transport (a vsock CID is per VM)")
    return {
        "format": FORMAT_VERSION,
        "qemu": qemu,
        "image_hash": image_hash,
        "kernel": _file_identity(config.kernel),
        "initrd": _file_identity(config.initrd),
        "root_disk": _file_identity(config.root_disk),
        "root_disk_serial": config.root_disk_serial,
        "machine": config.machine,
        "accel": resolved.accel,
        "transport": resolved.transport,
        "vcpus": config.vcpus,
        "max_vcpus": config.effective_max_vcpus,
        "memory_mb": config.memory_mb,
        "max_memory_mb": config.effective_max_memory_mb,
        "memory_slots": config.memory_slots,
        "memory_hotplug": config.memory_hotplug,
        "pci_hotplug_ports": config.pci_hotplug_ports,
        "rng": config.rng,
        "agent_port_name": config.agent_port_name,
        "cmdline": kernel_cmdline(config, resolved),
    }


def template_key(config: VMConfig, resolved: Resolved, qemu: str, image_hash: str = "") -> str:
    """sha256 (hex) of `key_fields`: equal keys = interchangeable templates."""
    blob = json.dumps(key_fields(config, resolved, qemu, image_hash), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# manifest

def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_problem(manifest: Any, key: str) -> str | None:
    """Why a parsed manifest cannot be used with `key` (None: it can); no file access."""
    if not isinstance(manifest, dict):
        return "manifest is not an object"
    if manifest.get("version") != FORMAT_VERSION:
        return f"manifest version {manifest.get('version')!r}, expected {FORMAT_VERSION}"
    if manifest.get("key") != key:
        return "key mismatch (the template was built for another kernel, image, QEMU or VM shape)"
    for name, kind in (("memory_mb", int), ("next_stream_id", int), ("ram_size", int),
                       ("state_size", int), ("state_sha256", str)):
        v = manifest.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            return f"manifest field {name!r} missing or not {kind.__name__}"
    if manifest["memory_mb"] < 1 or manifest["ram_size"] != manifest["memory_mb"] * 1024 * 1024:
        return "manifest ram_size does not match memory_mb"
    if not 1 <= manifest["next_stream_id"] < 2**31 or manifest["next_stream_id"] % 2 == 0:
        return "manifest next_stream_id is not an odd client stream id"
    if manifest["state_size"] <= 0:
        return "manifest state_size must be > 0"
    return None


def template_problem(dir: str | os.PathLike[str], key: str) -> tuple[Template | None, str]:
    """(Template, "") when `dir` holds a usable template for `key`, else (None, reason)."""
    d = Path(dir)
    mpath = d / MANIFEST
    try:
        with open(mpath, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None, f"no template at {d}"
    except OSError as e:
        return None, f"unreadable manifest {mpath}: {e}"
    if len(raw) > MAX_MANIFEST_BYTES:
        return None, f"manifest {mpath} larger than {MAX_MANIFEST_BYTES} bytes"
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        return None, f"corrupt manifest {mpath}: {e}"
    why = manifest_problem(manifest, key)
    if why:
        return None, f"template {d}: {why}"
    try:
        ram_size = (d / RAM_FILE).stat().st_size
        state_size = (d / STATE_FILE).stat().st_size
    except OSError as e:
        return None, f"template {d}: {e}"
    if ram_size != manifest["ram_size"]:
        return None, f"template {d}: RAM file is {ram_size} bytes, manifest says {manifest['ram_size']}"
    if state_size != manifest["state_size"]:
        return None, f"template {d}: state file is {state_size} bytes, manifest says {manifest['state_size']}"
    # the state is small (~0.5 MB): checked every time; the RAM file only by size
    if _sha256_file(d / STATE_FILE) != manifest["state_sha256"]:
        return None, f"template {d}: state file checksum mismatch (corrupt)"
    return Template(d, key, manifest), ""


def load_template(dir: str | os.PathLike[str], key: str) -> Template | None:
    """The template in `dir` if it is usable for `key`; otherwise None and one log line why."""
    t, why = template_problem(dir, key)
    if t is None:
        log.info("vm template not used: %s", why)
    return t


# ---------------------------------------------------------------------------------------------
# build

async def build_template(config: VMConfig, dir: str | os.PathLike[str], *, key: str,
                         name: str = "spinbox-template", extra: dict[str, Any] | None = None,
                         vm_dir: str | os.PathLike[str] | None = None) -> Template:
    """Boot `config` with its RAM in `<dir>/ram`, wait for vminitd, save it, stop QEMU.
    Built in a sibling temp dir and renamed into place (an existing `dir` is replaced), so a
    reader never sees half a template; on failure nothing is left but the error."""
    from spinbox.shim.guest import boot_guest_for_template   # shim.guest imports the vm package

    d = Path(dir)
    d.parent.mkdir(parents=True, exist_ok=True)
    # short: the builder VM's unix sockets live below it (107-byte limit)
    tmp = d.with_name(f"{BUILDING_PREFIX}{d.name}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(mode=0o700)
    t0 = time.monotonic()
    try:
        ram = tmp / RAM_FILE
        # the builder VM's own dir (sockets, vm.json): `vm_dir` when the caller keeps it short
        build_vm = Path(vm_dir) if vm_dir is not None else tmp / "vm"
        guest = await boot_guest_for_template(build_vm, config, TemplateArgv(str(ram), share=True), name=name)
        try:
            # Load vminitd's whole agent first (it imports its servicers lazily after the first
            # ping): saved half-way, every clone would finish those imports on its first call.
            await guest.agent.version()
            next_sid = guest.agent.next_stream_id
            await guest.agent.close()
            boot_s = guest.timeline.get("ready", 0.0)
            mig = await guest.vm.save_state(tmp / STATE_FILE)
        finally:
            await guest.vm.stop()   # the paused guest cannot run again: QMP quit
            await guest.agent.close()
        manifest = {
            "version": FORMAT_VERSION,
            "key": key,
            "created": time.time(),
            "memory_mb": config.memory_mb,
            "ram_size": ram.stat().st_size,
            "state_size": (tmp / STATE_FILE).stat().st_size,
            "state_sha256": _sha256_file(tmp / STATE_FILE),
            "next_stream_id": next_sid,
            "boot_s": round(boot_s, 3),
            "saved_bytes": int((mig.get("ram") or {}).get("transferred", 0)),
            **(extra or {}),
        }
        with contextlib.suppress(OSError):
            build_vm.rmdir()
        mtmp = tmp / (MANIFEST + ".tmp")
        mtmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(mtmp, tmp / MANIFEST)
        if d.exists():
            remove_template(d)
        os.rename(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("vm template %s built in %.2f s (guest boot %.2f s, state %d bytes)", d, time.monotonic() - t0,
             manifest["boot_s"], manifest["state_size"])
    return Template(d, key, manifest)


def remove_template(dir: str | os.PathLike[str]) -> None:
    """Remove a template dir. Running clones keep working: a private clone's mapping and
    every clone's loaded state do not need the files any more."""
    shutil.rmtree(dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# clone RAM

def _copy_sparse(src_fd: int, dst_fd: int, size: int) -> int:
    """Copy the data extents of src into dst at the same offsets; returns bytes copied."""
    copied = 0
    off = 0
    while off < size:
        try:
            data = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError:   # ENXIO: no data after off
            break
        hole = os.lseek(src_fd, data, os.SEEK_HOLE)
        os.lseek(dst_fd, data, os.SEEK_SET)
        pos = data
        while pos < hole:
            n = os.sendfile(dst_fd, src_fd, pos, hole - pos)
            if n <= 0:
                raise OSError(f"sendfile copied nothing at {pos}")
            pos += n
        copied += hole - data
        off = hole
    return copied


@dataclass
class CloneMemory:
    """The clone's RAM argv (and the fd QEMU must inherit, for COPY). Close it once QEMU runs."""
    argv: TemplateArgv
    fds: tuple[int, ...] = ()
    copied_bytes: int = 0

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = ()


def clone_memory(template: Template, mode: CloneRAM, *, vmgenid: str | None = None) -> CloneMemory:
    """The RAM backend of one clone: the template file MAP_PRIVATE, or a memfd copy of it."""
    guid = vmgenid or str(uuid.uuid4())
    if mode is CloneRAM.PRIVATE:
        return CloneMemory(TemplateArgv(str(template.ram_file), share=False, vmgenid=guid, incoming=True))
    size = template.manifest["ram_size"]
    fd = os.memfd_create("spinbox-clone-ram")   # CLOEXEC: only QEMU inherits it (pass_fds)
    try:
        os.ftruncate(fd, size)
        src = os.open(template.ram_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            copied = _copy_sparse(src, fd, size)
        finally:
            os.close(src)
    except OSError as e:
        os.close(fd)
        raise TemplateError(f"copying template RAM {template.ram_file}: {e}") from None
    # QEMU opens the path in its own process: the inherited fd under the same number
    return CloneMemory(TemplateArgv(f"/proc/self/fd/{fd}", share=True, vmgenid=guid, incoming=True),
                       (fd,), copied)


def clone_config(config: VMConfig, mode: CloneRAM) -> VMConfig:
    """The clone's config: RAM that is not shared with other processes says so (memory_backend
    ram), so virtiofs is refused instead of hanging the guest. A PRIVATE clone is not jailed
    (shim/vm/jail.py): QEMU 7.2 opens a memory-backend-file read-write even with share=off, and
    a template file the clone's QEMU may write is one every other clone maps; sandboxes use
    COPY (a memfd), PRIVATE is for measurements."""
    if mode is CloneRAM.PRIVATE:
        return dataclasses.replace(config, memory_backend="ram", qemu_jail=False)
    return config
