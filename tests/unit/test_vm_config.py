"""VM config validation (errors name the key) and the image manifest reader."""
from __future__ import annotations

import json

import pytest

from spinbox.shim.vm.config import VMConfig, VMConfigError, image_from_share_dir


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"x")
    return k


def key_of(excinfo) -> str:
    return excinfo.value.key


@pytest.mark.parametrize("field,value,key", [
    ("accel", "hvf", "vm.accel"),
    ("machine", "pc", "vm.machine"),
    ("transport", "tcp", "vm.transport"),
    ("memory_backend", "file", "vm.memory_backend"),
    ("memory_hotplug", "balloon", "vm.memory_hotplug"),
    ("vcpus", 0, "vm.vcpus"),
    ("vcpus", 300, "vm.vcpus"),
    ("memory_mb", 16, "vm.memory_mb"),
    ("memory_slots", -1, "vm.memory_slots"),
    ("pci_hotplug_ports", 99, "vm.pci_hotplug_ports"),
    ("vsock_port", 0, "vm.vsock_port"),
    ("agent_port_name", "bad name", "vm.agent_port_name"),
    ("cmdline_extra", ["a b"], "vm.cmdline_extra"),
    ("tcg_tb_size_mb", 0, "vm.tcg_tb_size_mb"),
    ("ready_marker", "(", "vm.ready_marker"),
])
def test_bad_values_name_the_key(kernel, field, value, key):
    with pytest.raises(VMConfigError) as e:
        VMConfig(kernel=kernel, **{field: value}).validate()
    assert key_of(e) == key
    assert str(e.value).startswith(key + ":")


def test_max_below_boot_values(kernel):
    with pytest.raises(VMConfigError) as e:
        VMConfig(kernel=kernel, vcpus=4, max_vcpus=2).validate()
    assert key_of(e) == "vm.max_vcpus"
    with pytest.raises(VMConfigError) as e:
        VMConfig(kernel=kernel, memory_mb=512, max_memory_mb=256).validate()
    assert key_of(e) == "vm.max_memory_mb"
    with pytest.raises(VMConfigError) as e:
        VMConfig(kernel=kernel, memory_mb=512, max_memory_mb=513).validate()
    assert "multiple of 2 MiB" in str(e.value)


def test_microvm_refuses_hotplug(kernel):
    with pytest.raises(VMConfigError, match="microvm has no vCPU hot-plug") as e:
        VMConfig(kernel=kernel, machine="microvm", max_vcpus=2).validate()
    assert key_of(e) == "vm.max_vcpus"
    with pytest.raises(VMConfigError, match="microvm") as e:
        VMConfig(kernel=kernel, machine="microvm", max_memory_mb=1024).validate()
    assert key_of(e) == "vm.max_memory_mb"
    VMConfig(kernel=kernel, machine="microvm", max_memory_mb=1024, memory_hotplug="none").validate()


def test_missing_files_name_the_key(tmp_path, kernel):
    with pytest.raises(VMConfigError) as e:
        VMConfig(kernel=tmp_path / "nope").validate()
    assert key_of(e) == "vm.kernel" and "nope" in str(e.value)
    with pytest.raises(VMConfigError) as e:
        VMConfig(kernel=kernel, initrd=tmp_path / "nope.cpio").validate()
    assert key_of(e) == "vm.initrd"


def test_bad_timeout_names_nested_key(kernel):
    c = VMConfig(kernel=kernel)
    c.timeouts.boot_s = 0
    with pytest.raises(VMConfigError) as e:
        c.validate()
    assert key_of(e) == "vm.timeouts.boot_s"


def test_from_dict(kernel):
    c = VMConfig.from_dict({"kernel": str(kernel), "vcpus": 2, "max_vcpus": 4, "cmdline_extra": "a=1 b=2",
                            "timeouts": {"boot_s": 12}}, prefix="runtime")
    assert c.vcpus == 2 and c.effective_max_vcpus == 4
    assert c.cmdline_extra == ["a=1", "b=2"]
    assert c.timeouts.boot_s == 12.0 and c.timeouts.quit_s == 2.0
    for data, key in [({"kernel": str(kernel), "vcpu": 2}, "runtime.vcpu"),
                      ({"kernel": str(kernel), "vcpus": "2"}, "runtime.vcpus"),
                      ({"kernel": str(kernel), "seccomp_sandbox": "yes"}, "runtime.seccomp_sandbox"),
                      ({"kernel": str(kernel), "timeouts": {"boot": 1}}, "runtime.timeouts.boot"),
                      ({"kernel": str(kernel), "timeouts": {"boot_s": "1"}}, "runtime.timeouts.boot_s"),
                      ({}, "runtime.kernel")]:
        with pytest.raises(VMConfigError) as e:
            VMConfig.from_dict(data, prefix="runtime")
        assert key_of(e) == key, data


def _share(tmp_path, manifest: dict, files=("vmlinux", "initrd.cpio", "root.erofs")):
    for f in files:
        (tmp_path / f).write_bytes(b"x")
    (tmp_path / "image.json").write_text(json.dumps(manifest))
    return tmp_path


def test_image_manifest(tmp_path):
    d = _share(tmp_path, {"version": 1, "initrd": "initrd.cpio", "root_disk": "root.erofs",
                          "cmdline": "rdinit=/init spinbox.root=serial:spinbox-root"})
    img = image_from_share_dir(d)
    assert img.kernel == d / "vmlinux" and img.initrd == d / "initrd.cpio" and img.root_disk == d / "root.erofs"
    c = VMConfig.from_share_dir(d, vcpus=2)
    assert c.image_cmdline == img.cmdline and c.root_disk == img.root_disk and c.vcpus == 2


def test_image_manifest_without_root_disk(tmp_path):
    d = _share(tmp_path, {"version": 1, "initrd": "initrd.cpio", "root_disk": None, "cmdline": ""})
    assert image_from_share_dir(d).root_disk is None


@pytest.mark.parametrize("manifest,msg", [
    ({"version": 2, "initrd": "initrd.cpio"}, "unsupported manifest version"),
    ({"version": 1, "initrd": "../etc/passwd"}, "bad file name"),
    ({"version": 1, "initrd": "missing.cpio"}, "initrd file missing"),
    ({"version": 1}, "no initrd"),
])
def test_bad_image_manifest(tmp_path, manifest, msg):
    d = _share(tmp_path, manifest)
    with pytest.raises(VMConfigError, match=msg) as e:
        image_from_share_dir(d)
    assert e.value.key == "paths.share_dir"


def test_missing_kernel_or_manifest(tmp_path):
    with pytest.raises(VMConfigError, match="no guest kernel"):
        image_from_share_dir(tmp_path)
    (tmp_path / "vmlinux").write_bytes(b"x")
    with pytest.raises(VMConfigError, match="no guest image manifest"):
        image_from_share_dir(tmp_path)


def test_share_dir_from_env(tmp_path, monkeypatch):
    d = _share(tmp_path, {"version": 1, "initrd": "initrd.cpio"})
    monkeypatch.setenv("SPINBOX_SHARE_DIR", str(d))
    assert image_from_share_dir().initrd == d / "initrd.cpio"
