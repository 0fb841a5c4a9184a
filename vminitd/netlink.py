"""A minimal rtnetlink client for the guest: links, addresses and routes, stdlib only.

pyroute2 is not in the guest image and busybox `ip` costs an exec per step; the few requests
Configure needs are a handful of fixed C structs plus attributes, so they are encoded here.

The protocol part is sans-IO (build request bytes, parse reply bytes) so it is unit-tested
without a kernel; `RtnlSocket` only sends, receives and matches sequence numbers. Everything is
in host byte order, as netlink is. Malformed replies raise `NetlinkParseError`, a kernel error
ack raises `NetlinkError` carrying the errno, its text and the kernel's extended-ack message.

This module is imported on the guest's first Configure, not at vminitd's start; its records are
NamedTuples because a dataclass costs about a millisecond to create (more under TCG).
"""
from __future__ import annotations

import errno as _errno
import ipaddress
import os
import socket
import struct
from typing import Any, NamedTuple

# <linux/netlink.h>
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300                          # ROOT | MATCH (GET requests)
NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400   # NEW requests
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # flags of an NLMSG_ERROR reply
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE = 24
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
# <linux/if.h>, <linux/if_link.h>, <linux/if_addr.h>
IFF_UP = 0x1
IFLA_IFNAME, IFLA_MTU = 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY = 1, 4, 5, 6

_NLMSGHDR = struct.Struct("=IHHII")          # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")        # family, pad, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")         # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")         # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")               # len, type
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")

Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetlinkParseError(ValueError):
    """Bytes from the kernel that are not well-formed netlink."""


class NetlinkError(OSError):
    """The kernel refused a request: errno, its text, and what was being done."""

    def __init__(self, err: int, what: str, detail: str = "") -> None:
        text = os.strerror(err)
        msg = f"{what}: {text}" + (f" ({detail})" if detail else "")
        super().__init__(err, msg)
        self.what, self.detail = what, detail

    def __str__(self) -> str:
        return self.strerror or ""  # always set: __init__ passes (errno, text)


def _align(n: int) -> int:
    return (n + 3) & ~3


# ---------------------------------------------------------------------------------------------
# Encoding (pure)

class Request(NamedTuple):
    """One request without its sequence number; `what` names it in errors."""
    type: int
    flags: int
    body: bytes
    what: str

    @property
    def dump(self) -> bool:
        return self.flags & NLM_F_DUMP == NLM_F_DUMP

    def encode(self, seq: int) -> bytes:
        return pack_message(self.type, self.flags, seq, self.body)


def pack_message(msg_type: int, flags: int, seq: int, body: bytes, pid: int = 0) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, pid) + body


def pack_attr(attr_type: int, data: bytes) -> bytes:
    size = _RTATTR.size + len(data)
    return _RTATTR.pack(size, attr_type) + data + b"\0" * (_align(size) - size)


def _attrs(*pairs: tuple[int, bytes] | None) -> bytes:
    return b"".join(pack_attr(t, d) for t, d in filter(None, pairs))


def family(version: int) -> int:
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def set_link(index: int, *, up: bool | None = None, name: str | None = None, mtu: int | None = None,
             label: str = "") -> Request:
    """RTM_NEWLINK on an existing link: change only what is given."""
    flags, change = (IFF_UP if up else 0), (IFF_UP if up is not None else 0)
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change) + _attrs(
        (IFLA_IFNAME, name.encode() + b"\0") if name is not None else None,
        (IFLA_MTU, _U32.pack(mtu)) if mtu is not None else None)
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body, label or f"set link {index}")


def get_addrs(family: int = socket.AF_UNSPEC) -> Request:
    return Request(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, _IFADDRMSG.pack(family, 0, 0, 0, 0),
                   "list addresses")


def add_addr(index: int, addr: Address, label: str = "") -> Request:
    """Like `ip addr replace ADDR dev`: IFA_LOCAL and IFA_ADDRESS both the address (no peer)."""
    raw = addr.ip.packed
    body = _IFADDRMSG.pack(family(addr.version), addr.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index) + _attrs(
        (IFA_LOCAL, raw), (IFA_ADDRESS, raw))
    return Request(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body,
                   label or f"add address {addr.with_prefixlen} to link {index}")


def del_addr(a: "AddrInfo", label: str = "") -> Request:
    """Delete an address as a dump reported it (the kernel matches local, peer and prefix)."""
    body = _IFADDRMSG.pack(a.family, a.prefixlen, 0, a.scope, a.index) + _attrs(
        (IFA_LOCAL, a.attrs[IFA_LOCAL]) if IFA_LOCAL in a.attrs else None,
        (IFA_ADDRESS, a.attrs[IFA_ADDRESS]) if IFA_ADDRESS in a.attrs else None)
    return Request(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, body,
                   label or f"delete address {a.interface} from link {a.index}")


def replace_route(dst: Network, gateway: IP | None, oif: int, metric: int = 0, label: str = "") -> Request:
    """Like `ip route replace DST [via GW] dev OIF [metric M]` in table main: on-link routes get
    scope link, gateway routes scope universe, protocol boot (what `ip` uses)."""
    scope = RT_SCOPE_LINK if gateway is None else RT_SCOPE_UNIVERSE
    body = _RTMSG.pack(family(dst.version), dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope,
                       RTN_UNICAST, 0) + _attrs(
        (RTA_DST, dst.network_address.packed) if dst.prefixlen else None,
        (RTA_GATEWAY, gateway.packed) if gateway is not None else None,
        (RTA_OIF, _U32.pack(oif)),
        (RTA_PRIORITY, _U32.pack(metric)) if metric else None)
    via = f" via {gateway}" if gateway is not None else ""
    return Request(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body,
                   label or f"replace route {dst}{via} dev {oif}")


# ---------------------------------------------------------------------------------------------
# Decoding (pure)

class Message(NamedTuple):
    type: int
    flags: int
    seq: int
    pid: int
    body: bytes


def parse_messages(data: bytes) -> list[Message]:
    """Split one datagram into messages; refuses lengths that run past the data."""
    out, off = [], 0
    while off < len(data):
        if len(data) - off < _NLMSGHDR.size:
            raise NetlinkParseError(f"truncated netlink header at offset {off} ({len(data) - off} bytes left)")
        length, mtype, flags, seq, pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise NetlinkParseError(f"netlink message at offset {off} claims {length} bytes, "
                                    f"{len(data) - off} available")
        out.append(Message(mtype, flags, seq, pid, bytes(data[off + _NLMSGHDR.size:off + length])))
        off += _align(length)
    return out


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """rtattrs → {type: payload}; the nested/byte-order bits of the type are masked off."""
    out: dict[int, bytes] = {}
    off = 0
    while off + _RTATTR.size <= len(data):
        length, atype = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size or off + length > len(data):
            raise NetlinkParseError(f"attribute type {atype} at offset {off} claims {length} bytes, "
                                    f"{len(data) - off} available")
        out.setdefault(atype & 0x3FFF, bytes(data[off + _RTATTR.size:off + length]))
        off += _align(length)
    return out


def parse_error(msg: Message) -> tuple[int, str]:
    """NLMSG_ERROR body → (positive errno or 0 for an ack, extended-ack text or '')."""
    if len(msg.body) < _I32.size + _NLMSGHDR.size:
        raise NetlinkParseError(f"truncated netlink error message ({len(msg.body)} bytes)")
    (err,) = _I32.unpack_from(msg.body)
    detail = ""
    if msg.flags & NLM_F_ACK_TLVS:
        off = _I32.size + _NLMSGHDR.size
        if not msg.flags & NLM_F_CAPPED:          # the request is echoed back: skip it
            (inner_len,) = _U32.unpack_from(msg.body, _I32.size)
            off = _I32.size + _align(inner_len)
        text = parse_attrs(msg.body[off:]).get(NLMSGERR_ATTR_MSG, b"")
        detail = text.split(b"\0", 1)[0].decode(errors="replace")
    return -err, detail


class AddrInfo(NamedTuple):
    family: int
    prefixlen: int
    flags: int
    scope: int
    index: int  # type: ignore[assignment]  # the kernel's name (ifa_index); hides tuple.index
    attrs: dict[int, bytes]

    @property
    def has_peer(self) -> bool:
        """A point-to-point address: IFA_ADDRESS is the peer, not the local address."""
        local, address = self.attrs.get(IFA_LOCAL), self.attrs.get(IFA_ADDRESS)
        return local is not None and address is not None and local != address

    @property
    def interface(self) -> Address:
        raw = self.attrs.get(IFA_LOCAL) or self.attrs.get(IFA_ADDRESS)
        if raw is None:
            raise NetlinkParseError(f"address on link {self.index} has neither IFA_LOCAL nor IFA_ADDRESS")
        try:
            return ipaddress.ip_interface((ipaddress.ip_address(raw), self.prefixlen))
        except ValueError as e:
            raise NetlinkParseError(f"bad address on link {self.index}: {e}") from None


def parse_addr(msg: Message) -> AddrInfo:
    if len(msg.body) < _IFADDRMSG.size:
        raise NetlinkParseError(f"truncated ifaddrmsg ({len(msg.body)} bytes)")
    family, prefixlen, flags, scope, index = _IFADDRMSG.unpack_from(msg.body)
    return AddrInfo(family, prefixlen, flags, scope, index, parse_attrs(msg.body[_IFADDRMSG.size:]))


class Reply:
    """Collects the reply to one request from datagrams (sans-IO): `feed` returns True when the
    request is complete (ack, or NLMSG_DONE of a dump) and raises NetlinkError on an error ack."""

    def __init__(self, request: Request, seq: int) -> None:
        self.request, self.seq = request, seq
        self.messages: list[Message] = []

    def feed(self, datagram: bytes) -> bool:
        for m in parse_messages(datagram):
            if m.seq != self.seq:                 # a late reply to an earlier request
                continue
            if m.type == NLMSG_ERROR:
                err, detail = parse_error(m)
                if err:
                    raise NetlinkError(err, self.request.what, detail)
                return True
            if m.type == NLMSG_DONE:
                if len(m.body) >= _I32.size and (err := _I32.unpack_from(m.body)[0]) < 0:
                    raise NetlinkError(-err, self.request.what)
                return True
            if m.type == NLMSG_NOOP:
                continue
            self.messages.append(m)
            if not self.request.dump and not self.request.flags & NLM_F_ACK:
                return True                       # a plain GET: its one answer is the reply
        return False


# ---------------------------------------------------------------------------------------------
# The socket (thin)

class RtnlSocket:
    """A blocking NETLINK_ROUTE socket; the kernel answers rtnetlink requests synchronously, so a
    request costs microseconds and a timeout only guards against a kernel that never answers."""

    RECV_SIZE = 1 << 18

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, 0))
            self.sock.settimeout(timeout_s)
            for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):   # error texts; no echoed requests
                try:
                    self.sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:
                    pass
        except BaseException:
            self.sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RtnlSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, req: Request) -> list[Message]:
        self._seq = (self._seq % 0xFFFFFFFF) + 1
        reply = Reply(req, self._seq)
        self.sock.send(req.encode(self._seq))
        while True:
            try:
                data = self.sock.recv(self.RECV_SIZE)
            except TimeoutError:
                raise NetlinkError(_errno.ETIMEDOUT, req.what) from None
            if reply.feed(data):
                return reply.messages

    # --- the operations Configure needs ------------------------------------------------------

    def set_link(self, index: int, **kw: Any) -> None:
        self.request(set_link(index, **kw))

    def addrs(self, family: int = socket.AF_UNSPEC, index: int | None = None) -> list[AddrInfo]:
        out = [parse_addr(m) for m in self.request(get_addrs(family))]
        return [a for a in out if index is None or a.index == index]

    def add_addr(self, index: int, addr: Address, label: str = "") -> None:
        self.request(add_addr(index, addr, label))

    def del_addr(self, a: AddrInfo, label: str = "") -> None:
        try:
            self.request(del_addr(a, label))
        except NetlinkError as e:
            # Deleting a primary IPv4 address takes its secondaries with it.
            if e.errno != _errno.EADDRNOTAVAIL:
                raise

    def replace_route(self, dst: Network, gateway: IP | None, oif: int, metric: int = 0, label: str = "") -> None:
        self.request(replace_route(dst, gateway, oif, metric, label))
