"""Guest network configuration (the agent's Network service).

The host hot-plugs one virtio-net NIC per sandbox interface, each with that interface's MAC;
Configure finds the NICs by MAC (waiting for hot-plugged ones to appear), renames them, sets MTU,
addresses and routes, brings up lo, and writes /etc/resolv.conf, /etc/hosts and the hostname.

Links are configured over rtnetlink by vminitd.netlink (stdlib only: pyroute2 is not in the guest
image and an exec of busybox `ip` per step costs more); the same code is tested on the host
inside a netns. Everything the host sends is validated first: the guest trusts nothing from
outside either.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from spinbox.api._pb.spinbox.agent.v1 import network_pb2 as npb

from .errors import AgentError, InvalidArgument, NotFound
from .ids import validate_hostname

SYS_CLASS_NET = "/sys/class/net"
ETC = "/etc"
DEFAULT_LINK_TIMEOUT_MS = 10_000
MAX_LINK_TIMEOUT_MS = 120_000
MAX_INTERFACES, MAX_ADDRESSES, MAX_ROUTES = 16, 64, 256
MAX_NAMESERVERS, MAX_SEARCH, MAX_OPTIONS, MAX_HOSTS = 8, 32, 32, 256

_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_OPTION_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class NetworkError(AgentError):
    """A configuration step failed inside the guest (message names the step, the link and the
    kernel's errno text)."""


@dataclass(frozen=True)
class RouteSpec:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    metric: int


@dataclass
class InterfaceSpec:
    mac: str
    name: str
    mtu: int
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = field(default_factory=list)
    routes: list[RouteSpec] = field(default_factory=list)


@dataclass
class NetworkPlan:
    interfaces: list[InterfaceSpec]
    hostname: str
    nameservers: list[str]
    search: list[str]
    options: list[str]
    domain: str
    hosts: list[tuple[str, list[str]]]
    link_timeout_s: float

    @property
    def has_dns(self) -> bool:
        return bool(self.nameservers or self.search or self.options or self.domain)


# ---------------------------------------------------------------------------------------------
# Validation (pure)

def _bounded(items, limit: int, what: str) -> list:
    items = list(items)
    if len(items) > limit:
        raise InvalidArgument(f"too many {what}: {len(items)} > {limit}")
    return items


def _ip(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(f"invalid {what} {value!r}: not an IP address") from None


def _domain(value: str, what: str) -> str:
    try:
        return validate_hostname(value.rstrip("."))
    except InvalidArgument:
        raise InvalidArgument(f"invalid {what} {value!r}") from None


def parse_request(req) -> NetworkPlan:
    """ConfigureRequest (protobuf) → a validated plan. Raises InvalidArgument naming the field."""
    ifaces: list[InterfaceSpec] = []
    seen_macs: set[str] = set()
    seen_names: set[str] = set()
    for i, it in enumerate(_bounded(req.interfaces, MAX_INTERFACES, "interfaces")):
        where = f"interfaces[{i}]"
        mac = it.mac.lower()
        if not _MAC_RE.fullmatch(mac) or int(mac[:2], 16) & 1:
            raise InvalidArgument(f"{where}: invalid MAC {it.mac!r} (want a unicast aa:bb:cc:dd:ee:ff)")
        if mac in seen_macs:
            raise InvalidArgument(f"{where}: MAC {mac} given twice")
        seen_macs.add(mac)
        if it.name and (not _IFNAME_RE.fullmatch(it.name) or it.name == "lo"):
            raise InvalidArgument(f"{where}: invalid interface name {it.name!r}")
        if it.name and it.name in seen_names:
            raise InvalidArgument(f"{where}: interface name {it.name} given twice")
        seen_names.add(it.name)
        if it.mtu and not 68 <= it.mtu <= 65535:
            raise InvalidArgument(f"{where}: MTU {it.mtu} out of range 68..65535")
        spec = InterfaceSpec(mac, it.name, it.mtu)
        for a in _bounded(it.addresses, MAX_ADDRESSES, f"{where} addresses"):
            try:
                spec.addresses.append(ipaddress.ip_interface(a))
            except ValueError:
                raise InvalidArgument(f"{where}: invalid address {a!r} (want a CIDR like 10.0.0.2/24)") from None
            if "/" not in a:
                raise InvalidArgument(f"{where}: address {a!r} has no prefix length")
        for r in _bounded(it.routes, MAX_ROUTES, f"{where} routes"):
            try:
                dst = ipaddress.ip_network(r.dst, strict=False)
            except ValueError:
                raise InvalidArgument(f"{where}: invalid route destination {r.dst!r}") from None
            gw = _ip(r.gateway, f"{where} route gateway") if r.gateway else None
            if gw is not None and gw.version != dst.version:
                raise InvalidArgument(f"{where}: route {r.dst} via {r.gateway}: address families differ")
            spec.routes.append(RouteSpec(dst, gw, r.metric))
        ifaces.append(spec)
    hostname = validate_hostname(req.hostname) if req.hostname else ""
    dns = req.dns
    nameservers = [str(_ip(s, "nameserver")) for s in _bounded(dns.nameservers, MAX_NAMESERVERS, "nameservers")]
    search = [_domain(s, "search domain") for s in _bounded(dns.search, MAX_SEARCH, "search domains")]
    options = list(_bounded(dns.options, MAX_OPTIONS, "resolver options"))
    for o in options:
        if not _OPTION_RE.fullmatch(o):
            raise InvalidArgument(f"invalid resolver option {o!r}")
    domain = _domain(dns.domain, "DNS domain") if dns.domain else ""
    hosts = []
    for h in _bounded(req.hosts, MAX_HOSTS, "host entries"):
        names = [_domain(n, "host name") for n in _bounded(h.names, 16, "names per host entry")]
        if not names:
            raise InvalidArgument(f"host entry {h.ip!r} has no names")
        hosts.append((str(_ip(h.ip, "host entry address")), names))
    timeout_ms = req.link_timeout_ms or DEFAULT_LINK_TIMEOUT_MS
    if timeout_ms > MAX_LINK_TIMEOUT_MS:
        raise InvalidArgument(f"link_timeout_ms {timeout_ms} > {MAX_LINK_TIMEOUT_MS}")
    return NetworkPlan(ifaces, hostname, nameservers, search, options, domain, hosts, timeout_ms / 1000)


# ---------------------------------------------------------------------------------------------
# Files (pure renderers + atomic writes)

def render_resolv_conf(plan: NetworkPlan) -> str:
    lines = ["# written by spinbox vminitd"]
    if plan.domain:
        lines.append(f"domain {plan.domain}")
    if plan.search:
        lines.append("search " + " ".join(plan.search))
    lines += [f"nameserver {n}" for n in plan.nameservers]
    if plan.options:
        lines.append("options " + " ".join(plan.options))
    return "\n".join(lines) + "\n"


def render_hosts(plan: NetworkPlan) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if plan.hostname:
        first = next((a.ip for i in plan.interfaces for a in i.addresses if a.version == 4), None)
        short = plan.hostname.split(".")[0]
        names = plan.hostname if short == plan.hostname else f"{plan.hostname} {short}"
        lines.append(f"{first or '127.0.1.1'}\t{names}")
    lines += [f"{ip}\t{' '.join(names)}" for ip, names in plan.hosts]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.spinbox-tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)   # also replaces a symlink (e.g. to /proc/net/pnp) instead of following it


# ---------------------------------------------------------------------------------------------
# Links

def links_by_mac(sys_class_net: str = SYS_CLASS_NET) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in os.listdir(sys_class_net):
        try:
            mac = Path(sys_class_net, name, "address").read_text().strip().lower()
        except OSError:
            continue
        out.setdefault(mac, name)
    return out


async def wait_for_links(macs: list[str], timeout_s: float, sys_class_net: str = SYS_CLASS_NET) -> dict[str, str]:
    """mac → current link name, for every mac; hot-plugged NICs may take a moment to probe."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        found = links_by_mac(sys_class_net)
        missing = [m for m in macs if m not in found]
        if not missing:
            return {m: found[m] for m in macs}
        if time.monotonic() >= deadline:
            raise NotFound(f"no network interface with MAC {', '.join(missing)} after {timeout_s:g} s "
                           f"(present: {', '.join(sorted(found)) or 'none'})")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def _index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise NotFound(f"network interface {name} vanished during configuration") from None


def _park_names(count: int) -> list[str]:
    """Temporary names no link has: a failed earlier Configure may have left some in use."""
    taken = {name for _, name in socket.if_nameindex()}
    names: list[str] = []
    n = 0
    while len(names) < count:
        if f"sbxtmp{n}" not in taken:
            names.append(f"sbxtmp{n}")
        n += 1
    return names


def _sync_addresses(nl, index: int, name: str, wanted: list) -> None:
    """Make the link's global addresses of each wanted family exactly `wanted`: delete the others,
    add the missing. A retried Configure then changes nothing (no window without the address)."""
    from .netlink import RT_SCOPE_UNIVERSE, family
    for v in sorted({a.version for a in wanted}):
        mine = [a for a in wanted if a.version == v]
        present = set()
        for a in nl.addrs(family(v), index):
            if a.scope != RT_SCOPE_UNIVERSE:
                continue                        # link-local and host addresses stay
            if a.interface in mine and not a.has_peer:
                present.add(a.interface)
            else:
                nl.del_addr(a, f"delete address {a.interface} from {name}")
        for a in mine:
            if a not in present:
                nl.add_addr(index, a, f"add address {a.with_prefixlen} to {name}")


def configure_link(nl, current: str, spec: InterfaceSpec) -> str:
    """Rename, MTU, addresses, up, routes of one link over rtnetlink; returns its final name."""
    index = _index(current)
    name = current
    if spec.name and spec.name != current:   # a clash with another link: the kernel says so
        nl.set_link(index, up=False, label=f"set link {current} down")
        nl.set_link(index, name=spec.name, label=f"rename link {current} (MAC {spec.mac}) to {spec.name}")
        name = spec.name
    if spec.mtu:
        nl.set_link(index, mtu=spec.mtu, label=f"set MTU {spec.mtu} on {name}")
    _sync_addresses(nl, index, name, spec.addresses)
    nl.set_link(index, up=True, label=f"set link {name} up")
    for r in sorted(spec.routes, key=lambda r: r.gateway is not None):   # on-link first
        via = f" via {r.gateway}" if r.gateway is not None else ""
        metric = f" metric {r.metric}" if r.metric else ""
        nl.replace_route(r.dst, r.gateway, index, r.metric, f"replace route {r.dst}{via} dev {name}{metric}")
    return name


def configure_links(plan: NetworkPlan, current: dict[str, str]) -> dict[str, str]:
    """lo up, then every interface (current: mac → present name); returns mac → final name."""
    from . import netlink   # lazily: vminitd's start does not pay for it
    try:
        with netlink.RtnlSocket() as nl:
            nl.set_link(_index("lo"), up=True, label="set link lo up")
            # Renames could collide with each other's old names (eth0↔eth1): park them first.
            renames = [i for i in plan.interfaces if i.name and i.name != current[i.mac]]
            for spec, tmp in zip(renames, _park_names(len(renames)), strict=True):
                index = _index(current[spec.mac])
                nl.set_link(index, up=False, label=f"set link {current[spec.mac]} down")
                nl.set_link(index, name=tmp, label=f"rename link {current[spec.mac]} to {tmp}")
                current[spec.mac] = tmp
            return {spec.mac: configure_link(nl, current[spec.mac], spec) for spec in plan.interfaces}
    except netlink.NetlinkError as e:
        raise NetworkError(str(e)) from None
    except netlink.NetlinkParseError as e:
        raise NetworkError(f"bad reply from the kernel: {e}") from None
    except OSError as e:   # the socket itself (no rtnetlink, no CAP_NET_ADMIN for bind, ...)
        raise NetworkError(f"rtnetlink: {e}") from None


def write_files(plan: NetworkPlan, etc_dir: str = ETC, set_hostname: bool = True) -> dict[str, str]:
    """Write resolv.conf/hosts (atomically) and set the hostname; returns what containers should
    see: {"/etc/resolv.conf": guest path, "/etc/hosts": guest path} for the files written."""
    etc = Path(etc_dir)
    written = {}
    if plan.has_dns:
        _write_atomic(etc / "resolv.conf", render_resolv_conf(plan))
        written["/etc/resolv.conf"] = str(etc / "resolv.conf")
    if plan.hostname or plan.hosts or plan.interfaces:
        _write_atomic(etc / "hosts", render_hosts(plan))
        written["/etc/hosts"] = str(etc / "hosts")
    if plan.hostname and set_hostname:
        socket.sethostname(plan.hostname)
    return written


async def configure(plan: NetworkPlan, etc_dir: str = ETC, sys_class_net: str = SYS_CLASS_NET,
                    set_hostname: bool = True, published: dict[str, str] | None = None) -> dict[str, str]:
    """Apply the plan; returns mac → final link name. `published` (container path → guest file)
    gets the files written, for the bundles of containers created later."""
    current = await wait_for_links([i.mac for i in plan.interfaces], plan.link_timeout_s, sys_class_net)
    # rtnetlink answers synchronously in microseconds: no need to leave the event loop.
    result = configure_links(plan, current)
    written = write_files(plan, etc_dir, set_hostname)
    if published is not None:
        published.update(written)
    return result


# ---------------------------------------------------------------------------------------------
# The service

class NetworkService:
    """spinbox.agent.v1.Network: one call, serialized (two concurrent Configures would race on
    link names). The files it writes are published in `agent.sandbox_files` so that containers
    created afterwards get them bind-mounted (see bundle.adapt_spec)."""

    def __init__(self, agent=None, etc_dir: str = ETC, sys_class_net: str = SYS_CLASS_NET,
                 set_hostname: bool = True) -> None:
        self.agent = agent
        self.etc_dir, self.sys_class_net = etc_dir, sys_class_net
        self.set_hostname = set_hostname
        self.published: dict[str, str] = agent.sandbox_files if agent is not None else {}
        self._lock = asyncio.Lock()

    async def Configure(self, req):
        plan = parse_request(req)
        async with self._lock:
            names = await configure(plan, self.etc_dir, self.sys_class_net, self.set_hostname, self.published)
        return npb.ConfigureResponse(interfaces=[npb.ConfiguredInterface(mac=m, name=n) for m, n in names.items()])
