"""Benchmark section "containerd": spinbox beside runc, same private containerd, same run.

* `ctr run --rm <image> true` wall time, N runs each: min / median / max, ratio of medians;
* `ctr task exec` round trip (`true`) on a running container, N each;
* memory: RSS of spinbox's shim daemon (its Python process), of its QEMU and virtiofsd, and of
  runc's shim (containerd-shim-runc-v2), each with one idle container;
* stdout throughput: `dd if=/dev/zero bs=1M count=100` in an exec, piped out through ctr's
  stdout and read here; timed from the first byte to EOF (process start excluded).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = 5
THROUGHPUT_MB = 100
RUNTIMES = {"spinbox": "io.containerd.spinbox.v1", "runc": "io.containerd.runc.v2"}


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


class Bench:
    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT))
        from integration.containerd import Containerd, missing_prerequisites
        from integration.images import import_busybox

        why = missing_prerequisites()
        share = Path(os.environ.get("SPINBOX_SHARE_DIR", "/usr/share/spinbox"))
        if not (share / "image.json").exists():
            why.append(f"no guest image in {share}")
        if why:
            raise RuntimeError("cannot run: " + "; ".join(why))
        self.c = Containerd.create(path_prefix=[Path(sys.executable).parent],
                                   namespace="spinbox-bench", cri=False)
        try:
            self.ref = import_busybox(self.c)
        except BaseException:
            self.c.cleanup()
            raise

    def close(self) -> None:
        self.c.cleanup()

    def ctr(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return self.c.ctr(*args, check=check, timeout=300, **kw)

    def run_args(self, runtime: str, *extra: str) -> list[str]:
        return ["run", "--runtime", RUNTIMES[runtime], "--fifo-dir", str(self.c.fifo_dir), *extra]

    # -- measurements ---------------------------------------------------------------------

    def run_true(self, runtime: str, *extra: str, tag: str = "") -> list[float]:
        times = []
        for i in range(N):
            t = time.monotonic()
            self.ctr(*self.run_args(runtime, "--rm", *extra), self.ref, f"b-{runtime}{tag}-{i}", "true")
            times.append(time.monotonic() - t)
        return times

    def options(self, name: str, runtime: dict[str, str]) -> list[str]:
        """ctr flags that set spinbox runtime options for one `ctr run` (layered over the config)."""
        path = self.c.base / f"bench-{name}.json"
        path.write_text(json.dumps({"runtime": runtime}))
        return ["--runtime-config-path", str(path)]

    def with_running(self, runtime: str, fn):
        id = f"b-{runtime}-svc"
        self.ctr(*self.run_args(runtime, "-d"), self.ref, id, "sleep", "3600")
        try:
            deadline = time.monotonic() + 60
            while b"RUNNING" not in self.ctr("task", "ls").stdout:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{id} did not start")
                time.sleep(0.1)
            return fn(id)
        finally:
            self.ctr("task", "kill", "-s", "SIGKILL", id, check=False)
            deadline = time.monotonic() + 60
            while b"RUNNING" in self.ctr("task", "ls").stdout and time.monotonic() < deadline:
                time.sleep(0.1)
            self.ctr("task", "delete", id, check=False)
            self.ctr("containers", "delete", id, check=False)

    def exec_times(self, id: str) -> list[float]:
        times = []
        for i in range(N):
            t = time.monotonic()
            self.ctr("task", "exec", "--exec-id", f"x{i}", id, "true")
            times.append(time.monotonic() - t)
        return times

    def shim_memory(self, id: str) -> dict[str, int]:
        # the daemon serving `id` (argv: ... -id <id> ...); `start`/`delete` runs are gone by now
        shims = [p for p in self.c.shim_pids() if id.encode() in _cmdline(p)]
        mem: dict[str, int] = {}
        for pid in shims:
            argv = _cmdline(pid)
            name = os.path.basename(argv[0]).decode()
            if name.startswith("python") or any(b"spinbox" in a for a in argv[:2]):
                mem["shim"] = mem.get("shim", 0) + _rss_kb(pid)
                for child in _children(pid):
                    cname = os.path.basename(_cmdline(child)[0]).decode()
                    key = "qemu" if cname.startswith("qemu-system") else \
                        "virtiofsd" if "virtiofsd" in cname else "other"
                    mem[key] = mem.get(key, 0) + _rss_kb(child)
                    for grandchild in _children(child):   # virtiofsd forks a sandboxed child
                        mem[key] = mem.get(key, 0) + _rss_kb(grandchild)
            elif name.startswith("containerd-shim-runc"):
                mem["shim"] = mem.get("shim", 0) + _rss_kb(pid)
        return mem

    def throughput(self, id: str) -> float:
        """MB/s of `dd` output through exec stdout → ctr → a pipe read here."""
        p = self.c.ctr_popen("task", "exec", "--exec-id", "tput", id, "sh", "-c",
                             f"dd if=/dev/zero bs=1M count={THROUGHPUT_MB} 2>/dev/null",
                             stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, bufsize=0)
        n, first = 0, None
        assert p.stdout is not None
        while True:
            chunk = p.stdout.read(1 << 20)
            if not chunk:
                break
            if first is None:
                first = time.monotonic()
            n += len(chunk)
        end = time.monotonic()
        p.wait(60)
        if p.returncode != 0 or n != THROUGHPUT_MB << 20:
            raise RuntimeError(f"throughput exec: exit {p.returncode}, {n} bytes")
        return n / (end - (first or end)) / 1e6


def _fmt(times: list[float]) -> str:
    return f"{min(times):.3f} / {statistics.median(times):.3f} / {max(times):.3f} s"


def section_containerd():
    b = Bench()
    try:
        # untimed: the first spinbox start builds the VM template if setup did not
        b.ctr(*b.run_args("spinbox", "--rm"), b.ref, "b-warmup", "true")
        run = {rt: b.run_true(rt) for rt in RUNTIMES}
        crun = b.run_true("spinbox", *b.options("crun", {"oci_runtime": "crun"}), tag="-crun")
        cold = b.run_true("spinbox", *b.options("cold", {"start": "cold"}), tag="-cold")
        results: dict[str, dict] = {}
        for rt in RUNTIMES:
            def measure(id, rt=rt):
                time.sleep(2.0)                     # let the guest settle before reading RSS
                return {"exec": b.exec_times(id), "mem": b.shim_memory(id), "mbps": b.throughput(id)}
            results[rt] = b.with_running(rt, measure)
    finally:
        b.close()
    s, r = results["spinbox"], results["runc"]
    med = {rt: statistics.median(run[rt]) for rt in RUNTIMES}
    emed = {rt: statistics.median(results[rt]["exec"]) for rt in RUNTIMES}
    mb = lambda kb: f"{kb / 1024:.1f} MiB"  # noqa: E731
    rows = [
        "| measure | spinbox | runc | spinbox / runc |", "|---|---|---|---|",
        f"| `ctr run --rm <image> true`, min / median / max of {N} | {_fmt(run['spinbox'])} | "
        f"{_fmt(run['runc'])} | {med['spinbox'] / med['runc']:.1f}× |",
        f"| `ctr run --rm <image> true`, cold boot (`runtime.start = cold`), min / median / max of {N} | "
        f"{_fmt(cold)} | {_fmt(run['runc'])} | {statistics.median(cold) / med['runc']:.1f}× |",
        f"| `ctr run --rm <image> true`, guest runtime crun, min / median / max of {N} | {_fmt(crun)} | "
        f"{_fmt(run['runc'])} | {statistics.median(crun) / med['runc']:.1f}× |",
        f"| `ctr task exec <id> true` round trip, min / median / max of {N} | {_fmt(s['exec'])} | "
        f"{_fmt(r['exec'])} | {emed['spinbox'] / emed['runc']:.1f}× |",
        f"| shim daemon RSS (one idle container) | {mb(s['mem'].get('shim', 0))} (Python) | "
        f"{mb(r['mem'].get('shim', 0))} (Go) | {s['mem'].get('shim', 0) / max(1, r['mem'].get('shim', 1)):.1f}× |",
        f"| QEMU RSS (idle guest) | {mb(s['mem'].get('qemu', 0))} | – | |",
        f"| virtiofsd RSS (rootfs share) | {mb(s['mem'].get('virtiofsd', 0))} | – | |",
        f"| stdout throughput, exec `dd` {THROUGHPUT_MB} MiB → ctr → pipe | {s['mbps']:.1f} MB/s | "
        f"{r['mbps']:.1f} MB/s | {s['mbps'] / r['mbps']:.2f}× |",
    ]
    from spinbox.shim.vm.accel import select_accel
    notes = [f"Both runtimes on one private containerd 1.6 in the same run; spinbox boots a QEMU "
             f"microVM per `ctr run` (accel here: {select_accel('auto').value}), runc starts a host "
             f"container. spinbox's VM starts from the VM template of its shape (`runtime.start = "
             f"template`, built before the run) unless a row says cold boot. "
             f"Throughput is timed from the first byte to EOF. The guest runs containers "
             f"with runc unless a row says crun (`runtime.oci_runtime`, here set per `ctr run` "
             f"with --runtime-config-path)."]
    return ("containerd: `ctr` with spinbox vs runc", rows, notes)


SECTIONS = {"containerd": section_containerd}
