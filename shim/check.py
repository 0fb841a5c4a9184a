"""`spinbox check`: can this host run spinbox sandboxes? Then prove it by booting one.

Static checks: QEMU (version), KVM, vsock and vhost-net (usable or why not), the guest kernel and
image in the share dir (kernel.json / image.json versions), runc in the image, virtiofsd,
containerd on PATH. Then one test VM is booted end to end and a real container runs in it
through the agent API: `uname -a` in a container whose rootfs is a read-only bind of the guest's
own root (so the check needs nothing on the host beyond QEMU and the image). Boot time and the
boot timeline are printed.

Exit status: 0 when everything required is there and the test VM ran the container; 1 otherwise
(each failure is one line saying what is missing and how to get it). KVM, vsock and vhost-net are optional
(TCG and virtio-serial work, only slower): they are reported as warnings.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .vm import accel as accel_mod
from .vm.config import DEFAULT_QEMU, DEFAULT_VIRTIOFSD, VMConfig, VMConfigError, share_dir_path

OK, WARN, FAIL = "ok", "warn", "FAIL"
CHECK_CONTAINER_ID = "spinbox-check"
CONTAINER_TIMEOUT_S = 120.0


@dataclass
class Report:
    lines: list[tuple[str, str, str]] = field(default_factory=list)   # (status, what, detail)

    def add(self, status: str, what: str, detail: str) -> None:
        self.lines.append((status, what, detail))
        print(f"  [{status:<4}] {what}: {detail}", flush=True)

    def note(self, text: str) -> None:
        print(f"           {text}", flush=True)

    @property
    def failures(self) -> list[tuple[str, str, str]]:
        return [ln for ln in self.lines if ln[0] == FAIL]

    @property
    def warnings(self) -> list[tuple[str, str, str]]:
        return [ln for ln in self.lines if ln[0] == WARN]


def _first_line(argv: list[str]) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (p.stdout or p.stderr).strip().splitlines()
    return out[0].strip() if p.returncode == 0 and out else None


def check_qemu(r: Report) -> bool:
    path = shutil.which(DEFAULT_QEMU)
    if path is None:
        r.add(FAIL, "qemu", f"{DEFAULT_QEMU} not found on PATH (apt-get install qemu-system-x86)")
        return False
    version = _first_line([path, "--version"])
    if version is None:
        r.add(FAIL, "qemu", f"{path} --version failed")
        return False
    m = re.search(r"version (\S+)", version)
    r.add(OK, "qemu", f"{path} {m.group(1) if m else version} ({version})")
    return True


# Optional host features: name, status function, (ok word, missing word), what runs without it.
OPTIONAL_FEATURES = (
    ("kvm", accel_mod.kvm_status, ("usable", "not usable"), "guests run under TCG (slower)"),
    ("vsock", accel_mod.vsock_status, ("available", "not available"), "the agent channel uses virtio-serial"),
    ("vhost-net", accel_mod.vhost_net_status, ("available", "not available"),
     "sandbox NICs use QEMU's userspace virtio-net"),
)


def check_optional_features(r: Report) -> None:
    for name, status, (ok_word, missing_word), fallback in OPTIONAL_FEATURES:
        usable, why = status()
        if usable:
            r.add(OK, name, f"{ok_word}: {why}")
        else:
            r.add(WARN, name, f"{missing_word}: {why}; {fallback}")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_guest_files(r: Report, share: Path) -> bool:
    good = True
    kernel = share / "vmlinux"
    if not kernel.is_file():
        r.add(FAIL, "kernel", f"no guest kernel at {kernel} (build it: task build:kernel)")
        good = False
    else:
        kj = _read_json(share / "kernel.json")
        if kj is None:
            r.add(WARN, "kernel", f"{kernel} present, but no readable {share / 'kernel.json'} (version unknown)")
        else:
            r.add(OK, "kernel", f"{kernel} release {kj.get('release', '?')} "
                               f"({kj.get('source_package', '?')} {kj.get('source_version', '?')}, "
                               f"hash {str(kj.get('hash', '?'))[:12]})")
    manifest_path = share / "image.json"
    if not manifest_path.is_file():
        r.add(FAIL, "image", f"no guest image manifest at {manifest_path} (build it: task build:initrd)")
        return False
    if not good:
        r.add(WARN, "image", f"{manifest_path} present; not checked further without a kernel")
        return False
    try:
        from .vm.config import image_from_share_dir
        image = image_from_share_dir(share)
    except VMConfigError as e:
        r.add(FAIL, "image", str(e).removeprefix("paths.share_dir: "))
        return False
    m = image.manifest
    files = image.initrd.name + (f" + {image.root_disk.name}" if image.root_disk else "")
    r.add(OK, "image", f"{share / 'image.json'} hash {str(m.get('hash', '?'))[:12]}: {files}; "
                       f"python {m.get('python', '?')}, busybox {m.get('busybox', '?')}")
    if m.get("runc"):
        r.add(OK, "runc in image", f"runc {m['runc']}" + (f" (crun {m['crun']} too)" if m.get("crun") else ""))
    else:
        r.add(FAIL, "runc in image", "image.json names no runc: rebuild the image (task build:initrd)")
        good = False
    return good


def check_virtiofsd(r: Report) -> None:
    if os.access(DEFAULT_VIRTIOFSD, os.X_OK):
        r.add(OK, "virtiofsd", f"{DEFAULT_VIRTIOFSD} (rootfs sharing into the guest)")
    else:
        r.add(FAIL, "virtiofsd", f"{DEFAULT_VIRTIOFSD} not found (apt-get install qemu-system-common); "
                                 "container rootfs cannot be shared into the guest")


def check_confinement(r: Report) -> None:
    """Which confinement of QEMU and virtiofsd is in force (shim/vm/confine.py, docs/security.md)."""
    from .vm.confine import QEMU_NOFILE, VIRTIOFSD_DROPPED_CAPS
    from .vm.hostcgroup import describe as cgroup_state
    r.add(OK, "confinement: QEMU", "seccomp -sandbox on (no exec, setuid, obsolete calls); "
                                   f"RLIMIT_CORE 0, RLIMIT_NOFILE {QEMU_NOFILE}")
    r.add(OK, "confinement: virtiofsd", "namespace sandbox + its seccomp filter; capabilities dropped: "
                                        + ", ".join(VIRTIOFSD_DROPPED_CAPS) + "")
    ok, why = cgroup_state()
    r.add(OK if ok else WARN, "confinement: host cgroup", why)
    r.add(WARN, "confinement: not in force", "virtiofsd runs as root in its own namespace sandbox and keeps "
                                             "CAP_SETUID/SETGID (per-request guest credentials); template "
                                             "builds run QEMU unjailed (they write the template's RAM file)")


def check_containerd(r: Report) -> None:
    path = shutil.which("containerd")
    if path is None:
        r.add(FAIL, "containerd", "not found on PATH (apt-get install containerd)")
        return
    version = _first_line([path, "--version"])
    if version is None:
        r.add(FAIL, "containerd", f"{path} --version failed")
        return
    r.add(OK, "containerd", f"{path}: {version}")


def _check_spec() -> dict:
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/busybox", "uname", "-a"], "env": ["PATH=/bin:/usr/bin"], "cwd": "/",
                    "user": {"uid": 0, "gid": 0}, "terminal": False, "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "spinbox-check",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "mode=755", "size=1024k"]}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]},
    }


async def _boot_and_run(r: Report, share: Path) -> bool:
    from .agent import Mount
    from .guest import boot_guest

    state = Path(tempfile.mkdtemp(prefix="spinbox-check-", dir="/tmp"))
    guest = None
    try:
        config = VMConfig.from_share_dir(share)
        t0 = time.monotonic()
        try:
            guest = await boot_guest(state / "vm", config, name="spinbox-check")
        except Exception as e:
            r.add(FAIL, "boot", f"test VM did not boot: {e}")
            return False
        vm = guest.vm
        r.add(OK, "boot", f"guest ready in {guest.boot_seconds:.2f} s (host wall {time.monotonic() - t0:.2f} s; "
                          f"accel {vm.accel.value if vm.accel else '?'}, transport "
                          f"{vm.transport.value if vm.transport else '?'}, machine {config.machine}, "
                          f"{config.vcpus} vCPU, {config.memory_mb} MiB)")
        if vm.qemu_uid is not None:
            r.add(OK, "confinement: QEMU jail", f"QEMU (pid {vm.pid}) runs as uid {vm.qemu_uid} with no_new_privs, "
                                                "in a mount namespace whose root holds only /usr, the guest "
                                                "files and device nodes; sockets passed as fds")
        else:
            r.add(WARN, "confinement: QEMU jail", "QEMU runs as root: " + (vm.jail_problem or "confinement.qemu_jail "
                                                                           "is off"))
        r.note("timeline (s since QEMU exec; guest_* = guest uptime): "
               + " ".join(f"{k}={v:.2f}" for k, v in guest.timeline.items()))
        agent = guest.agent
        info = await agent.info()
        version = await agent.version()
        r.add(OK, "agent", f"vminitd {version.agent_version} ({version.api}), runtime {version.runtime}, "
                           f"kernel {info.kernel}, {info.cpus_online} CPU, memory used "
                           f"{info.memory_used_bytes / 2**20:.0f} of {info.memory_total_bytes / 2**20:.0f} MiB")
        try:
            t1 = time.monotonic()
            # the guest's own root, bound read-only: a real OCI container without host files
            await agent.create(CHECK_CONTAINER_ID, _check_spec(),
                               rootfs_mounts=[Mount("bind", "/", "", ("bind", "ro"))], readonly=True,
                               stdout=True, stderr=True)
            out = agent.open_output(CHECK_CONTAINER_ID, "", 1)
            err = agent.open_output(CHECK_CONTAINER_ID, "", 2)

            async def collect(s) -> bytes:
                return b"".join([c async for c in s])
            await agent.start(CHECK_CONTAINER_ID)
            o, err_bytes = await asyncio.wait_for(asyncio.gather(collect(out), collect(err)), CONTAINER_TIMEOUT_S)
            ex = await asyncio.wait_for(agent.wait(CHECK_CONTAINER_ID), CONTAINER_TIMEOUT_S)
            await agent.delete(CHECK_CONTAINER_ID)
            took = time.monotonic() - t1
        except Exception as e:
            r.add(FAIL, "container", f"running `uname -a` in a container in the guest failed: {e}")
            return False
        text = o.decode(errors="replace").strip()
        if ex.exit_status != 0 or "Linux" not in text:
            r.add(FAIL, "container", f"`uname -a` exited {ex.exit_status}: stdout {text!r} "
                                     f"stderr {err_bytes.decode(errors='replace').strip()!r}")
            return False
        r.add(OK, "container", f"`uname -a` in a {version.runtime} container in the guest ({took:.2f} s, exit 0): "
                               f"{text}")
        return True
    finally:
        if guest is not None:
            await guest.stop()
        shutil.rmtree(state, ignore_errors=True)


def run_check(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    share = share_dir_path()
    r = Report()
    print(f"spinbox check (share dir {share})", flush=True)
    qemu_ok = check_qemu(r)
    check_optional_features(r)
    files_ok = check_guest_files(r, share)
    check_virtiofsd(r)
    check_confinement(r)
    check_containerd(r)
    if qemu_ok and files_ok:
        asyncio.run(_boot_and_run(r, share))
    else:
        r.add(FAIL, "boot", "skipped: " + ("QEMU" if not qemu_ok else "the guest kernel/image") + " is missing")
    if r.failures:
        print(f"spinbox check: FAILED ({len(r.failures)} problem(s): "
              + "; ".join(what for _, what, _ in r.failures) + ")", flush=True)
        return 1
    print(f"spinbox check: OK ({len(r.warnings)} warning(s))", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_check())
