"""`task demo`: a container in its own QEMU microVM, driven by the real `ctr` and containerd.

1. checks the system packages and the guest kernel + image (installed by scripts/setup);
2. starts a PRIVATE containerd (own root, state and socket under a temp dir: a system
   containerd, if any, is never touched) whose PATH finds our containerd-shim-spinbox-v1;
3. builds a busybox OCI image locally and imports it (no registry needed);
4. `ctr run --rm --runtime io.containerd.spinbox.v1 <image> demo uname -a`: the guest's kernel,
   not the host's;
5. `ctr task exec` into a running container, and an exit code coming back;
6. its network: the shim ran CNI (examples/cni/10-spinbox.conflist, Debian's bridge +
   host-local plugins) in a netns of its own and plugged it into the VM: the container's
   address, its route, a ping to the bridge gateway;
7. prints the timings and stops everything it started (also on ^C or an error).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from integration.containerd import Containerd, ContainerdError  # noqa: E402
from integration.images import import_busybox                    # noqa: E402

RUNTIME = "io.containerd.spinbox.v1"
SHIM_DIR = Path(sys.executable).parent            # .venv/bin holds containerd-shim-spinbox-v1
SHARE_DIR = Path(os.environ.get("SPINBOX_SHARE_DIR", "/usr/share/spinbox"))
NAMESPACE = "spinbox-demo"
EXAMPLE_CONFLIST = ROOT / "examples" / "cni" / "10-spinbox.conflist"
DEMO_BRIDGE = json.loads(EXAMPLE_CONFLIST.read_text())["plugins"][0]["bridge"]

BOLD, DIM, GREEN, RED, RESET = ("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m") \
    if sys.stdout.isatty() else ("",) * 5


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def show_cmd(argv: list[str]) -> None:
    print(f"{GREEN}$ {shlex.join(argv)}{RESET}", flush=True)


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())


# ---------------------------------------------------------------------------------------------
# 1. prerequisites

def missing_prerequisites() -> list[str]:
    why = []
    if os.geteuid() != 0:
        why.append("run as root (containerd, mounts and QEMU need it)")
    for tool, pkg in (("containerd", "containerd"), ("ctr", "containerd"), ("runc", "runc"),
                      ("qemu-system-x86_64", "qemu-system-x86")):
        if shutil.which(tool) is None:
            why.append(f"`{tool}` not found (Debian package {pkg})")
    if not Path("/usr/lib/qemu/virtiofsd").exists():
        why.append("/usr/lib/qemu/virtiofsd not found (Debian package qemu-system-common)")
    if not Path("/bin/busybox").exists():
        why.append("/bin/busybox not found (Debian package busybox-static; the demo image uses it)")
    for name in ("image.json", "vmlinux"):
        if not (SHARE_DIR / name).exists():
            why.append(f"guest {'image' if name == 'image.json' else 'kernel'} {SHARE_DIR / name} "
                       f"missing (`.venv/bin/task build`)")
    if not (SHIM_DIR / "containerd-shim-spinbox-v1").exists():
        why.append(f"{SHIM_DIR}/containerd-shim-spinbox-v1 missing (pip install -e .)")
    return why


# ---------------------------------------------------------------------------------------------
# the demo

class Demo:
    def __init__(self) -> None:
        self.c: Containerd | None = None
        self.work = Path("/nonexistent")
        self.bridge_existed = True
        self.timings: list[tuple[str, float]] = []
        self.running: list[str] = []        # detached tasks to stop at the end

    def ctr(self, *args: str, check: bool = True, echo: bool = True) -> subprocess.CompletedProcess:
        """Run ctr against the private containerd, echoing the command (without the
        --address/--namespace plumbing, shown once at the start)."""
        assert self.c is not None
        if echo:
            show_cmd(["ctr", *args])
        t = time.monotonic()
        r = subprocess.run(self.c.ctr_argv(*args), capture_output=True, timeout=300)
        dt = time.monotonic() - t
        out = (r.stdout + r.stderr).decode(errors="replace")
        if echo and out.strip():
            print(indent(out))
        if check and r.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)} failed with exit code {r.returncode}")
        r.seconds = dt  # type: ignore[attr-defined]
        return r

    def timed(self, what: str, seconds: float) -> None:
        self.timings.append((what, seconds))
        print(f"{DIM}    ({what}: {seconds:.2f} s){RESET}")

    def run(self) -> None:
        step("1. prerequisites")
        why = missing_prerequisites()
        if why:
            print(f"{RED}spinbox demo cannot run:{RESET}")
            for w in why:
                print(f"  - {w}")
            print("Install them with ./scripts/setup (as root), then run `.venv/bin/task demo` again.")
            raise SystemExit(1)
        img = SHARE_DIR / "image.json"
        print(f"containerd, ctr, runc, QEMU, virtiofsd present; guest kernel and image in {SHARE_DIR}")
        ver = subprocess.run(["containerd", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"{DIM}{ver}; image manifest {img}{RESET}")

        step("2. a private containerd (temp root/state/socket; the system one is not touched)")
        t = time.monotonic()
        self.bridge_existed = _link_exists(DEMO_BRIDGE)
        self.work = Path(tempfile.mkdtemp(prefix="spinbox-demo-", dir="/tmp"))
        conf_dir = self.work / "cni"
        conf_dir.mkdir()
        shutil.copy(EXAMPLE_CONFLIST, conf_dir / EXAMPLE_CONFLIST.name)
        cfg = self.work / "config.json"
        cfg.write_text(json.dumps({"paths": {"cni_conf_dir": str(conf_dir)}}))
        self.c = Containerd.create(path_prefix=[SHIM_DIR], namespace=NAMESPACE, cri=False,
                                   env={"SPINBOX_CONFIG": str(cfg)})
        self.timed("containerd up", time.monotonic() - t)
        print(f"socket {self.c.address}; ctr below runs with "
              f"--address {self.c.address} --namespace {NAMESPACE}")
        print(f"containerd finds containerd-shim-spinbox-v1 on its PATH in {SHIM_DIR}")
        print(f"the shim's config (SPINBOX_CONFIG) points its CNI conf dir at a copy of "
              f"{EXAMPLE_CONFLIST.relative_to(ROOT)}")

        step("3. a busybox OCI image, built locally and imported")
        t = time.monotonic()
        ref = import_busybox(self.c)
        self.timed("image build + import", time.monotonic() - t)
        self.ctr("images", "ls", "-q")
        fifo = ["--fifo-dir", str(self.c.fifo_dir)]

        step("4. uname -a in a microVM")
        show_cmd(["uname", "-a"])
        print(indent(subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout) + "   (the host)")
        r = self.ctr("run", "--rm", "--runtime", RUNTIME, *fifo, ref, "demo", "uname", "-a")
        self.timed("ctr run --rm ... uname -a (VM boot + container + teardown)", r.seconds)
        fields = r.stdout.decode().split()
        guest_kernel = fields[2] if len(fields) > 2 else "?"
        print(f"host kernel:  {platform.release()}\nguest kernel: {guest_kernel}  "
              f"{'(a different kernel: the container ran in its own VM)' if guest_kernel != platform.release() else '(SAME as the host?!)'}")

        step("5. exec into a running container, and exit codes")
        r = self.ctr("run", "-d", "--runtime", RUNTIME, *fifo, ref, "demo-exec", "sleep", "3600")
        self.running.append("demo-exec")
        self.timed("ctr run -d (VM boot + container start)", r.seconds)
        self.ctr("task", "ls")
        r = self.ctr("task", "exec", "--exec-id", "hello", "demo-exec",
                     "sh", "-c", "echo hello from $(hostname), kernel $(uname -r); ps")
        self.timed("ctr task exec round trip", r.seconds)
        r = self.ctr("task", "exec", "--exec-id", "three", "demo-exec", "sh", "-c", "exit 3", check=False)
        print(f"exit code: {r.returncode}")
        if r.returncode != 3:
            raise ContainerdError(f"expected exit code 3, got {r.returncode}")

        step("6. the container's network (CNI in the shim, a TAP into the VM)")
        r = self.ctr("task", "exec", "--exec-id", "addr", "demo-exec", "sh", "-c",
                     "ip -4 -o addr show dev eth0; ip route")
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", r.stdout.decode())
        gw = re.search(r"default via (\d+\.\d+\.\d+\.\d+)", r.stdout.decode())
        if not m or not gw:
            raise ContainerdError("the container has no IPv4 address or default route on eth0")
        print(f"container address {m.group(1)} (from CNI host-local), gateway {gw.group(1)} (bridge {DEMO_BRIDGE})")
        r = self.ctr("task", "exec", "--exec-id", "ping", "demo-exec", "ping", "-c", "3", gw.group(1))
        self.timed("ping -c 3 gateway (exec round trip included)", r.seconds)
        self.ctr("task", "kill", "-s", "SIGKILL", "demo-exec")
        t = time.monotonic()
        while b"STOPPED" not in self.ctr("task", "ls", echo=False).stdout:
            if time.monotonic() - t > 60:
                raise ContainerdError("demo-exec did not stop after SIGKILL")
            time.sleep(0.1)
        self.ctr("task", "delete", "demo-exec")
        self.ctr("containers", "delete", "demo-exec")
        self.running.remove("demo-exec")

    def stop(self) -> None:
        if self.c is None:
            return
        step("stopping everything the demo started")
        for id in self.running:
            self.ctr("task", "kill", "-s", "SIGKILL", id, check=False, echo=False)
            time.sleep(1)
            self.ctr("task", "delete", "--force", id, check=False, echo=False)
            self.ctr("containers", "delete", id, check=False, echo=False)
        self.c.cleanup()
        print(f"containerd stopped, {self.c.base} removed")
        if not self.bridge_existed and _link_exists(DEMO_BRIDGE):
            # CNI DEL releases the sandbox's veth and address, never the bridge itself
            subprocess.run(["ip", "link", "del", DEMO_BRIDGE], capture_output=True)
            print(f"bridge {DEMO_BRIDGE} removed")
        shutil.rmtree(self.work, ignore_errors=True)

    def summary(self) -> None:
        step("timings")
        width = max(len(w) for w, _ in self.timings)
        for what, s in self.timings:
            print(f"  {what:<{width}}  {s:6.2f} s")
        print(f"{DIM}  guests run under {accel_note()}{RESET}")


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def accel_note() -> str:
    try:
        from spinbox.shim.vm.accel import select_accel
        return str(select_accel("auto"))
    except Exception:
        return "TCG or KVM, whichever the runtime picked (see the shim log)"


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)     # interleave with task's own output in order
    demo = Demo()
    ok = False
    try:
        demo.run()
        ok = True
    except SystemExit:
        raise
    except (ContainerdError, subprocess.TimeoutExpired) as e:
        print(f"{RED}demo failed: {e}{RESET}")
        if demo.c is not None:
            print(indent(demo.c.log_tail(30)))
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        demo.stop()
    if ok:
        demo.summary()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
