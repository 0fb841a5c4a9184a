"""spinbox configuration: `/etc/spinbox/config.json` (or `$SPINBOX_CONFIG`), optional.

Layers, later ones win key by key (sections are merged, not replaced):

1. built-in defaults (every key has one: the file is optional);
2. the config file: `$SPINBOX_CONFIG` if set (then it must exist), else `/etc/spinbox/config.json`
   if it exists;
3. the runtime options containerd hands the shim (CRI `runtimeoptions.v1.Options`, on `start`'s
   stdin and in CreateTaskRequest.options): `config_path` names another file (JSON, or TOML if
   it ends in `.toml`), `config_body` (containerd 1.7+: the runtime's `options` TOML table when
   `ConfigPath` is not set) is TOML with the same sections.

Unknown keys and bad values are refused with a `ConfigError` whose message starts with the key
path (`runtime.accel: must be one of auto, kvm, tcg (got 'xen')`).

The binaries the shim runs as root (`paths.qemu`, `paths.virtiofsd`) are the host's choice:
runtime options (layer 3, which whoever can talk to containerd picks per container) may only
select one of the absolute paths the host config file lists in `paths.allowed_binaries`, and
cannot set that list (`check_binaries`).

`vm_config(cfg, ...)` turns a `SpinboxConfig` into the VM layer's `VMConfig` in one place, so
every VM-related key demonstrably reaches QEMU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.api import contract

from .errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/spinbox/config.json"
CONFIG_ENV = "SPINBOX_CONFIG"
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"
# Keys of CRI's runtimeoptions.Options struct that go-toml marshals into config_body alongside the
# user's table; they are containerd's, not ours.
_CRI_OPTION_KEYS = {"TypeUrl", "ConfigPath", "ConfigBody"}


# ---------------------------------------------------------------------------------------------
# schema: one frozen dataclass per section. A field's type drives the checks in _build();
# `metadata["choices"]` restricts strings, `metadata["min"]`/`["max"]` numbers.

def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


def _num(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi})


@dataclass(frozen=True)
class PathsConfig:
    share_dir: str = "/usr/share/spinbox"          # guest kernel + image (image.json)
    state_dir: str = "/run/spinbox"                 # per-sandbox state, VM sockets, logs
    cni_conf_dir: str = "/etc/cni/net.d"            # CNI network configs (ctr run networking)
    cni_bin_dirs: tuple[str, ...] = ("/usr/lib/cni", "/opt/cni/bin")
    qemu: str = "qemu-system-x86_64"                # QEMU binary (name on PATH or absolute)
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"      # virtiofsd binary
    template_dir: str = ""                          # VM templates ("" = <state_dir>/templates; tmpfs is best)
    # absolute paths runtime options may pick for qemu / virtiofsd (host config file only)
    allowed_binaries: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuntimeConfig:
    vmm: str = _choice("qemu", "qemu")
    accel: str = _choice("auto", "auto", "kvm", "tcg")
    machine: str = _choice("q35", "q35", "microvm")
    transport: str = _choice("auto", "auto", "vsock", "virtio-serial")
    oci_runtime: str = _choice("runc", *contract.OCI_RUNTIMES)   # OCI runtime inside the guest
    # how a sandbox's VM starts: restored from a saved VM of its shape (built on first need,
    # cold boot when that fails), or booted from scratch
    start: str = _choice("template", "template", "cold")
    # q35: PCIe ports for hot-plugged devices. A pod uses one per NIC and two per running
    # container (its rootfs share, its bind-mount share); freed when the container is deleted.
    pci_hotplug_ports: int = _num(16, 0, 32)


@dataclass(frozen=True)
class TimeoutsConfig:
    boot_s: float = _num(30.0, 0.1, 3600)           # QEMU exec -> vminitd ready
    shutdown_s: float = _num(2.0, 0.1, 600)         # graceful guest stop before QMP quit / kill
    agent_call_s: float = _num(contract.AGENT_CALL_TIMEOUT_S, 0.1, 3600)   # one unary call to vminitd


@dataclass(frozen=True)
class NetworkConfig:
    enabled: bool = True            # ctr run: shim runs CNI; CRI: plumb the pod netns
    network: str = ""               # CNI network name to use; "" = first conflist in cni_conf_dir
    interface: str = "eth0"         # interface name inside the sandbox netns / guest


@dataclass(frozen=True)
class CPUHotplugConfig:
    vcpus: int = _num(1, 1, 255)                    # vCPUs at boot
    max_vcpus: int | None = _num(None, 1, 255)      # hot-plug ceiling; null = 4 on q35, vcpus on microvm


@dataclass(frozen=True)
class MemoryHotplugConfig:
    memory_mb: int = _num(256, 64, 1 << 20)         # RAM at boot
    max_memory_mb: int | None = _num(None, 64, 1 << 20)  # ceiling; null = 2048 on q35, memory_mb on microvm
    slots: int = _num(4, 0, 256)                    # pc-dimm slots
    backend: str = _choice("virtio-mem", "virtio-mem", "pc-dimm", "none")


@dataclass(frozen=True)
class GuestConfig:
    kernel: str | None = None           # guest kernel override; null = <share_dir>/vmlinux
    image: str | None = None            # image manifest override; null = <share_dir>/image.json
    kernel_cmdline_extra: tuple[str, ...] = ()   # extra kernel command-line words
    debug_console: bool = False         # verbose kernel console, console.log kept after stop
    console_log_max_mb: int = _num(4, 1, 1024)   # the console file's cap (newest output kept)


@dataclass(frozen=True)
class ConfinementConfig:
    # shim/vm/confine.py, docs/security.md: on by default
    qemu_rlimits: bool = True           # QEMU: RLIMIT_CORE 0, RLIMIT_NOFILE 4096
    virtiofsd_hardening: bool = True    # virtiofsd: sandbox=namespace, -mknod -setfcap
    # shim/vm/jail.py: QEMU as uid qemu_uid_base + slot, in a root holding only what it reads
    qemu_jail: bool = True
    qemu_uid_base: int = _num(0x70000000, 1000, 0xFFFF0000)
    qemu_uid_count: int = _num(65536, 1, 1 << 20)
    # shim/vm/hostcgroup.py: QEMU + virtiofsd in <parent>/spinbox-<sandbox> with limits from the
    # VM's size (under CRI the parent is the pod's cgroup); off, or no usable cgroups: without
    host_cgroup: bool = True
    host_cgroup_parent: str = "/spinbox"


@dataclass(frozen=True)
class AutoscaleConfig:
    # shim/autoscale.py, docs/sizing.md: vCPUs follow guest CPU usage; off by default
    enabled: bool = False
    interval_s: float = _num(5.0, 0.2, 3600)        # how often the guest's CPU usage is read
    grow_above_pct: float = _num(80.0, 1, 100)      # busy share of all online vCPUs
    shrink_below_pct: float = _num(30.0, 0, 99)
    sustain_s: float = _num(30.0, 0, 3600)          # how long usage must stay past a threshold
    cooldown_s: float = _num(60.0, 0, 3600)         # nothing decided after a change
    min_vcpus: int = _num(1, 1, 255)
    max_vcpus: int | None = _num(None, 1, 255)      # null = cpu_hotplug.max_vcpus


@dataclass(frozen=True)
class SpinboxConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    cpu_hotplug: CPUHotplugConfig = field(default_factory=CPUHotplugConfig)
    memory_hotplug: MemoryHotplugConfig = field(default_factory=MemoryHotplugConfig)
    guest: GuestConfig = field(default_factory=GuestConfig)
    confinement: ConfinementConfig = field(default_factory=ConfinementConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    # where the values came from (files read, "options"), for logs and error messages
    sources: tuple[str, ...] = field(default=(), compare=False)

    # -- derived values ----------------------------------------------------------------------
    @property
    def effective_max_vcpus(self) -> int:
        c = self.cpu_hotplug
        if c.max_vcpus is not None:
            return c.max_vcpus
        return c.vcpus if self.runtime.machine == "microvm" else max(c.vcpus, 4)

    @property
    def effective_max_memory_mb(self) -> int:
        m = self.memory_hotplug
        if m.max_memory_mb is not None:
            return m.max_memory_mb
        if self.runtime.machine == "microvm" or m.backend == "none":
            return m.memory_mb
        return max(m.memory_mb, 2048)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("sources")
        return json.loads(json.dumps(d))   # tuples -> lists: the config.json shape


# (dataclass field types are strings under `from __future__ import annotations`: map by hand)
_SECTION_TYPES = {"paths": PathsConfig, "runtime": RuntimeConfig, "timeouts": TimeoutsConfig,
                  "network": NetworkConfig, "cpu_hotplug": CPUHotplugConfig,
                  "memory_hotplug": MemoryHotplugConfig, "guest": GuestConfig,
                  "confinement": ConfinementConfig, "autoscale": AutoscaleConfig}


# ---------------------------------------------------------------------------------------------
# building + validation

def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(key: str, value: Any, tp: Any, meta: Any) -> Any:
    """Check one value against its field type; returns it in the dataclass's shape."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(key, value, args[0], meta)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false (got {value!r})")
        return value
    if tp is int or tp is float:
        ok = isinstance(value, int) if tp is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise ConfigError(key, f"must be {'an integer' if tp is int else 'a number'} (got {value!r})")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise ConfigError(key, f"must be >= {lo} (got {value!r})")
        if hi is not None and value > hi:
            raise ConfigError(key, f"must be <= {hi} (got {value!r})")
        return float(value) if tp is float else value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string (got {value!r})")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)} (got {value!r})")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings (got {value!r})")
        return tuple(value)
    raise AssertionError(f"unhandled config type {tp!r} for {key}")  # a schema bug, not user input


def _build_section(name: str, data: Any) -> Any:
    cls = _SECTION_TYPES[name]
    if not isinstance(data, dict):
        raise ConfigError(name, f"must be an object (got {type(data).__name__})")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(fields)})")
        kw[key] = _check_value(f"{name}.{key}", value, hints[key], fields[key].metadata)
    return cls(**kw)


def _validate(cfg: SpinboxConfig) -> None:
    """Checks that span keys."""
    for key in ("share_dir", "state_dir", "cni_conf_dir"):
        p = getattr(cfg.paths, key)
        if not os.path.isabs(p):
            raise ConfigError(f"paths.{key}", f"must be an absolute path (got {p!r})")
    if cfg.paths.template_dir and not os.path.isabs(cfg.paths.template_dir):
        raise ConfigError("paths.template_dir", f"must be an absolute path or \"\" (got {cfg.paths.template_dir!r})")
    for d in cfg.paths.cni_bin_dirs:
        if not os.path.isabs(d):
            raise ConfigError("paths.cni_bin_dirs", f"entries must be absolute paths (got {d!r})")
    # the state dir holds unix sockets (VM dirs add ~60 bytes): keep it short
    if len(cfg.paths.state_dir.encode()) > 40:
        raise ConfigError("paths.state_dir", f"must be at most 40 bytes long (unix socket paths "
                                             f"under it are limited to 107 bytes; got {cfg.paths.state_dir!r})")
    for key in ("qemu", "virtiofsd"):
        if not getattr(cfg.paths, key):
            raise ConfigError(f"paths.{key}", "must not be empty")
    for b in cfg.paths.allowed_binaries:
        if not os.path.isabs(b):
            raise ConfigError("paths.allowed_binaries", f"entries must be absolute paths (got {b!r})")
    for key in ("kernel", "image"):
        p = getattr(cfg.guest, key)
        if p is not None and not os.path.isabs(p):
            raise ConfigError(f"guest.{key}", f"must be an absolute path or null (got {p!r})")
    if cfg.confinement.host_cgroup_parent != "/":
        from .vm.hostcgroup import HostCgroupError, cgroup_rel_path
        try:
            cgroup_rel_path(cfg.confinement.host_cgroup_parent)
        except HostCgroupError as e:
            raise ConfigError("confinement.host_cgroup_parent", str(e)) from None
    for word in cfg.guest.kernel_cmdline_extra:
        if not word or any(c.isspace() for c in word):
            raise ConfigError("guest.kernel_cmdline_extra",
                              f"each entry must be one non-empty word without spaces (got {word!r})")
    if cfg.network.network and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cfg.network.network):
        raise ConfigError("network.network", f"not a valid CNI network name (got {cfg.network.network!r})")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", cfg.network.interface):
        raise ConfigError("network.interface", f"must be a Linux interface name, 1-15 characters "
                                               f"(got {cfg.network.interface!r})")
    cpu, mem, machine = cfg.cpu_hotplug, cfg.memory_hotplug, cfg.runtime.machine
    if cpu.max_vcpus is not None and cpu.max_vcpus < cpu.vcpus:
        raise ConfigError("cpu_hotplug.max_vcpus", f"must be >= vcpus ({cpu.vcpus}) (got {cpu.max_vcpus})")
    if mem.max_memory_mb is not None and mem.max_memory_mb < mem.memory_mb:
        raise ConfigError("memory_hotplug.max_memory_mb",
                          f"must be >= memory_mb ({mem.memory_mb}) (got {mem.max_memory_mb})")
    if (cfg.effective_max_memory_mb - mem.memory_mb) % 2:
        raise ConfigError("memory_hotplug.max_memory_mb", "max_memory_mb - memory_mb must be a multiple of 2")
    if machine == "microvm":
        if cfg.effective_max_vcpus != cpu.vcpus:
            raise ConfigError("cpu_hotplug.max_vcpus", "runtime.machine microvm has no vCPU hot-plug: "
                                                       "set max_vcpus to null or to vcpus, or use q35")
        if cfg.effective_max_memory_mb != mem.memory_mb:
            raise ConfigError("memory_hotplug.max_memory_mb", "runtime.machine microvm has no memory "
                                                              "hot-plug: set max_memory_mb to null or use q35")
    if mem.backend == "pc-dimm" and cfg.effective_max_memory_mb > mem.memory_mb and mem.slots < 1:
        raise ConfigError("memory_hotplug.slots", "pc-dimm memory hot-plug needs at least one slot")
    _validate_autoscale(cfg)


def _validate_autoscale(cfg: SpinboxConfig) -> None:
    a, top = cfg.autoscale, cfg.effective_max_vcpus
    if a.shrink_below_pct >= a.grow_above_pct:
        raise ConfigError("autoscale.shrink_below_pct", f"must be below grow_above_pct "
                                                        f"({a.grow_above_pct:g}) (got {a.shrink_below_pct:g})")
    if a.max_vcpus is not None and a.max_vcpus < a.min_vcpus:
        raise ConfigError("autoscale.max_vcpus", f"must be >= min_vcpus ({a.min_vcpus}) (got {a.max_vcpus})")
    if a.max_vcpus is not None and a.max_vcpus > top:
        raise ConfigError("autoscale.max_vcpus", f"must be <= cpu_hotplug.max_vcpus ({top}) (got {a.max_vcpus})")
    if a.min_vcpus > top:
        raise ConfigError("autoscale.min_vcpus", f"must be <= cpu_hotplug.max_vcpus ({top}) (got {a.min_vcpus})")
    if a.enabled and top == cfg.cpu_hotplug.vcpus:
        raise ConfigError("autoscale.enabled", f"the VM cannot change its vCPUs (cpu_hotplug.max_vcpus = "
                                               f"vcpus = {top}{', runtime.machine microvm' if cfg.runtime.machine == 'microvm' else ''})")


def from_dict(data: Any, *, source: str | None = None) -> SpinboxConfig:
    """Build a validated config from a config.json-shaped dict (missing keys: defaults)."""
    try:
        if not isinstance(data, dict):
            raise ConfigError("", f"the config must be an object (got {type(data).__name__})")
        kw = {}
        for name, value in data.items():
            if name not in _SECTION_TYPES:
                raise ConfigError(name, f"unknown section (known: {', '.join(_SECTION_TYPES)})")
            kw[name] = _build_section(name, value)
        cfg = SpinboxConfig(**kw, sources=(source,) if source else ())
        _validate(cfg)
        return cfg
    except ConfigError as e:
        if source and e.source is None:
            raise ConfigError(e.key, e.detail, source) from None
        raise


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge: keys in `over` replace those in `base`; sections are merged."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# loading

def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file as a dict: JSON, or TOML when the name ends in `.toml`."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("", "config file not found", str(p)) from None
    except OSError as e:
        raise ConfigError("", f"cannot read config file: {e.strerror}", str(p)) from None
    try:
        data = tomllib.loads(raw.decode()) if p.suffix == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        kind = "TOML" if p.suffix == ".toml" else "JSON"
        raise ConfigError("", f"not valid {kind}: {e}", str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError("", f"the config must be an object (got {type(data).__name__})", str(p))
    return data


def parse_config_body(body: str | bytes) -> dict[str, Any]:
    """CRI's config_body: the runtime's `options` TOML table (same sections as config.json)."""
    text = body.decode() if isinstance(body, bytes) else body
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"not valid TOML: {e}", "runtime options config_body") from None
    return {k: v for k, v in data.items() if k not in _CRI_OPTION_KEYS}


def decode_runtime_options(options: Any) -> Any | None:
    """A runtimeoptions.v1.Options from an Any (or raw serialized Any bytes, or an Options);
    None for empty input or another options type (e.g. runc's, which we do not use)."""
    from google.protobuf import any_pb2

    from spinbox.api._pb.runtimeoptions.v1 import api_pb2

    if options is None:
        return None
    if isinstance(options, api_pb2.Options):
        return options
    if isinstance(options, (bytes, bytearray)):
        if not options:
            return None
        a = any_pb2.Any()
        try:
            a.ParseFromString(bytes(options))
        except Exception as e:  # DecodeError
            raise ConfigError("", f"runtime options are not a protobuf Any: {e}") from None
        options = a
    if not options.type_url:
        return None
    if options.type_url.rsplit("/", 1)[-1] != RUNTIME_OPTIONS_TYPE:
        return None
    opts = api_pb2.Options()
    try:
        opts.ParseFromString(options.value)
    except Exception as e:
        raise ConfigError("", f"runtime options ({options.type_url}) do not decode: {e}") from None
    return opts


_BINARY_KEYS = ("qemu", "virtiofsd")


def check_binaries(host: dict[str, Any], over: dict[str, Any], source: str) -> None:
    """A runtime options layer (`over`, from `source`) may pick QEMU / virtiofsd only from the
    host config's `paths.allowed_binaries` (absolute paths), and may not change that list."""
    paths = over.get("paths")
    if not isinstance(paths, dict):
        return
    if "allowed_binaries" in paths:
        raise ConfigError("paths.allowed_binaries", "can only be set in the host config file "
                          f"(${CONFIG_ENV} or {DEFAULT_CONFIG_PATH}), not in runtime options", source)
    host_paths: dict[str, Any] = host["paths"] if isinstance(host.get("paths"), dict) else {}
    allowed = list(host_paths.get("allowed_binaries") or ())
    for key in _BINARY_KEYS:
        if key not in paths:
            continue
        value = paths[key]
        if value == host_paths.get(key, getattr(PathsConfig, key)) or \
                (isinstance(value, str) and os.path.isabs(value) and value in allowed):
            continue
        raise ConfigError(f"paths.{key}", f"{value!r} is not allowed from runtime options: the host config "
                          f"file's paths.allowed_binaries lists {', '.join(allowed) or 'none'}", source)


def load(options: Any = None, *, env: Mapping[str, str] | None = None) -> SpinboxConfig:
    """The effective config: defaults < config file < runtime options (config_path, config_body)."""
    if env is None:
        env = os.environ
    data: dict[str, Any] = {}
    sources: list[str] = []
    explicit = env.get(CONFIG_ENV)
    path = explicit or DEFAULT_CONFIG_PATH
    if explicit or os.path.exists(path):
        data = read_file(path)
        from_dict(data, source=path)       # errors name the file they come from
        sources.append(path)
    host = data
    opts = decode_runtime_options(options)
    if opts is not None:
        if opts.config_path:
            over = read_file(opts.config_path)
            from_dict(over, source=opts.config_path)
            check_binaries(host, over, opts.config_path)
            data = merge(data, over)
            sources.append(opts.config_path)
        if opts.config_body:
            over = parse_config_body(opts.config_body)
            from_dict(over, source="runtime options config_body")
            check_binaries(host, over, "runtime options config_body")
            data = merge(data, over)
            sources.append("runtime options config_body")
    cfg = from_dict(data, source=" + ".join(sources) or None)
    return dataclasses.replace(cfg, sources=tuple(sources))


# ---------------------------------------------------------------------------------------------
# the VM layer's view

def vm_config(cfg: SpinboxConfig, **overrides: Any):
    """The `VMConfig` for a sandbox of this config (guest image from share_dir or the guest.*
    overrides). `overrides` (e.g. vcpus/memory_mb from sandbox sizing annotations) win."""
    from spinbox.shim.vm.config import VMConfig, VMConfigError, VMTimeouts

    image = guest_image(cfg)
    # the guest's OCI runtime: vminitd reads it from the kernel command line
    cmdline_extra = [f"{contract.OCI_RUNTIME_PARAM}={cfg.runtime.oci_runtime}",
                     *cfg.guest.kernel_cmdline_extra]
    if cfg.guest.debug_console:
        cmdline_extra.append("loglevel=7")   # after the image's `quiet`: the later word wins
    kw: dict[str, Any] = dict(
        kernel=image.kernel, initrd=image.initrd, root_disk=image.root_disk,
        image_cmdline=image.cmdline, cmdline_extra=cmdline_extra,
        accel=cfg.runtime.accel, machine=cfg.runtime.machine, transport=cfg.runtime.transport,
        pci_hotplug_ports=cfg.runtime.pci_hotplug_ports,
        vcpus=cfg.cpu_hotplug.vcpus, max_vcpus=cfg.effective_max_vcpus,
        memory_mb=cfg.memory_hotplug.memory_mb, max_memory_mb=cfg.effective_max_memory_mb,
        memory_slots=cfg.memory_hotplug.slots, memory_hotplug=cfg.memory_hotplug.backend,
        qemu_binary=cfg.paths.qemu, virtiofsd_binary=cfg.paths.virtiofsd,
        keep_console_log=cfg.guest.debug_console,
        console_log_max_bytes=cfg.guest.console_log_max_mb << 20,
        timeouts=VMTimeouts(boot_s=cfg.timeouts.boot_s, shutdown_grace_s=cfg.timeouts.shutdown_s),
        qemu_rlimits=cfg.confinement.qemu_rlimits,
        virtiofsd_hardening=cfg.confinement.virtiofsd_hardening,
        qemu_jail=cfg.confinement.qemu_jail,
        qemu_uid_base=cfg.confinement.qemu_uid_base, qemu_uid_count=cfg.confinement.qemu_uid_count,
    )
    kw.update(overrides)
    try:
        return VMConfig(**kw).validate()
    except VMConfigError as e:
        raise ConfigError(e.key, str(e).split(": ", 1)[-1]) from None


@dataclass(frozen=True)
class GuestImageFiles:
    kernel: Path
    initrd: Path
    root_disk: Path | None
    cmdline: str
    hash: str = ""          # the image's content hash (image.json), part of a VM template's key


def template_dir(cfg: SpinboxConfig) -> Path:
    return Path(cfg.paths.template_dir or Path(cfg.paths.state_dir) / "templates")


def guest_image(cfg: SpinboxConfig) -> GuestImageFiles:
    """Kernel + image files: `<share_dir>/image.json` (or guest.image) and `vmlinux` beside it
    (or guest.kernel). The manifest format is initrd/README.md's (version 1)."""
    manifest_path = Path(cfg.guest.image) if cfg.guest.image else Path(cfg.paths.share_dir) / "image.json"
    key = "guest.image" if cfg.guest.image else "paths.share_dir"
    kernel = Path(cfg.guest.kernel) if cfg.guest.kernel else manifest_path.parent / "vmlinux"
    kkey = "guest.kernel" if cfg.guest.kernel else key
    if not kernel.is_file():
        raise ConfigError(kkey, f"no guest kernel at {kernel} (build it: task build:kernel)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ConfigError(key, f"no guest image manifest at {manifest_path} (build it: task build:initrd)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"unreadable image manifest {manifest_path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != 1:
        raise ConfigError(key, f"{manifest_path}: unsupported manifest version")

    def member(name_key: str) -> Path | None:
        name = manifest.get(name_key)
        if name is None:
            return None
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise ConfigError(key, f"{manifest_path}: bad file name in {name_key!r}: {name!r}")
        p = manifest_path.parent / name
        if not p.is_file():
            raise ConfigError(key, f"{manifest_path}: {name_key} file missing: {p}")
        return p

    initrd = member("initrd")
    if initrd is None:
        raise ConfigError(key, f"{manifest_path}: no initrd")
    cmdline = manifest.get("cmdline", "")
    if not isinstance(cmdline, str):
        raise ConfigError(key, f"{manifest_path}: cmdline must be a string")
    image_hash = manifest.get("hash", "")
    return GuestImageFiles(kernel=kernel, initrd=initrd, root_disk=member("root_disk"), cmdline=cmdline,
                           hash=image_hash if isinstance(image_hash, str) else "")
