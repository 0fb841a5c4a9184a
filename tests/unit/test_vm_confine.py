"""shim/vm/confine.py: virtiofsd hardening argv, QEMU's rlimits applied in a real child."""
from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from spinbox.shim.vm import confine
from spinbox.shim.vm.config import VMConfig, VMConfigError


def test_virtiofsd_args_sandbox_caps_nofile():
    args = confine.virtiofsd_hardening_args(nofile=1000)
    assert args == ["-o", "sandbox=namespace", "-o", "modcaps=-mknod:-setfcap",
                    "--rlimit-nofile=1000"]


def test_compose_preexec_runs_steps_in_order_and_skips_none():
    seen: list[int] = []
    fn = confine.compose_preexec(lambda: seen.append(1), None, lambda: seen.append(2))
    assert fn is not None
    fn()
    assert seen == [1, 2]
    assert confine.compose_preexec(None, None) is None


def test_qemu_rlimits_reach_the_child():
    limits = confine.qemu_rlimits(nofile=321)
    out = subprocess.run(
        [sys.executable, "-c", "import resource as r; print(r.getrlimit(r.RLIMIT_CORE), r.getrlimit(r.RLIMIT_NOFILE))"],
        preexec_fn=lambda: confine.set_rlimits(limits), capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(0, 0) (321, 321)"
    assert resource.getrlimit(resource.RLIMIT_NOFILE) != (321, 321)   # the parent keeps its own


def test_config_keys_default_on_and_validated(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"x")
    c = VMConfig.from_dict({"kernel": str(k)})
    assert c.qemu_rlimits and c.virtiofsd_hardening
    assert not VMConfig.from_dict({"kernel": str(k), "virtiofsd_hardening": False}).virtiofsd_hardening
    with pytest.raises(VMConfigError, match="vm.qemu_rlimits"):
        VMConfig.from_dict({"kernel": str(k), "qemu_rlimits": "yes"})


def test_confinement_section_reaches_the_vm_config():
    from spinbox.shim import config as cfgmod
    from spinbox.shim.errors import ConfigError
    assert cfgmod.from_dict({}).confinement.virtiofsd_hardening is True
    off = cfgmod.from_dict({"confinement": {"virtiofsd_hardening": False, "qemu_rlimits": False}})
    assert not off.confinement.virtiofsd_hardening and not off.confinement.qemu_rlimits
    with pytest.raises(ConfigError, match="confinement.qemu_rlimits"):
        cfgmod.from_dict({"confinement": {"qemu_rlimits": 1}})
    with pytest.raises(ConfigError, match="confinement.chroot"):
        cfgmod.from_dict({"confinement": {"chroot": True}})
