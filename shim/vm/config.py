"""Typed configuration of one VM: what to boot and how big it may get.

Every value is checked by `VMConfig.validate()`; errors are `VMConfigError`s whose message
starts with the key (`vm.vcpus: ...`) so a user can find it in `config.json`.
`VMConfig.from_dict()` maps a plain dict (a config-file section) and rejects unknown keys;
`image_from_share_dir()` reads the guest image manifest (`image.json`) next to the kernel.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_SHARE_DIR = "/usr/share/spinbox"
DEFAULT_QEMU = "qemu-system-x86_64"
DEFAULT_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# vminitd's defaults (vminitd/channel.py): the virtio-serial port name and the vsock port
AGENT_PORT_NAME = "spinbox.agent"
AGENT_VSOCK_PORT = 1024
# vminitd prints `vminitd: ready in X.XXs (listening on ...)` once it serves the agent API
DEFAULT_READY_MARKER = r"^vminitd: ready\b"
DEFAULT_CONSOLE_LOG_MAX_BYTES = 4 << 20
CONSOLE_LOG_MAX_BYTES_RANGE = (256 << 10, 1 << 30)

ACCELS = ("auto", "kvm", "tcg")
MACHINES = ("q35", "microvm")
TRANSPORTS = ("auto", "vsock", "virtio-serial")
MEMORY_BACKENDS = ("memfd", "ram")
MEMORY_HOTPLUG = ("virtio-mem", "pc-dimm", "none")


class VMConfigError(ConfigError):
    """A bad VM configuration value; `key` names it (dotted path)."""


@dataclass
class VMTimeouts:
    boot_s: float = 30.0          # QEMU exec → guest ready (probe OK); TCG with 8 guests/2 cores ~9 s
    qmp_connect_s: float = 5.0    # QEMU exec → QMP socket accepts (measured 0.04-0.16 s)
    qmp_command_s: float = 10.0   # one QMP command
    shutdown_grace_s: float = 2.0  # graceful stop (agent / ACPI powerdown) before QMP quit
    quit_s: float = 2.0           # QMP quit → process exit, before SIGKILL
    kill_s: float = 5.0           # SIGKILL → reaped (it cannot be ignored; bounded anyway)
    # no console output at all by then = an early-boot hang (microvm under TCG hangs in ~5-30 %
    # of boots with nothing printed, docs/host-facts.md §1): kill and boot again, up to boot_attempts
    first_output_s: float | None = None
    boot_attempts: int = 1


@dataclass
class VMConfig:
    kernel: Path
    initrd: Path | None = None
    # read-only guest root image (erofs) on virtio-blk, found by the guest by its serial
    root_disk: Path | None = None
    root_disk_serial: str = "spinbox-root"
    accel: str = "auto"
    machine: str = "q35"
    vcpus: int = 1
    max_vcpus: int | None = None        # None: = vcpus (no vCPU hotplug)
    memory_mb: int = 256
    max_memory_mb: int | None = None    # None: = memory_mb (no memory hotplug)
    memory_slots: int = 4               # pc-dimm slots (only with max_memory_mb > memory_mb)
    memory_hotplug: str = "virtio-mem"
    # guest RAM backend; memfd with share=on is what vhost-user (virtiofsd) needs
    memory_backend: str = "memfd"
    # q35: empty PCIe root ports for hot-plugged PCI devices (virtiofs, NICs, disks): q35's
    # root bus pcie.0 cannot hot-plug, every hot-plugged device needs a free port
    pci_hotplug_ports: int = 4
    transport: str = "auto"
    vsock_port: int = AGENT_VSOCK_PORT
    agent_port_name: str = AGENT_PORT_NAME
    image_cmdline: str = ""             # from image.json: what the guest image needs
    cmdline_extra: list[str] = field(default_factory=list)
    console_log: Path | None = None     # None: <state_dir>/console.log
    keep_console_log: bool = False      # keep it after stop() (debugging)
    # the console file holds at most this (the newest output, in console.log + console.log.1):
    # the guest writes its console at will, and the file is on a tmpfs
    console_log_max_bytes: int = DEFAULT_CONSOLE_LOG_MAX_BYTES
    qemu_binary: str = DEFAULT_QEMU
    virtiofsd_binary: str = DEFAULT_VIRTIOFSD
    seccomp_sandbox: bool = True
    # shim/vm/confine.py: QEMU with RLIMIT_CORE 0 and a bounded RLIMIT_NOFILE; virtiofsd with
    # an explicit namespace sandbox, CAP_MKNOD/CAP_SETFCAP dropped
    qemu_rlimits: bool = True
    virtiofsd_hardening: bool = True
    # shim/vm/jail.py: QEMU runs as a uid of its own (qemu_uid_base + a free slot) in a mount
    # namespace whose root holds only what it reads; off for template builds
    qemu_jail: bool = True
    qemu_uid_base: int = 0x70000000
    qemu_uid_count: int = 65536
    rng: bool = True                    # virtio-rng: the guest's CRNG is ready at once
    tcg_tb_size_mb: int | None = None   # TCG translation cache size (trims idle RSS a little)
    # QEMU gets SIGKILL when the process that started it dies (PR_SET_PDEATHSIG)
    die_with_parent: bool = True
    # shim/vm/hostcgroup.py: the sandbox cgroup dirs QEMU and virtiofsd are moved into at spawn
    host_cgroup_dirs: tuple[str, ...] = ()
    ready_marker: str | None = DEFAULT_READY_MARKER  # console regex recorded in the timeline
    timeouts: VMTimeouts = field(default_factory=VMTimeouts)

    # ------------------------------------------------------------------ derived values
    @property
    def effective_max_vcpus(self) -> int:
        return self.max_vcpus if self.max_vcpus is not None else self.vcpus

    @property
    def effective_max_memory_mb(self) -> int:
        return self.max_memory_mb if self.max_memory_mb is not None else self.memory_mb

    @property
    def hotplug_memory_mb(self) -> int:
        """Room for memory hot-plug (the virtio-mem device's size / the pc-dimm budget)."""
        if self.memory_hotplug == "none":
            return 0
        return self.effective_max_memory_mb - self.memory_mb

    # ------------------------------------------------------------------ validation
    def validate(self, prefix: str = "vm") -> VMConfig:
        def err(key: str, msg: str) -> VMConfigError:
            return VMConfigError(f"{prefix}.{key}", msg)

        def choice(key: str, allowed: tuple[str, ...]) -> None:
            v = getattr(self, key)
            if v not in allowed:
                raise err(key, f"must be one of {', '.join(allowed)} (got {v!r})")

        choice("accel", ACCELS)
        choice("machine", MACHINES)
        choice("transport", TRANSPORTS)
        choice("memory_backend", MEMORY_BACKENDS)
        choice("memory_hotplug", MEMORY_HOTPLUG)
        if not 1000 <= self.qemu_uid_base or self.qemu_uid_count < 1 \
                or self.qemu_uid_base + self.qemu_uid_count > 0xFFFFFFFF:
            raise err("qemu_uid_base", f"uid range {self.qemu_uid_base}+{self.qemu_uid_count} must lie within "
                      "1000..2^32-2")
        for key in ("vcpus", "memory_mb"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise err(key, f"must be an integer >= 1 (got {v!r})")
        if self.vcpus > 255:
            raise err("vcpus", f"must be <= 255 (got {self.vcpus})")
        if self.max_vcpus is not None:
            if not isinstance(self.max_vcpus, int) or self.max_vcpus < self.vcpus:
                raise err("max_vcpus", f"must be an integer >= vcpus ({self.vcpus}) (got {self.max_vcpus!r})")
            if self.max_vcpus > 255:
                raise err("max_vcpus", f"must be <= 255 (got {self.max_vcpus})")
        if self.memory_mb < 64:
            raise err("memory_mb", f"must be >= 64 (got {self.memory_mb}); the guest image does not fit below")
        if self.max_memory_mb is not None:
            if not isinstance(self.max_memory_mb, int) or self.max_memory_mb < self.memory_mb:
                raise err("max_memory_mb",
                          f"must be an integer >= memory_mb ({self.memory_mb}) (got {self.max_memory_mb!r})")
            # virtio-mem hands out 2 MiB blocks; pc-dimms must be 2 MiB aligned too (x86)
            if (self.max_memory_mb - self.memory_mb) % 2:
                raise err("max_memory_mb", "max_memory_mb - memory_mb must be a multiple of 2 MiB")
        if not isinstance(self.memory_slots, int) or not 0 <= self.memory_slots <= 256:
            raise err("memory_slots", f"must be an integer 0..256 (got {self.memory_slots!r})")
        if not isinstance(self.pci_hotplug_ports, int) or not 0 <= self.pci_hotplug_ports <= 32:
            raise err("pci_hotplug_ports", f"must be an integer 0..32 (got {self.pci_hotplug_ports!r})")
        if self.memory_hotplug == "pc-dimm" and self.hotplug_memory_mb and self.memory_slots < 1:
            raise err("memory_slots", "pc-dimm memory hot-plug needs at least one slot")
        if self.machine == "microvm":
            # measured (docs/host-facts.md §1): no query-hotpluggable-cpus, no PCI for virtio-mem-pci
            if self.effective_max_vcpus != self.vcpus:
                raise err("max_vcpus", "microvm has no vCPU hot-plug: use machine q35 or max_vcpus = vcpus")
            if self.effective_max_memory_mb != self.memory_mb and self.memory_hotplug != "none":
                raise err("max_memory_mb",
                          "microvm has no memory hot-plug here: use machine q35 or max_memory_mb = memory_mb")
        if not 1 <= self.vsock_port < 2**32:
            raise err("vsock_port", f"must be 1..4294967295 (got {self.vsock_port})")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.agent_port_name):
            raise err("agent_port_name", f"must match [A-Za-z0-9._-]{{1,64}} (got {self.agent_port_name!r})")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,20}", self.root_disk_serial):
            raise err("root_disk_serial", "must match [A-Za-z0-9._-]{1,20} (virtio-blk serial)")
        if not str(self.kernel):
            raise err("kernel", "is required")
        for key in ("kernel", "initrd", "root_disk"):
            p = getattr(self, key)
            if p is not None and not Path(p).is_file():
                raise err(key, f"file not found: {p}")
        for key in ("cmdline_extra",):
            for arg in self.cmdline_extra:
                if not isinstance(arg, str) or not arg or any(c.isspace() for c in arg):
                    raise err(key, f"each entry must be one non-empty word without spaces (got {arg!r})")
        lo, hi = CONSOLE_LOG_MAX_BYTES_RANGE
        v = self.console_log_max_bytes
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise err("console_log_max_bytes", f"must be an integer {lo}..{hi} (got {v!r})")
        if self.tcg_tb_size_mb is not None and not 1 <= self.tcg_tb_size_mb <= 4096:
            raise err("tcg_tb_size_mb", f"must be 1..4096 (got {self.tcg_tb_size_mb})")
        if self.ready_marker is not None:
            try:
                re.compile(self.ready_marker)
            except re.error as e:
                raise err("ready_marker", f"not a valid regular expression: {e}") from None
        if not isinstance(self.timeouts.boot_attempts, int) or not 1 <= self.timeouts.boot_attempts <= 10:
            raise err("timeouts.boot_attempts", f"must be an integer 1..10 (got {self.timeouts.boot_attempts!r})")
        for f in dataclasses.fields(self.timeouts):
            v = getattr(self.timeouts, f.name)
            if f.name == "boot_attempts" or (f.name == "first_output_s" and v is None):
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise err(f"timeouts.{f.name}", f"must be a number > 0 (got {v!r})")
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "vm", **defaults: Any) -> VMConfig:
        """Build from a config-file section; unknown keys and wrong types name the key.
        `defaults` (e.g. the image's kernel/initrd) apply where `data` is silent."""
        if not isinstance(data, dict):
            raise VMConfigError(prefix, f"must be an object (got {type(data).__name__})")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise VMConfigError(f"{prefix}.{key}", "unknown key")
        kw: dict[str, Any] = dict(defaults)
        for key, value in data.items():
            kw[key] = _coerce(f"{prefix}.{key}", key, value)
        if "kernel" not in kw:
            raise VMConfigError(f"{prefix}.kernel", "is required")
        return cls(**kw).validate(prefix)

    @classmethod
    def from_share_dir(cls, share_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> VMConfig:
        """The default VM for the installed guest image: vmlinux + image.json in the share dir."""
        image = image_from_share_dir(share_dir)
        kw: dict[str, Any] = {"kernel": image.kernel, "initrd": image.initrd,
                              "root_disk": image.root_disk, "image_cmdline": image.cmdline}
        kw.update(overrides)
        return cls(**kw).validate()


_PATH_KEYS = {"kernel", "initrd", "root_disk", "console_log"}
_INT_KEYS = {"pci_hotplug_ports", "vcpus", "max_vcpus", "memory_mb", "max_memory_mb", "memory_slots", "vsock_port", "tcg_tb_size_mb",
             "console_log_max_bytes", "qemu_uid_base", "qemu_uid_count"}
_BOOL_KEYS = {"keep_console_log", "seccomp_sandbox", "rng", "die_with_parent", "qemu_rlimits",
              "virtiofsd_hardening", "qemu_jail"}


def _coerce(key: str, name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _PATH_KEYS:
        if not isinstance(value, str) or not value:
            raise VMConfigError(key, f"must be a path string (got {value!r})")
        return Path(value)
    if name in _INT_KEYS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise VMConfigError(key, f"must be an integer (got {value!r})")
        return value
    if name in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise VMConfigError(key, f"must be true or false (got {value!r})")
        return value
    if name == "cmdline_extra":
        if isinstance(value, str):
            return value.split()
        if not isinstance(value, list):
            raise VMConfigError(key, f"must be a list of strings (got {value!r})")
        return list(value)
    if name == "timeouts":
        if not isinstance(value, dict):
            raise VMConfigError(key, "must be an object")
        known = {f.name for f in dataclasses.fields(VMTimeouts)}
        for k, v in value.items():
            if k not in known:
                raise VMConfigError(f"{key}.{k}", "unknown key")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise VMConfigError(f"{key}.{k}", f"must be a number of seconds (got {v!r})")
        kw: dict[str, Any] = {k: (v if k == "boot_attempts" else float(v)) for k, v in value.items()}
        return VMTimeouts(**kw)
    if not isinstance(value, str):
        raise VMConfigError(key, f"must be a string (got {value!r})")
    return value


# ---------------------------------------------------------------------------------------------
# guest image manifest (initrd/README.md: <share-dir>/image.json)

@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    root_disk: Path | None
    cmdline: str
    manifest: dict[str, Any]


def share_dir_path(share_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(share_dir or os.environ.get("SPINBOX_SHARE_DIR") or DEFAULT_SHARE_DIR)


def image_from_share_dir(share_dir: str | os.PathLike[str] | None = None) -> GuestImage:
    """Kernel and image files named by `<share>/image.json`; errors name the missing file."""
    d = share_dir_path(share_dir)
    kernel = d / "vmlinux"
    if not kernel.is_file():
        raise VMConfigError("paths.share_dir", f"no guest kernel at {kernel} (build it: task build:kernel)")
    manifest_path = d / "image.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise VMConfigError("paths.share_dir",
                            f"no guest image manifest at {manifest_path} (build it: task build:initrd)") from None
    except (OSError, ValueError) as e:
        raise VMConfigError("paths.share_dir", f"unreadable image manifest {manifest_path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != 1:
        raise VMConfigError("paths.share_dir", f"{manifest_path}: unsupported manifest version")

    def member(key: str) -> Path | None:
        name = manifest.get(key)
        if name is None:
            return None
        # names are relative to the manifest's folder and must stay inside it
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise VMConfigError("paths.share_dir", f"{manifest_path}: bad file name in {key!r}: {name!r}")
        p = d / name
        if not p.is_file():
            raise VMConfigError("paths.share_dir", f"{manifest_path}: {key} file missing: {p}")
        return p

    initrd = member("initrd")
    if initrd is None:
        raise VMConfigError("paths.share_dir", f"{manifest_path}: no initrd")
    cmdline = manifest.get("cmdline", "")
    if not isinstance(cmdline, str):
        raise VMConfigError("paths.share_dir", f"{manifest_path}: cmdline must be a string")
    return GuestImage(kernel=kernel, initrd=initrd, root_disk=member("root_disk"), cmdline=cmdline,
                      manifest=manifest)
