"""QEMU argv builder and kernel cmdline (spinbox.shim.vm.qemu_args): pure, no QEMU needed."""
from __future__ import annotations

from pathlib import Path

import pytest

from spinbox.shim.vm.config import VMConfig
from spinbox.shim.vm.paths import StatePathError, VMPaths
from spinbox.shim.vm.qemu_args import SANDBOX, Resolved, build_argv, kernel_cmdline, qopt


@pytest.fixture
def files(tmp_path):
    k, i, r = tmp_path / "vmlinux", tmp_path / "initrd.cpio", tmp_path / "root.erofs"
    for f in (k, i, r):
        f.write_bytes(b"x")
    return k, i, r


def cfg(files, **kw) -> VMConfig:
    k, i, _ = files
    return VMConfig(kernel=k, initrd=i, **kw).validate()


def opt(argv: list[str], flag: str) -> list[str]:
    """All values following `flag`."""
    return [argv[n + 1] for n, a in enumerate(argv) if a == flag]


PATHS = VMPaths(Path("/run/sbx/vm1"))
TCG_SERIAL = Resolved("tcg", "virtio-serial")


def test_q35_tcg_virtio_serial_defaults(files):
    argv = build_argv(cfg(files), PATHS, TCG_SERIAL)
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert "-daemonize" not in argv and "-nographic" not in argv
    assert opt(argv, "-display") == ["none"]
    assert opt(argv, "-machine") == ["q35,smm=off,memory-backend=ram0"]
    assert opt(argv, "-accel") == ["tcg,thread=multi"]
    assert opt(argv, "-cpu") == ["max"]
    assert opt(argv, "-smp") == ["1"]
    assert opt(argv, "-m") == ["256M"]
    assert "memory-backend-memfd,id=ram0,size=256M,share=on" in opt(argv, "-object")
    assert opt(argv, "-kernel") == [str(files[0])]
    assert opt(argv, "-initrd") == [str(files[1])]
    assert opt(argv, "-sandbox") == [SANDBOX]
    assert opt(argv, "-pidfile") == ["/run/sbx/vm1/qemu.pid"]
    chardevs = opt(argv, "-chardev")
    assert "socket,id=qmp,path=/run/sbx/vm1/qmp.sock,server=on,wait=off" in chardevs
    assert "socket,id=agent,path=/run/sbx/vm1/agent.sock,server=on,wait=off" in chardevs
    assert "file,id=console,path=/run/sbx/vm1/console.log" in chardevs
    assert opt(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert opt(argv, "-serial") == ["chardev:console"]
    devs = opt(argv, "-device")
    assert "virtio-serial-pci,id=vser0" in devs
    assert "virtserialport,bus=vser0.0,chardev=agent,name=spinbox.agent" in devs
    assert not any(d.startswith(("virtio-net", "e1000", "vhost-vsock")) for d in devs)  # no default NIC
    assert not any(d.startswith("virtio-mem") for d in devs)  # no hot-plug room asked for
    assert sum(d.startswith("pcie-root-port") for d in devs) == 4
    assert "-drive" not in argv


def test_kvm_uses_host_cpu(files):
    argv = build_argv(cfg(files), PATHS, Resolved("kvm", "virtio-serial"))
    assert opt(argv, "-accel") == ["kvm"]
    assert opt(argv, "-cpu") == ["host"]


def test_tcg_tb_size(files):
    argv = build_argv(cfg(files, tcg_tb_size_mb=64), PATHS, TCG_SERIAL)
    assert opt(argv, "-accel") == ["tcg,thread=multi,tb-size=64"]


def test_vsock_transport(files):
    argv = build_argv(cfg(files), PATHS, Resolved("tcg", "vsock", cid=7))
    devs = opt(argv, "-device")
    assert "vhost-vsock-pci,id=vsock0,guest-cid=7" in devs
    assert not any(d.startswith(("virtio-serial", "virtserialport")) for d in devs)
    assert not any(c.startswith("socket,id=agent") for c in opt(argv, "-chardev"))
    append = opt(argv, "-append")[0]
    assert "spinbox.transport=vsock" in append.split()
    assert "spinbox.vsock_port=1024" in append.split()


@pytest.mark.parametrize("cid", [None, 2])
def test_vsock_needs_a_cid(files, cid):
    with pytest.raises(ValueError, match="CID"):
        build_argv(cfg(files), PATHS, Resolved("tcg", "vsock", cid=cid))


def test_unresolved_choices_are_refused(files):
    with pytest.raises(ValueError, match="accel"):
        build_argv(cfg(files), PATHS, Resolved("auto", "virtio-serial"))
    with pytest.raises(ValueError, match="transport"):
        build_argv(cfg(files), PATHS, Resolved("tcg", "auto"))


def test_microvm_uses_mmio_devices(files):
    argv = build_argv(cfg(files, machine="microvm"), PATHS, TCG_SERIAL)
    assert opt(argv, "-machine") == ["microvm,acpi=off,memory-backend=ram0"]
    devs = opt(argv, "-device")
    assert "virtio-serial-device,id=vser0" in devs
    assert "virtio-rng-device,rng=rng0" in devs
    assert not any(d.endswith("-pci") or "-pci," in d or d.startswith("pcie-root-port") for d in devs)
    argv = build_argv(cfg(files, machine="microvm"), PATHS, Resolved("tcg", "vsock", cid=3))
    assert "vhost-vsock-device,id=vsock0,guest-cid=3" in opt(argv, "-device")


def test_hotplug_sizing(files):
    argv = build_argv(cfg(files, vcpus=2, max_vcpus=8, memory_mb=512, max_memory_mb=1536), PATHS, TCG_SERIAL)
    assert opt(argv, "-smp") == ["2,maxcpus=8"]
    assert opt(argv, "-m") == ["512M,slots=4,maxmem=1536M"]
    objs = opt(argv, "-object")
    assert "memory-backend-memfd,id=vmem0-mem,size=1024M,share=on" in objs
    assert "virtio-mem-pci,id=vmem0,memdev=vmem0-mem,requested-size=0" in opt(argv, "-device")
    assert "memhp_default_state=online_movable" in opt(argv, "-append")[0].split()


def test_large_maxmem_uses_auto_movable(files):
    argv = build_argv(cfg(files, memory_mb=256, max_memory_mb=2048), PATHS, TCG_SERIAL)
    words = opt(argv, "-append")[0].split()
    assert "memhp_default_state=online" in words and "memory_hotplug.online_policy=auto-movable" in words


def test_pc_dimm_hotplug_has_no_virtio_mem(files):
    argv = build_argv(cfg(files, memory_mb=512, max_memory_mb=1024, memory_hotplug="pc-dimm", memory_slots=2),
                      PATHS, TCG_SERIAL)
    assert opt(argv, "-m") == ["512M,slots=2,maxmem=1024M"]
    assert not any(d.startswith("virtio-mem") for d in opt(argv, "-device"))


def test_ram_backend_is_not_shared(files):
    argv = build_argv(cfg(files, memory_backend="ram"), PATHS, TCG_SERIAL)
    assert "memory-backend-ram,id=ram0,size=256M" in opt(argv, "-object")


def test_root_disk_readonly_with_serial(files):
    k, i, r = files
    c = VMConfig(kernel=k, initrd=i, root_disk=r).validate()
    argv = build_argv(c, PATHS, TCG_SERIAL)
    assert opt(argv, "-drive") == [f"file={r},if=none,id=root,format=raw,readonly=on"]
    assert "virtio-blk-pci,drive=root,serial=spinbox-root" in opt(argv, "-device")


def test_sandbox_off(files):
    assert "-sandbox" not in build_argv(cfg(files, seccomp_sandbox=False), PATHS, TCG_SERIAL)


def test_commas_in_paths_are_escaped(files, tmp_path):
    odd = tmp_path / "a,b"
    odd.mkdir()
    k = odd / "vmlinux"
    k.write_bytes(b"x")
    argv = build_argv(VMConfig(kernel=k).validate(), VMPaths(Path("/run/x,y")), TCG_SERIAL)
    assert opt(argv, "-kernel") == [str(k).replace(",", ",,")]
    assert "socket,id=qmp,path=/run/x,,y/qmp.sock,server=on,wait=off" in opt(argv, "-chardev")
    assert qopt("a,b,c") == "a,,b,,c"


def test_cmdline_order_base_image_extras(files):
    c = cfg(files, image_cmdline="rdinit=/init spinbox.root=serial:spinbox-root", cmdline_extra=["loglevel=7"])
    line = kernel_cmdline(c, TCG_SERIAL).split()
    assert line[:5] == ["console=ttyS0", "quiet", "panic=-1", "reboot=t", "no_timer_check"]
    assert "spinbox.transport=virtio-serial" in line
    assert line.index("rdinit=/init") < line.index("loglevel=7")  # extras last: they win
    assert "memhp_default_state=online_movable" not in line  # no hot-plug room: not needed


def test_socket_paths_too_long_are_refused():
    with pytest.raises(StatePathError, match="too long"):
        VMPaths(Path("/run/" + "x" * 100))


def test_unix_socket_listening_only_after_listen(tmp_path):
    """virtiofsd's socket file exists from bind() on; the shim must wait for listen()."""
    import socket

    from spinbox.shim.vm.devices import unix_socket_listening
    path = tmp_path / "vfs.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert not unix_socket_listening(path)            # nothing bound
        s.bind(str(path))
        assert path.exists() and not unix_socket_listening(path)
        s.listen(1)
        assert unix_socket_listening(path)
    finally:
        s.close()
    assert not unix_socket_listening(path)


def test_unix_socket_listening_parses_proc_net_unix(tmp_path):
    from spinbox.shim.vm.devices import unix_socket_listening
    table = tmp_path / "unix"
    table.write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 1001 /run/a.sock\n"
        "0000000000000000: 00000002 00000000 00000000 0001 01 1002 /run/b.sock\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 1003\n")
    assert unix_socket_listening("/run/a.sock", str(table))
    assert not unix_socket_listening("/run/b.sock", str(table))     # bound, not listening
    assert not unix_socket_listening("/run/c.sock", str(table))
    assert not unix_socket_listening("/run/a.sock", str(tmp_path / "absent"))
