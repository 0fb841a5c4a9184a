"""Discover a sandbox netns' interfaces and plumb each one to a TAP for QEMU.

Used the same way in both modes: after our own CNI ADD (ctr run), or on the pod netns CRI
already configured. The netns is the source of truth (addresses, routes, MTU, MAC), as Kata's
netns scan is; the CNI result only adds DNS.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from pyroute2 import IPRoute

from spinbox.shim.errors import HostError

from . import netns, tap

log = logging.getLogger(__name__)

TAP_SUFFIX = "_sbx"          # our TAPs are tap<N>_sbx: never taken for a sandbox interface
ARPHRD_ETHER = 1
RTPROT_KERNEL = 2
RTN_UNICAST = 1
RT_TABLE_MAIN = 254


class PlumbingError(HostError):
    """A netns cannot be plumbed (not a netns, no interface in it)."""


@dataclass(frozen=True)
class Route:
    dst: str              # CIDR
    gateway: str = ""     # "" = on-link
    metric: int = 0


@dataclass
class InterfaceConfig:
    """What the guest NIC must look like: the sandbox interface, copied."""
    name: str                          # name in the netns (e.g. eth0); the guest NIC gets it too
    mac: str
    mtu: int
    addresses: list[str] = field(default_factory=list)   # CIDRs
    routes: list[Route] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        """The IPv4 default gateway, else the IPv6 one, else ""."""
        for default in ("0.0.0.0/0", "::/0"):
            for r in self.routes:
                if r.dst == default and r.gateway:
                    return r.gateway
        return ""


@dataclass
class PlumbedInterface:
    config: InterfaceConfig
    tap_name: str
    tap_fd: int                        # IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; hand to QEMU, then close ours

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"tap_name": self.tap_name, "tap_fd": self.tap_fd, "name": c.name, "mac": c.mac,
                "addresses": list(c.addresses), "gateway": c.gateway,
                "routes": [asdict(r) for r in c.routes], "mtu": c.mtu}


# ---------------------------------------------------------------------------------------------
# Discovery (blocking; runs inside the netns)

def _is_tap_name(name: str) -> bool:
    return name.startswith("tap") and name.endswith(TAP_SUFFIX)


def _link_kind(msg: Any) -> str:
    info = msg.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info else None) or ""


def _routes_of(ipr: IPRoute, index: int) -> list[Route]:
    routes: list[Route] = []
    for family, default in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if msg.get_attr("RTA_OIF") != index or msg["type"] != RTN_UNICAST:
                continue
            if msg["proto"] == RTPROT_KERNEL:   # connected routes: the guest kernel adds its own
                continue
            dst = msg.get_attr("RTA_DST")
            cidr = f"{dst}/{msg['dst_len']}" if dst else default
            if family == socket.AF_INET6 and ipaddress.ip_network(cidr, strict=False).is_link_local:
                continue
            routes.append(Route(cidr, msg.get_attr("RTA_GATEWAY") or "", msg.get_attr("RTA_PRIORITY") or 0))
    # on-link routes first: a gateway must be reachable when its route is added
    return sorted(routes, key=lambda r: bool(r.gateway))


def _addresses_of(ipr: IPRoute, index: int) -> list[str]:
    out = []
    for msg in ipr.get_addr(index=index):
        if msg["scope"] != 0:          # only global (universe): no link-local fe80::/host
            continue
        addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if addr:
            out.append(f"{addr}/{msg['prefixlen']}")
    return out


def discover(ipr: IPRoute) -> list[tuple[int, InterfaceConfig]]:
    """(ifindex, config) for every Ethernet interface of the netns except loopback and TAPs."""
    found = []
    for msg in ipr.get_links():
        name = msg.get_attr("IFLA_IFNAME")
        if msg["ifi_type"] != ARPHRD_ETHER or _is_tap_name(name) or _link_kind(msg) == "tun":
            continue
        idx = msg["index"]
        found.append((idx, InterfaceConfig(name=name, mac=msg.get_attr("IFLA_ADDRESS"),
                                           mtu=msg.get_attr("IFLA_MTU"),
                                           addresses=_addresses_of(ipr, idx), routes=_routes_of(ipr, idx))))
    return sorted(found, key=lambda f: f[1].name)


# ---------------------------------------------------------------------------------------------
# Plumbing (blocking; runs inside the netns)

def _plumb_sync() -> list[PlumbedInterface]:
    done: list[PlumbedInterface] = []
    with IPRoute() as ipr:
        try:
            for n, (idx, cfg) in enumerate(discover(ipr)):
                name = f"tap{n}{TAP_SUFFIX}"
                fd = tap.open_tap(name)
                done.append(PlumbedInterface(cfg, name, fd))
                tidx = ipr.link_lookup(ifname=name)[0]
                _quiet_ipv6(name)
                ipr.link("set", index=tidx, mtu=cfg.mtu, state="up")
                ipr.link("set", index=idx, state="up")
                tap.add_redirect(ipr, idx, tidx)
                tap.add_redirect(ipr, tidx, idx)
        except BaseException:
            _unplumb_sync(ipr, done)
            raise
    return done


def _quiet_ipv6(name: str) -> None:
    """No IPv6 on the TAP itself: it is a wire to the guest, and the netns' own link-local
    ND/RS traffic on it would only reach the guest as noise. (/proc/sys/net is that of the
    opening thread's netns.)"""
    with contextlib.suppress(OSError):
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")


def _unplumb_sync(ipr: IPRoute, plumbed: list[PlumbedInterface]) -> None:
    for p in plumbed:
        for idx in ipr.link_lookup(ifname=p.config.name) if p.config.name else []:
            tap.remove_ingress(ipr, idx)
        for idx in ipr.link_lookup(ifname=p.tap_name) if p.tap_name else []:
            ipr.link("del", index=idx)
        close_fd(p)


def close_fd(p: PlumbedInterface) -> None:
    if p.tap_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(p.tap_fd)
        p.tap_fd = -1


async def plumb(netns_path: str) -> list[PlumbedInterface]:
    """TAP + mirred both ways for every sandbox interface in the netns. Fails if there is none."""
    if not netns.is_netns(netns_path):
        raise PlumbingError(f"{netns_path} is not a network namespace")
    plumbed = await netns.run_in(netns_path, _plumb_sync)
    if not plumbed:
        raise PlumbingError(f"no Ethernet interface to plumb in {netns_path} (did CNI run?)")
    return plumbed


async def unplumb(netns_path: str, plumbed: list[PlumbedInterface] | None = None,
                  tap_names: list[str] | None = None, veth_names: list[str] | None = None) -> None:
    """Undo plumb: ingress qdiscs off the sandbox interfaces, TAPs deleted, our fds closed.
    After a crash the names come from persisted state (no fds then). Needed in CRI mode, where
    the pod netns outlives us; harmless when the netns is about to go."""
    items = list(plumbed or [])
    for i, t in enumerate(tap_names or []):
        v = (veth_names or [])[i] if veth_names and i < len(veth_names) else ""
        items.append(PlumbedInterface(InterfaceConfig(v, "", 0), t, -1))
    if not netns.is_netns(netns_path):
        for p in items:
            close_fd(p)
        return

    def work() -> None:
        with IPRoute() as ipr:
            _unplumb_sync(ipr, items)
    await netns.run_in(netns_path, work)


async def inspect(netns_path: str) -> list[InterfaceConfig]:
    """The sandbox interfaces of a netns as the guest would get them (no plumbing)."""
    def work() -> list[InterfaceConfig]:
        with IPRoute() as ipr:
            return [c for _, c in discover(ipr)]
    return await netns.run_in(netns_path, work)
