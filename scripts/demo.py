"""`task demo`: a container in a microVM via containerd.

Until the Shim issue lands, the shim cannot serve containerd yet: this says so and exits non-zero
rather than pretend. It checks what already exists (guest kernel and image in the share dir).
"""
import os
import sys
from pathlib import Path

share = Path(os.environ.get("SPINBOX_SHARE_DIR", "/usr/share/spinbox"))
print("spinbox demo: `ctr run --runtime io.containerd.spinbox.v1` needs the shim (Shim issue), "
      "which is not implemented yet.")
for name in ("vmlinux", "image.json"):
    print(f"  {share / name}: {'present' if (share / name).exists() else 'missing'}")
sys.exit(1)
