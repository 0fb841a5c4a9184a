"""The guest's rtnetlink codec (vminitd/netlink.py): exact request bytes, replies parsed from
bytes (acks, errors with extended-ack text, an address dump), malformed input refused.

Byte strings are little-endian (netlink is host order); pyroute2 (a host dependency) decodes
our requests as an independent reader.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import sys

import pytest

from spinbox.vminitd import netlink as nl

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="expected bytes are little-endian")


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


def test_set_link_up_bytes():
    assert nl.set_link(2, up=True).encode(seq=7) == h(
        "20000000 1000 0500 07000000 00000000"      # len 32, RTM_NEWLINK, REQUEST|ACK, seq 7, pid 0
        "00 00 0000 02000000 01000000 01000000")    # AF_UNSPEC, pad, type, index 2, IFF_UP, change IFF_UP


def test_rename_and_mtu_bytes():
    assert nl.set_link(3, name="eth0", mtu=1400).encode(seq=1) == h(
        "34000000 1000 0500 01000000 00000000"
        "00 00 0000 03000000 00000000 00000000"     # flags untouched: change 0
        "0900 0300 65746830 00 000000"             # IFLA_IFNAME "eth0\0" padded to 12
        "0800 0400 78050000")                      # IFLA_MTU 1400


def test_add_addr_bytes():
    req = nl.add_addr(4, ipaddress.ip_interface("10.77.0.5/24"))
    assert req.encode(seq=2) == h(
        "28000000 1400 0505 02000000 00000000"      # RTM_NEWADDR, REQUEST|ACK|REPLACE|CREATE
        "02 18 00 00 04000000"                      # AF_INET /24 flags 0 scope universe index 4
        "0800 0200 0a4d0005"                        # IFA_LOCAL
        "0800 0100 0a4d0005")                       # IFA_ADDRESS
    assert "10.77.0.5/24" in req.what


def test_replace_route_bytes():
    gw = nl.replace_route(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("10.77.0.1"), 4, 0)
    assert gw.encode(seq=3) == h(
        "2c000000 1800 0505 03000000 00000000"      # RTM_NEWROUTE, REQUEST|ACK|REPLACE|CREATE
        "02 00 00 00 fe 03 00 01 00000000"          # inet, dst_len 0, main, boot, universe, unicast
        "0800 0500 0a4d0001"                        # RTA_GATEWAY (no RTA_DST for a default route)
        "0800 0400 04000000")                       # RTA_OIF 4
    onlink = nl.replace_route(ipaddress.ip_network("192.168.50.0/24"), None, 4, 7)
    assert onlink.encode(seq=4) == h(
        "34000000 1800 0505 04000000 00000000"
        "02 18 00 00 fe 03 fd 01 00000000"          # scope link for an on-link route
        "0800 0100 c0a83200"                        # RTA_DST
        "0800 0400 04000000"                        # RTA_OIF
        "0800 0600 07000000")                       # RTA_PRIORITY 7


def test_ipv6_route_and_dump_request():
    r = nl.replace_route(ipaddress.ip_network("fd00::/64"), ipaddress.ip_address("fd00::1"), 9, 5)
    body = r.encode(1)[16:]
    assert body[0] == socket.AF_INET6 and body[1] == 64
    attrs = nl.parse_attrs(body[12:])
    assert attrs[nl.RTA_DST] == ipaddress.ip_address("fd00::").packed
    assert attrs[nl.RTA_GATEWAY] == ipaddress.ip_address("fd00::1").packed
    assert attrs[nl.RTA_PRIORITY] == struct.pack("=I", 5)
    assert nl.get_addrs(socket.AF_INET6).encode(5) == h(
        "18000000 1600 0103 05000000 00000000 0a 00 00 00 00000000")   # RTM_GETADDR, REQUEST|DUMP


def test_pyroute2_reads_our_requests_the_same_way():
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    m = ifinfmsg(nl.set_link(5, up=False, name="sbxtmp0", mtu=9000).encode(1))
    m.decode()
    assert (m["index"], m["change"], m["flags"]) == (5, 1, 0)
    assert m.get_attr("IFLA_IFNAME") == "sbxtmp0" and m.get_attr("IFLA_MTU") == 9000
    a = ifaddrmsg(nl.add_addr(5, ipaddress.ip_interface("fd00:77::5/64")).encode(1))
    a.decode()
    assert (a["family"], a["prefixlen"], a["index"]) == (socket.AF_INET6, 64, 5)
    assert a.get_attr("IFA_LOCAL") == "fd00:77::5" and a.get_attr("IFA_ADDRESS") == "fd00:77::5"
    r = rtmsg(nl.replace_route(ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_address("10.77.0.1"), 5, 3).encode(1))
    r.decode()
    assert (r["dst_len"], r["table"], r["proto"], r["scope"], r["type"]) == (16, 254, 3, 0, 1)
    assert r.get_attr("RTA_DST") == "10.9.0.0" and r.get_attr("RTA_GATEWAY") == "10.77.0.1"
    assert (r.get_attr("RTA_OIF"), r.get_attr("RTA_PRIORITY")) == (5, 3)


# ---------------------------------------------------------------------------------------------
# replies

def error_msg(seq: int, err: int, *, capped: bool = True, text: str = "", echoed: bytes = b"") -> bytes:
    """An NLMSG_ERROR as the kernel sends it: errno, the request's header (and body unless
    capped), then extended-ack attributes."""
    inner = echoed or nl.pack_message(nl.RTM_NEWROUTE, 5, seq, b"")
    body = struct.pack("=i", err) + (inner[:16] if capped else inner)
    flags = nl.NLM_F_CAPPED if capped else 0
    if text:
        body += nl.pack_attr(nl.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
        flags |= nl.NLM_F_ACK_TLVS
    return nl.pack_message(nl.NLMSG_ERROR, flags, seq, body)


def test_ack_completes_a_request():
    req = nl.set_link(2, up=True)
    reply = nl.Reply(req, 9)
    assert reply.feed(error_msg(9, 0)) is True and reply.messages == []


def test_error_ack_names_operation_and_errno_text():
    req = nl.replace_route(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("10.99.0.1"), 4,
                           label="replace route 0.0.0.0/0 via 10.99.0.1 dev eth0")
    reply = nl.Reply(req, 3)
    with pytest.raises(nl.NetlinkError) as ei:
        reply.feed(error_msg(3, -errno.ENETUNREACH, text="Nexthop has invalid gateway"))
    e = ei.value
    assert e.errno == errno.ENETUNREACH and e.detail == "Nexthop has invalid gateway"
    assert str(e) == ("replace route 0.0.0.0/0 via 10.99.0.1 dev eth0: "
                      f"{__import__('os').strerror(errno.ENETUNREACH)} (Nexthop has invalid gateway)")


def test_uncapped_error_skips_the_echoed_request():
    req = nl.set_link(2, name="eth0")
    raw = req.encode(4)
    msg = nl.parse_messages(error_msg(4, -errno.EEXIST, capped=False, text="name taken", echoed=raw))[0]
    assert nl.parse_error(msg) == (errno.EEXIST, "name taken")
    plain = nl.parse_messages(error_msg(4, -errno.EBUSY, capped=False, echoed=raw))[0]
    assert nl.parse_error(plain) == (errno.EBUSY, "")


def test_replies_to_other_sequence_numbers_are_ignored():
    reply = nl.Reply(nl.set_link(2, up=True), 5)
    assert reply.feed(error_msg(4, -errno.EPERM)) is False     # a late answer to request 4
    assert reply.feed(error_msg(5, 0)) is True


def newaddr(seq: int, family: int, prefixlen: int, scope: int, index: int, **attrs: bytes) -> bytes:
    body = struct.pack("=BBBBI", family, prefixlen, 0x80, scope, index)
    body += b"".join(nl.pack_attr(getattr(nl, k), v) for k, v in attrs.items())
    body += nl.pack_attr(3, b"eth0\0")                             # IFA_LABEL, ignored
    body += nl.pack_attr(6, b"\xff" * 16)                          # IFA_CACHEINFO, ignored
    return nl.pack_message(nl.RTM_NEWADDR, nl.NLM_F_MULTI, seq, body)


def test_parse_addr_dump_over_two_datagrams():
    req = nl.get_addrs()
    reply = nl.Reply(req, 11)
    v4 = ipaddress.ip_address("10.77.0.5").packed
    first = (newaddr(11, socket.AF_INET, 24, 0, 4, IFA_ADDRESS=v4, IFA_LOCAL=v4)
             + newaddr(11, socket.AF_INET, 8, 254, 1, IFA_LOCAL=ipaddress.ip_address("127.0.0.1").packed))
    assert reply.feed(first) is False                              # NLM_F_MULTI: more to come
    v6 = ipaddress.ip_address("fd00:77::5").packed
    done = nl.pack_message(nl.NLMSG_DONE, nl.NLM_F_MULTI, 11, struct.pack("=i", 0))
    assert reply.feed(newaddr(11, socket.AF_INET6, 64, 0, 4, IFA_ADDRESS=v6) + done) is True
    addrs = [nl.parse_addr(m) for m in reply.messages]
    assert [(str(a.interface), a.scope, a.index) for a in addrs] == [
        ("10.77.0.5/24", 0, 4), ("127.0.0.1/8", 254, 1), ("fd00:77::5/64", 0, 4)]
    assert not addrs[0].has_peer and not addrs[2].has_peer
    ptp = nl.parse_addr(nl.parse_messages(newaddr(1, socket.AF_INET, 32, 0, 4, IFA_ADDRESS=bytes([10, 0, 0, 1]),
                                                  IFA_LOCAL=bytes([10, 0, 0, 2])))[0])
    assert ptp.has_peer and str(ptp.interface) == "10.0.0.2/32"
    assert addrs[0].flags == 0x80 and nl.del_addr(addrs[0]).encode(1)[16:] == h(
        "02 18 00 00 04000000 0800 0200 0a4d0005 0800 0100 0a4d0005")


def test_dump_error_in_done_is_raised():
    reply = nl.Reply(nl.get_addrs(), 2)
    with pytest.raises(nl.NetlinkError, match="list addresses"):
        reply.feed(nl.pack_message(nl.NLMSG_DONE, nl.NLM_F_MULTI, 2, struct.pack("=i", -errno.EINTR)))


@pytest.mark.parametrize("data, needle", [
    (h("20000000 1000"), "truncated netlink header"),
    (h("40000000 1000 0000 01000000 00000000 0000"), "claims 64 bytes, 18 available"),
    (h("08000000 1000 0000 01000000 00000000"), "claims 8 bytes"),          # shorter than a header
])
def test_malformed_datagrams_are_refused(data, needle):
    with pytest.raises(nl.NetlinkParseError, match=needle):
        nl.parse_messages(data)
    with pytest.raises(nl.NetlinkParseError):
        nl.Reply(nl.get_addrs(), 1).feed(data)


def test_malformed_bodies_are_refused():
    with pytest.raises(nl.NetlinkParseError, match="attribute type 3 at offset 0 claims 40"):
        nl.parse_attrs(h("2800 0300 6574"))
    with pytest.raises(nl.NetlinkParseError, match="attribute type 1 at offset 0 claims 2"):
        nl.parse_attrs(h("0200 0100"))
    short_err = nl.parse_messages(nl.pack_message(nl.NLMSG_ERROR, 0, 1, struct.pack("=i", -1)))[0]
    with pytest.raises(nl.NetlinkParseError, match="truncated netlink error"):
        nl.parse_error(short_err)
    with pytest.raises(nl.NetlinkParseError, match="truncated ifaddrmsg"):
        nl.parse_addr(nl.Message(nl.RTM_NEWADDR, 0, 1, 0, b"\x02\x18"))
    no_addr = nl.parse_addr(nl.Message(nl.RTM_NEWADDR, 0, 1, 0, struct.pack("=BBBBI", 2, 24, 0, 0, 4)))
    with pytest.raises(nl.NetlinkParseError, match="neither IFA_LOCAL nor IFA_ADDRESS"):
        no_addr.interface
    bad_len = nl.parse_addr(nl.Message(nl.RTM_NEWADDR, 0, 1, 0, struct.pack("=BBBBI", 2, 24, 0, 0, 4)
                                       + nl.pack_attr(nl.IFA_LOCAL, b"\x0a\x00\x00")))
    with pytest.raises(nl.NetlinkParseError, match="bad address on link 4"):
        bad_len.interface

