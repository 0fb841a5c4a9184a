"""The guest image built by initrd/build.py boots with our kernel under QEMU (TCG, q35).

`spinbox.selftest=1` on the kernel command line makes the guest's stage 2 (instead of vminitd)
import vminitd's dependencies with the guest's Python, print IMAGE-OK, run `runc --version`,
report what filesystem / is, and power off. The image and the kernel come from the share dir:
`task build:kernel` and `task build:initrd` put them there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 180  # a hang guard only; a normal TCG boot + selftest takes a few seconds


def _share_dir() -> Path:
    return Path(os.environ.get("SPINBOX_SHARE_DIR", "/usr/share/spinbox"))


def _skip_or_fail(msg: str) -> None:
    # Same convention as integration/conftest.py: CI sets SPINBOX_REQUIRE_INTEGRATION.
    if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
        pytest.fail(msg + " (SPINBOX_REQUIRE_INTEGRATION is set)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def image() -> tuple[Path, dict]:
    share = _share_dir()
    kernel = share / "vmlinux"
    if not kernel.is_file():
        _skip_or_fail(f"guest kernel {kernel} not built: run `task build:kernel`")
    manifest_path = share / "image.json"
    if not manifest_path.is_file():
        _skip_or_fail(f"guest image manifest {manifest_path} missing: run `task build:initrd`")
    if shutil.which(QEMU) is None:
        _skip_or_fail(f"{QEMU} not installed (apt-get install qemu-system-x86)")
    manifest = json.loads(manifest_path.read_text())
    for key in ("initrd", "root_disk"):
        if manifest.get(key) and not (share / manifest[key]).is_file():
            _skip_or_fail(f"{key} {share / manifest[key]} named in image.json is missing: "
                          "rebuild with `task build:initrd`")
    return share, manifest


def _boot(share: Path, manifest: dict, flags: str, tmp_path: Path) -> str:
    """Boot to power-off; returns the serial console. QEMU is always gone afterwards."""
    argv = [QEMU, "-accel", "tcg", "-M", "q35", "-cpu", "max", "-m", "512", "-smp", "1",
            "-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
            "-serial", "stdio", "-kernel", str(share / "vmlinux"),
            "-initrd", str(share / manifest["initrd"]),
            "-append", f"console=ttyS0 panic=-1 {manifest['cmdline']} {flags}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={tmp_path / 'agent.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=spinbox.agent"]
    if manifest.get("root_disk"):
        assert manifest["root_disk_format"] == "erofs", manifest
        argv += ["-drive", f"file={share / manifest['root_disk']},if=none,id=spinbox-root,"
                           "format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=spinbox-root,serial=spinbox-root"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=BOOT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail("guest did not power off within the hang guard:\n"
                    + out.decode(errors="replace")[-6000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out.decode(errors="replace")


def test_manifest_names_what_the_host_needs(image):
    share, manifest = image
    assert manifest["version"] == 1
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["hash"])
    assert manifest["root_disk_format"] in ("erofs", None)
    assert (manifest["root_disk"] is None) == (manifest["root_disk_format"] is None)
    assert "rdinit=/init" in manifest["cmdline"]
    assert manifest["python"].startswith("3.11") and manifest["runc"]


def test_image_switches_root_and_runs_python_and_runc(image, tmp_path):
    share, manifest = image
    console = _boot(share, manifest, "spinbox.selftest=1", tmp_path)
    assert "spinbox-init: stage1" in console, console
    assert "spinbox-init: switch_root" in console, console
    m = re.search(r"spinbox-init: stage2 root=(\S+)", console)
    assert m, console
    # runc's pivot_root fails on the initramfs root: / must be a real filesystem now.
    assert m.group(1) not in ("rootfs", "ramfs"), console
    assert m.group(1) == ("overlay" if manifest["root_disk"] else "tmpfs"), console
    assert re.search(r"IMAGE-OK python 3\.11\.\d+ protobuf \S+ upb", console), console
    assert "IMAGE-FAIL" not in console, console
    assert "runc version 1." in console, console
    assert "spinbox-init: selftest-done" in console, console
