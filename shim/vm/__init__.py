"""Host VM layer: QEMU + QMP for one sandbox VM (see machine.VM)."""
