"""A guest that never acknowledges device_del must not keep a share's virtiofsd (and so a
deleted container's files) alive (shim/vm/devices.py Handle.detach)."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from spinbox.shim.vm import devices


class SilentQMP:
    """QMP whose guest never answers an unplug: DEVICE_DELETED never comes."""

    @contextlib.contextmanager
    def listener(self, *names: str):
        yield asyncio.Queue()


class FakePaths:
    def __init__(self, root: Path) -> None:
        self.root = root

    def virtiofs_socket(self, tag: str) -> Path:
        return self.root / f"{tag}.sock"

    def virtiofsd_log(self, tag: str) -> Path:
        return self.root / f"{tag}.log"


class FakeVM:
    def __init__(self, root: Path) -> None:
        self.qmp = SilentQMP()
        self.paths = FakePaths(root)
        self.used_ports = {"hp0"}
        self.executed: list[str] = []
        self.helpers = {"virtiofsd-binds-1"}

    async def execute(self, cmd: str, args: dict | None = None):
        self.executed.append(cmd)
        return {}

    def unregister_helper(self, key: str) -> None:
        self.helpers.discard(key)


async def test_no_device_deleted_kills_virtiofsd_anyway(tmp_path):
    vm = FakeVM(tmp_path)
    proc = await asyncio.create_subprocess_exec("sleep", "60", process_group=0)   # stands in for virtiofsd
    h = devices.VirtioFSHandle(vm, "vfs-binds-1", port="hp0", tag="binds-1", source=tmp_path,  # type: ignore[arg-type]
                               chardev_id="vfs-binds-1-chr", proc=proc)
    try:
        with pytest.raises(devices.DeviceError, match="no DEVICE_DELETED within 0.2 s"):
            await h.detach(timeout=0.2)
        assert proc.returncode is not None, "virtiofsd is gone: the guest reaches no host file any more"
        assert vm.helpers == set()
        assert vm.executed == ["device_del"]
        assert "hp0" in vm.used_ports and not h.detached, "the device may still be in the guest"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
