"""A stand-in for the guest NIC behind a TAP fd: answers ARP and ICMP echo for one IP with one
MAC, like the VM would. Frames carry a virtio_net_hdr (the fd is IFF_VNET_HDR, as QEMU gets it)."""
from __future__ import annotations

import os
import select
import struct
import threading

from spinbox.shim.network.tap import VNET_HDR_LEN

ETH_ARP, ETH_IP = 0x0806, 0x0800


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


class FakeGuest:
    def __init__(self, fd: int, ip: str, mac: str, vnet_hdr: bool = True) -> None:
        self.fd, self.ip, self.mac = fd, bytes(map(int, ip.split("."))), _mac(mac)
        self.hdr = VNET_HDR_LEN if vnet_hdr else 0
        self.stats = {"rx": 0, "arp_req": 0, "icmp_req": 0, "tx": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fakeguest", daemon=True)

    def __enter__(self) -> FakeGuest:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _send(self, frame: bytes) -> None:
        os.write(self.fd, bytes(self.hdr) + frame)   # all-zero header: no offloads
        self.stats["tx"] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if not ready:
                continue
            frame = os.read(self.fd, 65536)[self.hdr:]
            self.stats["rx"] += 1
            if len(frame) < 14:
                continue
            dst, src, etype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
            body = frame[14:]
            if etype == ETH_ARP and len(body) >= 28 and body[6:8] == b"\0\1" and body[24:28] == self.ip:
                self.stats["arp_req"] += 1
                reply = body[:6] + b"\0\2" + self.mac + self.ip + body[8:18]   # tha/tpa = the asker
                self._send(src + self.mac + struct.pack("!H", ETH_ARP) + reply)
            elif etype == ETH_IP and len(body) >= 20 and body[9] == 1 and body[16:20] == self.ip:
                ihl = (body[0] & 0x0F) * 4
                icmp = body[ihl:]
                if icmp[:1] != b"\x08":
                    continue
                self.stats["icmp_req"] += 1
                reply_icmp = b"\0\0\0\0" + icmp[4:]
                reply_icmp = reply_icmp[:2] + struct.pack("!H", _csum(reply_icmp)) + reply_icmp[4:]
                iph = bytearray(body[:ihl])
                iph[12:16], iph[16:20] = body[16:20], body[12:16]
                iph[8] = 64
                iph[10:12] = b"\0\0"
                iph[10:12] = struct.pack("!H", _csum(bytes(iph)))
                self._send(src + self.mac + struct.pack("!H", ETH_IP) + bytes(iph) + reply_icmp)
