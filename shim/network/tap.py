"""TAP devices and the tc mirred "tcfilter" wiring (Kata's default model).

All functions here are blocking and must run inside the sandbox netns (netns.run_in): a TAP and
a netlink socket belong to the netns of the thread that creates them.

The TAP is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and is not persistent: its lifetime is
that of its fds (ours and QEMU's) or of the netns, so a crashed shim leaves no TAP behind once
QEMU is gone. QEMU's `-netdev tap,fd=` probes IFF_VNET_HDR on the fd (TUNGETIFF) and then uses
virtio-net headers (checksum/GSO offload); without it QEMU falls back to plain frames.
"""
from __future__ import annotations

import fcntl
import logging
import os
import struct
from typing import Any

from spinbox.shim.errors import HostError

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
VNET_HDR_LEN = 10          # struct virtio_net_hdr: what a reader of a fresh IFF_VNET_HDR fd sees
TC_H_INGRESS_PARENT = 0xFFFF0000
ETH_P_ALL = 0x0003


class TapError(HostError):
    """A TAP could not be created or wired (names the TAP or link)."""


def open_tap(name: str, vnet_hdr: bool = True) -> int:
    """Create the TAP `name` in the calling thread's netns and return its (close-on-exec) fd."""
    if not name or len(name.encode()) > 15:
        raise TapError(f"invalid TAP name {name!r}: 1-15 bytes")
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError as e:
        os.close(fd)
        raise TapError(f"TUNSETIFF {name}: {e.strerror}") from None
    return fd


def tap_flags(fd: int) -> tuple[str, int]:
    """(name, flags) of an open TAP fd: what QEMU's vnet_hdr probe looks at."""
    out = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    name, flags = struct.unpack("16sH22x", out)
    return name.rstrip(b"\0").decode(), flags


def add_redirect(ipr: Any, src_idx: int, dst_idx: int) -> None:
    """Everything arriving on src is sent out of dst: ingress qdisc + u32 match-all filter with
    action mirred egress redirect (`tc filter add dev SRC parent ffff: protocol all u32 match
    u8 0 0 action mirred egress redirect dev DST`)."""
    ipr.tc("add", "ingress", src_idx)
    ipr.tc("add-filter", "u32", src_idx, parent=TC_H_INGRESS_PARENT, protocol=ETH_P_ALL, prio=49152,
           keys=["0x0/0x0+0"], target=0x10001,     # pyroute2 needs a target (classid) for u32
           action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst_idx})


def remove_ingress(ipr: Any, idx: int) -> None:
    """Delete the ingress qdisc (and with it the filters) of a link; missing is fine."""
    try:
        ipr.tc("del", "ingress", idx)
    except Exception as e:   # pyroute2 NetlinkError: ENOENT/EINVAL when there is none
        if getattr(e, "code", None) not in (2, 22):
            raise
