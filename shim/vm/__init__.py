"""Host VM layer: one QEMU VM per sandbox, controlled over QMP.

    from spinbox.shim.vm import VM, VMConfig, devices

    config = VMConfig.from_share_dir(vcpus=1, max_vcpus=4, memory_mb=256, max_memory_mb=1024)
    vm = VM(config, state_dir)                       # state_dir: short, private (socket paths)
    timeline = await vm.start(probe=agent_ping)      # probe: async () -> raises until ready
    ...  # vm.paths.agent_socket (virtio-serial) / vm.cid (vsock); vm.died; vm.execute(...)
    fs = await devices.add_virtiofs(vm, rootfs, "rootfs")
    await vm.stop(graceful=agent_shutdown)           # idempotent, cleans every file/process

Crash cleanup without a live VM object: `kill_from_state(state_dir)`.
"""
from . import devices
from .accel import Choice, select_accel, select_transport
from .cid import CIDLease, allocate_cid
from .config import GuestImage, VMConfig, VMConfigError, VMTimeouts, image_from_share_dir
from .machine import VM, VMBootError, VMError, VMExit, VMState, VMStateError, kill_from_state

__all__ = [
    "VM", "VMConfig", "VMConfigError", "VMTimeouts", "VMState", "VMExit", "VMError", "VMBootError",
    "VMStateError", "GuestImage", "image_from_share_dir", "kill_from_state", "devices", "Choice",
    "select_accel", "select_transport", "CIDLease", "allocate_cid",
]
