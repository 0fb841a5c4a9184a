"""vminitd's channel selection and virtio-serial port discovery (fake sysfs trees)."""
from __future__ import annotations

from spinbox.vminitd import channel, system


def test_find_virtio_port_by_sysfs_name(tmp_path):
    sys_root, dev = tmp_path / "sys", tmp_path / "dev"
    for port, name in (("vport0p1", "spinbox.log"), ("vport0p2", "spinbox.agent")):
        (sys_root / port).mkdir(parents=True)
        (sys_root / port / "name").write_text(name + "\n")
    dev.mkdir()
    assert channel.find_virtio_port("spinbox.agent", str(sys_root), str(dev)) == str(dev / "vport0p2")
    assert channel.find_virtio_port("other", str(sys_root), str(dev)) is None
    (dev / "virtio-ports").mkdir()
    (dev / "virtio-ports" / "spinbox.agent").touch()
    assert channel.find_virtio_port("spinbox.agent", str(sys_root), str(dev)) == str(dev / "virtio-ports" / "spinbox.agent")


def test_choose_transport(monkeypatch):
    monkeypatch.setattr(channel, "vsock_available", lambda: False)
    monkeypatch.setattr(channel, "find_virtio_port", lambda name=None: None)
    assert channel.choose_transport({}) == ("virtio-serial", "spinbox.agent")
    assert channel.choose_transport({"spinbox.transport": "vsock", "spinbox.vsock_port": "2000"}) == ("vsock", "2000")
    assert channel.choose_transport({"spinbox.transport": "bogus"}) == ("virtio-serial", "spinbox.agent")
    monkeypatch.setattr(channel, "vsock_available", lambda: True)
    assert channel.choose_transport({"spinbox.transport": "auto"}) == ("vsock", "1024")
    # Both present: the port the host attached wins over a vsock module without a peer.
    monkeypatch.setattr(channel, "find_virtio_port", lambda name=None: "/dev/vport0p1")
    assert channel.choose_transport({}) == ("virtio-serial", "spinbox.agent")


def test_online_cpus_and_memory_on_fake_sysfs(tmp_path):
    cpu = tmp_path / "cpu"
    for i, state in ((1, "1"), (2, "0"), (3, "0")):
        (cpu / f"cpu{i}").mkdir(parents=True)
        (cpu / f"cpu{i}" / "online").write_text(state)
    (cpu / "online").write_text("0-1\n")
    (cpu / "present").write_text("0-3\n")
    r = system.online_cpus(str(cpu))
    assert r["onlined"] == 2 and r["present"] == 4
    assert (cpu / "cpu2" / "online").read_text() == "1"
    mem = tmp_path / "mem"
    for i, state in ((0, "online"), (1, "offline")):
        (mem / f"memory{i}").mkdir(parents=True)
        (mem / f"memory{i}" / "state").write_text(state)
    r = system.online_memory(str(mem))
    assert r["blocks_onlined"] == 1 and r["blocks_online"] == 2
    assert (mem / "memory1" / "state").read_text() == "online_movable"
