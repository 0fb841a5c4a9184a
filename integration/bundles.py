"""Shared builders for the tests that run containers without containerd: a busybox-static rootfs
tree and minimal OCI config.json / process documents (one copy instead of one per test file)."""
from __future__ import annotations

import shutil
from pathlib import Path

# The union of what the tests run; `busybox --install` is avoided so the tree stays tiny.
APPLETS = ("sh", "echo", "cat", "sleep", "tty", "true", "stty", "head", "dd", "trap", "kill",
           "seq", "yes", "mv", "tail", "wc", "read")


def make_busybox_rootfs(d: Path, extra_dirs: tuple[str, ...] = ()) -> None:
    """A rootfs at `d` with /bin/busybox, its applet links and the mount points runc needs."""
    (d / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", d / "bin" / "busybox")
    for a in APPLETS:
        (d / "bin" / a).symlink_to("busybox")
    for x in ("proc", "dev", "sys", "tmp", "etc", *extra_dirs):
        (d / x).mkdir()
    (d / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")


def oci_spec(args: list[str], terminal: bool = False, *, readonly_root: bool = False,
             memory_limit: int | None = None, netns_path: str | None = None,
             tmp_mount: bool = False) -> dict:
    """An OCI config.json for `args`; `netns_path` adds a host network namespace path (which
    the shim/agent must drop: the VM provides the network)."""
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    ]
    if tmp_mount:
        mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev"]})
    namespaces = [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]
    if netns_path:
        namespaces.append({"type": "network", "path": netns_path})
    linux: dict = {"namespaces": namespaces, "maskedPaths": ["/proc/kcore"],
                   "readonlyPaths": ["/proc/sys"]}
    if memory_limit:
        linux["resources"] = {"memory": {"limit": memory_limit, "swap": memory_limit}}
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/",
                    "capabilities": {k: ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"]
                                     for k in ("bounding", "effective", "permitted")},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                    "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": readonly_root},
        "hostname": "box",
        "mounts": mounts,
        "linux": linux,
    }


def oci_process(args: list[str], terminal: bool = False) -> dict:
    """An OCI Process for an exec."""
    return {"args": args, "env": ["PATH=/bin"], "cwd": "/", "terminal": terminal,
            "user": {"uid": 0, "gid": 0}}
