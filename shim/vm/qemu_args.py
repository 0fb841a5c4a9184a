"""The QEMU command line for one VM: a pure function of the config and the resolved choices.

Choices that need the host (accel, transport, CID) are resolved before and passed in, so this
module has no I/O and is unit tested argument by argument.

What is on it and why:
- `-nodefaults -no-user-config -display none`: no default NIC, VGA, serial, monitor or config
  file; every device is named here. (`-display none` instead of `-nographic`: -nographic would
  multiplex a monitor onto stdio, which we never want.)
- `-no-reboot` + kernel `panic=-1 reboot=t`: a guest panic or reboot ends QEMU, which the VM
  layer reports as the VM dying; a reboot loop would hide the failure.
- QMP on a unix socket (server, no wait) for control and hot-plug; `-pidfile` for crash cleanup.
- The agent channel: a virtserialport named `spinbox.agent` bridged to `<state>/agent.sock`, or
  vhost-vsock with the allocated CID.
- The serial console into a socket the shim reads (`console_fd`, one end of a socketpair QEMU
  inherits): the shim keeps a bounded copy (shim/vm/logsink.py), and QEMU never blocks on it
  (a full socket makes the serial device retry, then drop). Without `console_fd` (argv tests),
  a file, as QEMU writes it: unbounded.
- guest RAM from a memfd with share=on so vhost-user devices (virtiofsd) can map it; the
  virtio-mem device (hot-plug room) uses the same kind of backend.
- `-sandbox on,...` seccomp: QEMU may not exec, setuid, change scheduling or use obsolete calls.
- VM templates (`TemplateArgv`, shim/vm/template.py): guest RAM from a `memory-backend-file`
  (the template's RAM file, share=on while it is built; the same file share=off = MAP_PRIVATE in a
  clone, or a per-clone copy share=on), a `vmgenid` device, and `-incoming defer` in a clone (the
  device state comes over QMP `migrate-incoming fd:`: seccomp's spawn=deny rules out `exec:`).
  Without a TemplateArgv the argv is exactly the cold-boot one.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import VMConfig
from .paths import VMPaths

VIRTIO_MEM_ID = "vmem0"          # qom path /machine/peripheral/vmem0
VIRTIO_MEM_BACKEND_ID = "vmem0-mem"
RAM_BACKEND_ID = "ram0"
AGENT_CHARDEV_ID = "agent"
VMGENID_ID = "vmgenid0"
TAG_OBJECT_ID = "spinbox-tag"
HOTPLUG_PORT_PREFIX = "hp"        # pcie-root-port ids hp0, hp1, ...
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class Resolved:
    """Host-dependent choices, resolved before the argv is built."""
    accel: str            # "kvm" | "tcg"
    transport: str        # "vsock" | "virtio-serial"
    cid: int | None = None  # with vsock


@dataclass(frozen=True)
class TemplateArgv:
    """What a template VM or a clone changes on the command line (nothing else differs, so the
    migration stream of the one loads into the other)."""
    ram_path: str          # memory-backend-file mem-path (a file, or /proc/self/fd/N of a memfd)
    share: bool            # share=on: template build / per-clone copy; share=off: MAP_PRIVATE clone
    vmgenid: str = "auto"  # the VM generation id: "auto" in the template, a new uuid per clone
    incoming: bool = False  # -incoming defer: the clone waits for migrate-incoming over QMP


@dataclass(frozen=True)
class PassedFds:
    """Sockets and devices the shim opens for a jailed QEMU (shim/vm/jail.py), which can reach
    no path of the host: the QMP and agent listening sockets (bound by the shim at the same
    paths, so clients connect as before) and /dev/vhost-vsock. No -pidfile then: vm.json has
    the pid, and the jail has nothing writable."""
    qmp: int
    agent: int | None = None        # virtio-serial transport
    vhost_vsock: int | None = None  # vsock transport


def qopt(value: object) -> str:
    """Escape a value for QEMU's `key=value,...` option syntax (a comma is written twice)."""
    return str(value).replace(",", ",,")


def kernel_cmdline(config: VMConfig, resolved: Resolved) -> str:
    """Base cmdline + transport for vminitd + the image's own args + extras (later ones win)."""
    # no_timer_check: the IO-APIC timer check counts ticks in a short window; a TCG guest on a
    # loaded host can miss them and panics ("IO-APIC + timer doesn't work!", seen with 5 guests
    # booting at once on 2 cores). The timer is QEMU's and known good.
    args = ["console=ttyS0", "quiet", "panic=-1", "reboot=t", "no_timer_check",
            *_memhp_args(config),
            f"spinbox.transport={resolved.transport}"]
    if resolved.transport == "vsock":
        args.append(f"spinbox.vsock_port={config.vsock_port}")
    args += config.image_cmdline.split()
    args += config.cmdline_extra
    return " ".join(args)


def _memhp_args(config: VMConfig) -> list[str]:
    """Hot-added memory comes online by itself, movable so a shrink can give it back. With a
    large maxmem against boot memory (> 3x) all-movable would starve kernel allocations:
    auto-movable keeps enough ZONE_NORMAL (kernel/README.md)."""
    if not config.hotplug_memory_mb:
        return []
    if config.effective_max_memory_mb > 3 * config.memory_mb:
        return ["memhp_default_state=online", "memory_hotplug.online_policy=auto-movable"]
    return ["memhp_default_state=online_movable"]


def _is_pci(config: VMConfig) -> bool:
    return config.machine != "microvm"


def virtio_device(config: VMConfig, kind: str) -> str:
    """`virtio-<kind>-pci` on q35, `virtio-<kind>-device` (virtio-mmio) on microvm."""
    return f"{kind}-pci" if _is_pci(config) else f"{kind}-device"


def console_chardev(paths: VMPaths, console_fd: int | None) -> str:
    if console_fd is None:
        return f"file,id=console,path={qopt(paths.console_log)}"
    return f"socket,id=console,fd={console_fd},server=off"


def build_argv(config: VMConfig, paths: VMPaths, resolved: Resolved, name: str = "spinbox",
               template: TemplateArgv | None = None, console_fd: int | None = None,
               fds: PassedFds | None = None) -> list[str]:
    if resolved.accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be resolved to kvm or tcg (got {resolved.accel!r})")
    if resolved.transport not in ("vsock", "virtio-serial"):
        raise ValueError(f"transport must be resolved to vsock or virtio-serial (got {resolved.transport!r})")
    if resolved.transport == "vsock" and (resolved.cid is None or resolved.cid < 3):
        raise ValueError(f"vsock needs an allocated guest CID >= 3 (got {resolved.cid!r})")

    shared_ram = config.memory_backend == "memfd"
    backend = "memory-backend-memfd" if shared_ram else "memory-backend-ram"
    share = ",share=on" if shared_ram else ""

    machine = config.machine
    if config.machine == "q35":
        # no SMM (we never run firmware that needs it); the bus scan stays short
        machine += ",smm=off"
    else:
        # microvm + ACPI hangs in ~20 % of TCG boots (lost timer tick, kernel/README.md); without
        # ACPI it booted 30/30 (devices reach the kernel as virtio_mmio.device= args)
        machine += ",acpi=off"
    machine += f",memory-backend={RAM_BACKEND_ID}"

    accel = resolved.accel
    if accel == "tcg":
        accel += ",thread=multi"
        if config.tcg_tb_size_mb:
            accel += f",tb-size={config.tcg_tb_size_mb}"

    mem = f"{config.memory_mb}M"
    hotplug_mb = config.hotplug_memory_mb
    if hotplug_mb:
        mem += f",slots={config.memory_slots},maxmem={config.effective_max_memory_mb}M"
    smp = str(config.vcpus)
    if config.effective_max_vcpus != config.vcpus:
        smp += f",maxcpus={config.effective_max_vcpus}"

    argv = [
        config.qemu_binary,
        "-name", f"{qopt(name)},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", machine,
        "-accel", accel,
        "-cpu", "host" if resolved.accel == "kvm" else "max",
        "-smp", smp,
        "-m", mem,
        "-object", (f"{backend},id={RAM_BACKEND_ID},size={config.memory_mb}M{share}" if template is None
                    else f"memory-backend-file,id={RAM_BACKEND_ID},size={config.memory_mb}M,"
                         f"mem-path={qopt(template.ram_path)},share={'on' if template.share else 'off'}"),
        "-kernel", qopt(config.kernel),
    ]
    if config.initrd is not None:
        argv += ["-initrd", qopt(config.initrd)]
    argv += ["-append", kernel_cmdline(config, resolved)]
    if config.seccomp_sandbox:
        argv += ["-sandbox", SANDBOX]
    if fds is None:
        argv += ["-pidfile", str(paths.pidfile),
                 "-chardev", f"socket,id=qmp,path={qopt(paths.qmp_socket)},server=on,wait=off"]
    else:
        # the QMP socket's path stays on the command line as an inert secret object: it names
        # the VM's state dir to `ps`, leak checks and crash cleanup (vm.json's argv tag)
        argv += ["-chardev", f"socket,id=qmp,fd={fds.qmp},server=on,wait=off",
                 "-object", f"secret,id={TAG_OBJECT_ID},format=raw,data={qopt(paths.qmp_socket)}"]
    argv += [
        "-mon", "chardev=qmp,mode=control",
        "-chardev", console_chardev(paths, console_fd),
        "-serial", "chardev:console",
    ]
    if resolved.transport == "virtio-serial":
        argv += [
            "-device", f"{virtio_device(config, 'virtio-serial')},id=vser0",
            "-chardev", f"socket,id={AGENT_CHARDEV_ID},"
                        + (f"fd={fds.agent}" if fds is not None and fds.agent is not None
                           else f"path={qopt(paths.agent_socket)}") + ",server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV_ID},name={config.agent_port_name}",
        ]
    else:
        vhostfd = f",vhostfd={fds.vhost_vsock}" if fds is not None and fds.vhost_vsock is not None else ""
        argv += ["-device", f"{virtio_device(config, 'vhost-vsock')},id=vsock0,guest-cid={resolved.cid}{vhostfd}"]
    if config.root_disk is not None:
        argv += [
            "-drive", f"file={qopt(config.root_disk)},if=none,id=root,format=raw,readonly=on",
            "-device", f"{virtio_device(config, 'virtio-blk')},drive=root,serial={config.root_disk_serial}",
        ]
    if config.rng:
        argv += ["-object", "rng-builtin,id=rng0",
                 "-device", f"{virtio_device(config, 'virtio-rng')},rng=rng0"]
    if _is_pci(config):
        for i in range(config.pci_hotplug_ports):
            argv += ["-device", f"pcie-root-port,id={HOTPLUG_PORT_PREFIX}{i},bus=pcie.0,chassis={i + 1}"]
    if hotplug_mb and config.memory_hotplug == "virtio-mem":
        # the whole hot-plug room, plugged 0 at boot; grown later with qom-set requested-size
        argv += [
            "-object", f"{backend},id={VIRTIO_MEM_BACKEND_ID},size={hotplug_mb}M{share}",
            "-device", f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_BACKEND_ID},requested-size=0",
        ]
    if template is not None:
        argv += ["-device", f"vmgenid,id={VMGENID_ID},guid={qopt(template.vmgenid)}"]
        if template.incoming:
            argv += ["-incoming", "defer"]
    return argv
