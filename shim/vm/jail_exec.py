"""The QEMU jail's launcher: run as `python -I -S jail_exec.py <spec json> -- <qemu argv>`.

It is exec'd by the shim in place of QEMU (same pid: QEMU is exec'd at the end) and, still as
root, builds QEMU's world before QEMU's first instruction runs:

1. a private mount namespace (nothing it mounts is seen on the host, and all of it goes away
   with the process: no mount to clean up after a crash);
2. a new root: a small read-only tmpfs holding only what QEMU reads (the /usr tree with its
   binary, libraries, firmware and modules; the guest kernel, initrd and image; a few device
   nodes; a private /proc that shows QEMU only its own processes), each bound read-only,
   nosuid, at the same path as on the host so QEMU's argv needs no change; then pivot_root
   into it and detach the old root: the host's files, /run (sockets of containerd and of the
   other sandboxes), /var and /etc are not there at all;
3. the sandbox's own uid and gid (no supplementary groups but the ones named, e.g. /dev/kvm's),
   no_new_privs, resource limits, and the parent-death signal again (a uid change clears it);
4. exec QEMU. Everything QEMU needs to write or connect to (QMP and agent sockets, the console,
   TAP fds, the template state, virtiofsd's connection) is an fd passed in by the shim.

Standalone on purpose: stdlib only, no spinbox import (it runs with -I -S: no site packages,
no environment), so it starts in ~20 ms and a broken venv cannot change what it does. Any
failure exits with status 121 and one line on stderr naming the step (the shim's QEMU log).
"""
import ctypes
import json
import os
import resource
import signal
import stat
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_PIVOT_ROOT = 155          # x86_64
EXIT_JAIL = 121

_libc = ctypes.CDLL(None, use_errno=True)


class JailFailed(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise JailFailed(f"{what}: {os.strerror(e)}")


def _mount(src, dst, fstype, flags, data=None) -> None:
    _check(_libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {src or fstype} on {dst}")


def _bind(src: str, dst: str, *, rdonly: bool, nodev: bool, noexec: bool) -> None:
    """Bind `src` onto `dst` (made: a dir or an empty file like the source) and remount it
    with the flags: a bind mount takes the flags of its own remount, not its source's."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o600))
    _mount(src, dst, None, MS_BIND)         # not MS_REC: submounts of a source stay out
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (MS_RDONLY if rdonly else 0) \
        | (MS_NODEV if nodev else 0) | (MS_NOEXEC if noexec else 0)
    _mount(None, dst, None, flags)


def build_root(spec: dict) -> None:
    new = spec["root"]                       # an empty dir that exists on the host
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)        # nothing propagates back to the host
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in spec["executable"]:          # QEMU, its libraries, firmware (same path inside)
        _bind(path, new + path, rdonly=True, nodev=True, noexec=False)
    for path in spec["read_only"]:           # the guest kernel, initrd, image; the loader cache
        _bind(path, new + path, rdonly=True, nodev=True, noexec=True)
    for link, target in spec["symlinks"]:     # /lib -> usr/lib etc. (merged /usr)
        os.symlink(target, new + link)
    for dev in spec["devices"]:              # char devices QEMU opens (null, urandom, kvm, ...)
        st = os.stat(dev)
        if not stat.S_ISCHR(st.st_mode):
            raise JailFailed(f"{dev} is not a character device")
        _bind(dev, new + dev, rdonly=False, nodev=False, noexec=True)
    os.makedirs(new + "/proc", exist_ok=True)
    # QEMU opens /proc/self/fd/N (a template clone's RAM memfd); it sees no other process
    _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible,subset=pid")
    os.makedirs(new + "/.old", exist_ok=True)
    _check(_libc.syscall(SYS_PIVOT_ROOT, new.encode(), (new + "/.old").encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount the old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def drop(spec: dict) -> None:
    uid, gid = spec["uid"], spec["gid"]
    os.setgroups(spec["groups"])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise JailFailed("the uid/gid change did not take")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    for name, (soft, hard) in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if spec.get("parent"):
        # cleared by the uid change; the parent may have died in the meantime (then we stop)
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        if os.getppid() != spec["parent"]:
            raise JailFailed("the shim exited before QEMU started")


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("jail: usage: jail_exec.py <spec json> -- <program> [args]", file=sys.stderr)
        return EXIT_JAIL
    try:
        spec = json.loads(argv[1])
        build_root(spec)
        drop(spec)
        os.execv(argv[3], argv[3:])
    except (JailFailed, OSError, KeyError, ValueError, TypeError) as e:
        print(f"jail: {e}", file=sys.stderr, flush=True)
    return EXIT_JAIL


if __name__ == "__main__":
    sys.exit(main(sys.argv))
