"""spinbox config: defaults, every key honoured, errors naming the key, runtime options layers."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from spinbox.api._pb.runtimeoptions.v1 import api_pb2
from spinbox.shim import config as c

# one non-default value per key (the file must be able to change every one of them)
NON_DEFAULT = {
    "paths": {"share_dir": "/opt/sb/share", "state_dir": "/run/sbx", "cni_conf_dir": "/etc/sbcni",
              "cni_bin_dirs": ["/opt/cni2"], "qemu": "/opt/q/qemu", "virtiofsd": "/opt/q/virtiofsd",
              "template_dir": "/run/sbt", "allowed_binaries": ["/opt/q2/qemu"]},
    "runtime": {"vmm": "qemu", "accel": "tcg", "machine": "q35", "transport": "virtio-serial",
                "oci_runtime": "crun", "start": "cold", "pci_hotplug_ports": 9},
    "timeouts": {"boot_s": 90, "shutdown_s": 7.5, "agent_call_s": 3},
    "network": {"enabled": False, "network": "sbnet", "interface": "eth1"},
    "cpu_hotplug": {"vcpus": 2, "max_vcpus": 6},
    "memory_hotplug": {"memory_mb": 512, "max_memory_mb": 1024, "slots": 8, "backend": "pc-dimm"},
    "guest": {"kernel": "/opt/k/vmlinux", "image": "/opt/k/image.json",
              "kernel_cmdline_extra": ["foo=1", "bar"], "debug_console": True,
              "console_log_max_mb": 16},
    "confinement": {"qemu_rlimits": False, "virtiofsd_hardening": False, "host_cgroup": False,
                    "host_cgroup_parent": "/k8s.slice", "qemu_jail": False, "qemu_uid_base": 200000,
                    "qemu_uid_count": 100},
    "autoscale": {"enabled": True, "interval_s": 2.0, "grow_above_pct": 70.0, "shrink_below_pct": 20.0,
                  "sustain_s": 10.0, "cooldown_s": 15.0, "min_vcpus": 2, "max_vcpus": 5},
}


@pytest.fixture(autouse=True)
def no_host_config(tmp_path, monkeypatch):
    """The host's /etc/spinbox/config.json must not leak into these tests."""
    monkeypatch.setattr(c, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent" / "config.json"))


def test_defaults_without_any_file(tmp_path):
    cfg = c.load(env={})  # no SPINBOX_CONFIG and no default file
    assert cfg == c.SpinboxConfig()
    assert cfg.paths.share_dir == "/usr/share/spinbox"
    assert cfg.paths.state_dir == "/run/spinbox"
    assert cfg.paths.cni_bin_dirs == ("/usr/lib/cni", "/opt/cni/bin")
    assert (cfg.runtime.accel, cfg.runtime.machine, cfg.runtime.transport, cfg.runtime.oci_runtime) == \
        ("auto", "q35", "auto", "runc")
    assert cfg.effective_max_vcpus == 4 and cfg.effective_max_memory_mb == 2048


def test_every_key_is_honoured(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(NON_DEFAULT))
    cfg = c.load(env={c.CONFIG_ENV: str(path)})
    assert cfg.to_dict() == NON_DEFAULT | {
        "timeouts": {"boot_s": 90.0, "shutdown_s": 7.5, "agent_call_s": 3.0}}
    # and the schema has no key this test forgot
    for name, section in NON_DEFAULT.items():
        assert set(section) == {f.name for f in dataclasses.fields(type(getattr(cfg, name)))}
    assert cfg.sources == (str(path),)


@pytest.mark.parametrize("data, message", [
    ({"runtime": {"accel": "xen"}}, "runtime.accel: must be one of auto, kvm, tcg (got 'xen')"),
    ({"runtime": {"vmm": "firecracker"}}, "runtime.vmm: must be one of qemu"),
    ({"paths": {"sharedir": "/x"}}, "paths.sharedir: unknown key"),
    ({"gpu": {}}, "gpu: unknown section"),
    ({"cpu_hotplug": {"vcpus": "2"}}, "cpu_hotplug.vcpus: must be an integer"),
    ({"cpu_hotplug": {"vcpus": True}}, "cpu_hotplug.vcpus: must be an integer"),
    ({"cpu_hotplug": {"vcpus": 4, "max_vcpus": 2}}, "cpu_hotplug.max_vcpus: must be >= vcpus"),
    ({"memory_hotplug": {"memory_mb": 32}}, "memory_hotplug.memory_mb: must be >= 64"),
    ({"memory_hotplug": {"backend": "balloon"}}, "memory_hotplug.backend: must be one of"),
    ({"memory_hotplug": {"memory_mb": 256, "max_memory_mb": 257}}, "memory_hotplug.max_memory_mb"),
    ({"network": {"enabled": "yes"}}, "network.enabled: must be true or false"),
    ({"network": {"interface": "a-very-long-interface-name"}}, "network.interface"),
    ({"timeouts": {"boot_s": 0}}, "timeouts.boot_s: must be >= 0.1"),
    ({"runtime": {"pci_hotplug_ports": 33}}, "runtime.pci_hotplug_ports: must be <= 32"),
    ({"paths": {"state_dir": "run/spinbox"}}, "paths.state_dir: must be an absolute path"),
    ({"paths": {"state_dir": "/run/" + "x" * 60}}, "paths.state_dir: must be at most 40 bytes"),
    ({"paths": {"cni_bin_dirs": "/usr/lib/cni"}}, "paths.cni_bin_dirs: must be a list of strings"),
    ({"guest": {"kernel_cmdline_extra": ["a b"]}}, "guest.kernel_cmdline_extra"),
    ({"guest": {"kernel": "vmlinux"}}, "guest.kernel: must be an absolute path"),
    ({"runtime": {"machine": "microvm"}, "cpu_hotplug": {"max_vcpus": 4}}, "cpu_hotplug.max_vcpus: runtime.machine microvm"),
    ({"paths": []}, "paths: must be an object"),
])
def test_bad_values_name_the_key(tmp_path, data, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(c.ConfigError) as ei:
        c.load(env={c.CONFIG_ENV: str(path)})
    assert message in str(ei.value)
    assert str(ei.value).startswith(str(path) + ": ")


def test_microvm_defaults_disable_hotplug():
    cfg = c.from_dict({"runtime": {"machine": "microvm"}, "cpu_hotplug": {"vcpus": 2}})
    assert cfg.effective_max_vcpus == 2
    assert cfg.effective_max_memory_mb == cfg.memory_hotplug.memory_mb


def test_explicit_missing_file_and_bad_json(tmp_path):
    with pytest.raises(c.ConfigError, match="config file not found"):
        c.load(env={c.CONFIG_ENV: str(tmp_path / "nope.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(c.ConfigError, match="not valid JSON"):
        c.load(env={c.CONFIG_ENV: str(bad)})


def _options_any(**kw) -> any_pb2.Any:
    return any_pb2.Any(type_url="runtimeoptions.v1.Options",
                       value=api_pb2.Options(**kw).SerializeToString())


def test_runtime_options_layers(tmp_path):
    base = tmp_path / "config.json"
    base.write_text(json.dumps({"runtime": {"accel": "tcg", "machine": "q35"},
                                "cpu_hotplug": {"vcpus": 2}}))
    over = tmp_path / "over.json"
    over.write_text(json.dumps({"runtime": {"transport": "virtio-serial"}}))
    body = """
TypeUrl = "runtimeoptions.v1.Options"
[cpu_hotplug]
vcpus = 3
max_vcpus = 8
[guest]
kernel_cmdline_extra = ["x=1"]
"""
    cfg = c.load(_options_any(config_path=str(over), config_body=body), env={c.CONFIG_ENV: str(base)})
    assert cfg.runtime.accel == "tcg"              # file
    assert cfg.runtime.transport == "virtio-serial"   # config_path over the file, section merged
    assert cfg.runtime.machine == "q35"              # ... the rest of the file's section kept
    assert cfg.cpu_hotplug.vcpus == 3              # config_body wins
    assert cfg.cpu_hotplug.max_vcpus == 8
    assert cfg.guest.kernel_cmdline_extra == ("x=1",)
    assert cfg.sources == (str(base), str(over), "runtime options config_body")
    # serialized bytes (what start's stdin carries) work the same
    raw = _options_any(config_body="[runtime]\naccel = 'kvm'\n").SerializeToString()
    assert c.load(raw, env={}).runtime.accel == "kvm"


def test_runtime_options_may_only_pick_allowed_binaries(tmp_path):
    """QEMU and virtiofsd run as root: per-container runtime options cannot swap them for any
    binary, only for one the host config file allows."""
    host = tmp_path / "config.json"
    host.write_text(json.dumps({"paths": {"qemu": "/usr/bin/qemu-system-x86_64",
                                          "allowed_binaries": ["/opt/q/qemu", "/opt/q/virtiofsd"]}}))
    env = {c.CONFIG_ENV: str(host)}
    body = "[paths]\nqemu = '/opt/q/qemu'\nvirtiofsd = '/opt/q/virtiofsd'\n"
    cfg = c.load(_options_any(config_body=body), env=env)
    assert (cfg.paths.qemu, cfg.paths.virtiofsd) == ("/opt/q/qemu", "/opt/q/virtiofsd")
    same = "[paths]\nqemu = '/usr/bin/qemu-system-x86_64'\n"          # the host's own value: fine
    assert c.load(_options_any(config_body=same), env=env).paths.qemu == "/usr/bin/qemu-system-x86_64"
    with pytest.raises(c.ConfigError, match=r"paths.qemu: '/tmp/evil' is not allowed from runtime options: "
                                            r"the host config file's paths.allowed_binaries lists /opt/q/qemu"):
        c.load(_options_any(config_body="[paths]\nqemu = '/tmp/evil'\n"), env=env)
    over = tmp_path / "over.json"
    over.write_text(json.dumps({"paths": {"virtiofsd": "virtiofsd"}}))          # a name on PATH
    with pytest.raises(c.ConfigError, match=rf"{over}.*paths.virtiofsd: 'virtiofsd' is not allowed"):
        c.load(_options_any(config_path=str(over)), env=env)
    with pytest.raises(c.ConfigError, match="paths.allowed_binaries: can only be set in the host config file"):
        c.load(_options_any(config_body="[paths]\nallowed_binaries = ['/tmp/evil']\nqemu = '/tmp/evil'\n"),
               env=env)
    # without a host file nothing is allowed but the defaults
    with pytest.raises(c.ConfigError, match="lists none"):
        c.load(_options_any(config_body="[paths]\nvirtiofsd = '/opt/q/virtiofsd'\n"), env={})
    with pytest.raises(c.ConfigError, match="paths.allowed_binaries: entries must be absolute"):
        c.from_dict({"paths": {"allowed_binaries": ["qemu"]}})


def test_config_body_errors_name_the_key():
    with pytest.raises(c.ConfigError, match=r"config_body: runtime.accel: must be one of"):
        c.load(_options_any(config_body="[runtime]\naccel = 'xen'\n"), env={})
    with pytest.raises(c.ConfigError, match="not valid TOML"):
        c.load(_options_any(config_body="[runtime\n"), env={})


def test_toml_config_path_and_foreign_options(tmp_path):
    p = tmp_path / "spinbox.toml"
    p.write_text("[network]\nenabled = false\n")
    assert c.load(_options_any(config_path=str(p)), env={}).network.enabled is False
    # runc's options (another type) are not ours: ignored, defaults stay
    foreign = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"")
    assert c.load(foreign, env={}) == c.SpinboxConfig()


def _image(dir_: Path) -> None:
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "vmlinux").write_bytes(b"k")
    (dir_ / "initrd.img").write_bytes(b"i")
    (dir_ / "image.json").write_text(json.dumps({"version": 1, "initrd": "initrd.img",
                                                 "cmdline": "quiet rdinit=/init"}))


def test_vm_config_carries_every_vm_key(tmp_path):
    share = tmp_path / "share"
    _image(share)
    cfg = c.from_dict({
        "paths": {"share_dir": str(share), "qemu": "/opt/q/qemu", "virtiofsd": "/opt/q/vfsd"},
        "runtime": {"accel": "tcg", "machine": "q35", "transport": "virtio-serial", "pci_hotplug_ports": 7,
                    "oci_runtime": "crun"},
        "timeouts": {"boot_s": 77, "shutdown_s": 4},
        "cpu_hotplug": {"vcpus": 2, "max_vcpus": 5},
        "memory_hotplug": {"memory_mb": 512, "max_memory_mb": 1024, "slots": 3, "backend": "pc-dimm"},
        "guest": {"kernel_cmdline_extra": ["foo=1"], "debug_console": True, "console_log_max_mb": 2},
    })
    vm = c.vm_config(cfg)
    assert vm.kernel == share / "vmlinux" and vm.initrd == share / "initrd.img"
    assert vm.image_cmdline == "quiet rdinit=/init"
    assert (vm.accel, vm.machine, vm.transport) == ("tcg", "q35", "virtio-serial")
    assert vm.pci_hotplug_ports == 7
    assert (vm.vcpus, vm.max_vcpus, vm.memory_mb, vm.max_memory_mb) == (2, 5, 512, 1024)
    assert (vm.memory_slots, vm.memory_hotplug) == (3, "pc-dimm")
    assert (vm.qemu_binary, vm.virtiofsd_binary) == ("/opt/q/qemu", "/opt/q/vfsd")
    assert vm.timeouts.boot_s == 77 and vm.timeouts.shutdown_grace_s == 4
    assert vm.cmdline_extra == ["spinbox.oci_runtime=crun", "foo=1", "loglevel=7"] and vm.keep_console_log is True
    assert vm.console_log_max_bytes == 2 << 20
    assert c.vm_config(cfg, vcpus=3).vcpus == 3      # sizing overrides win


def test_guest_overrides_and_missing_image(tmp_path):
    other = tmp_path / "other"
    _image(other)
    kernel = tmp_path / "custom-vmlinux"
    kernel.write_bytes(b"k2")
    cfg = c.from_dict({"paths": {"share_dir": str(tmp_path / "empty")},
                       "guest": {"image": str(other / "image.json"), "kernel": str(kernel)}})
    vm = c.vm_config(cfg)
    assert vm.kernel == kernel and vm.initrd == other / "initrd.img"
    with pytest.raises(c.ConfigError, match=r"^paths.share_dir: no guest kernel"):
        c.vm_config(c.from_dict({"paths": {"share_dir": str(tmp_path / "empty")}}))


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_config_is_the_defaults_and_documented():
    data = json.loads((EXAMPLES / "config.json").read_text())
    assert c.from_dict(data) == c.SpinboxConfig()
    assert data == c.SpinboxConfig().to_dict()
    doc = (EXAMPLES / "config.md").read_text()
    for section, keys in data.items():
        for key in keys:
            assert f"`{section}.{key}`" in doc, f"{section}.{key} undocumented"


@pytest.mark.parametrize("name, plugin", [
    ("containerd-1.6-1.7.toml", "io.containerd.grpc.v1.cri"),
    ("containerd-2.x.toml", "io.containerd.cri.v1.runtime"),
])
def test_example_containerd_options_are_valid_config_bodies(name, plugin):
    import tomllib
    doc = tomllib.loads((EXAMPLES / name).read_text())
    rt = doc["plugins"][plugin]["containerd"]["runtimes"]["spinbox"]
    assert rt["runtime_type"] == "io.containerd.spinbox.v1"
    # what containerd 1.7+ would send as config_body: the options table as TOML
    body = "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in t.items())
                     for s, t in rt["options"].items())
    c.load(_options_any(config_body=body), env={})


def test_template_dir_defaults_under_the_state_dir_and_must_be_absolute(tmp_path):
    cfg = c.load(env={})
    assert c.template_dir(cfg) == Path("/run/spinbox/templates") and cfg.runtime.start == "template"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"paths": {"template_dir": "rel/dir"}}))
    with pytest.raises(c.ConfigError, match="paths.template_dir"):
        c.load(env={c.CONFIG_ENV: str(bad)})
    bad.write_text(json.dumps({"runtime": {"start": "warm"}}))
    with pytest.raises(c.ConfigError, match="runtime.start"):
        c.load(env={c.CONFIG_ENV: str(bad)})
