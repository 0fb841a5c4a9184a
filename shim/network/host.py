"""The host side of one sandbox's network: its netns, CNI, and a TAP per interface.

    nets = HostNetworks(conf_dir=..., bin_dirs=..., cache_dir=..., lock_path=...)
    net = await nets.setup(sandbox_id, persist=save_state)      # ctr run: netns + CNI ADD + TAPs
    net = await nets.attach(pod_netns_path, persist=save_state)  # CRI: pod netns, CNI already ran
    net.interfaces                      # per interface: the TAP fd and the guest NIC's MAC, ...
    net.close_fds()                     # once QEMU holds its own copies of the TAP fds
    net.guest_request(hostname=...)     # the agent's network_pb2.ConfigureRequest
    ...
    await nets.teardown(net.state())    # after QEMU is gone; also after a crash

Nothing here touches the VM or the agent: shim.network.attachment turns a HostNetwork into
the NIC plan and guest configuration the sandbox applies.

`state()` is JSON and holds everything teardown needs; `persist` is called with it after every
step that created something, so a crash at any point leaves a state teardown can finish.
"""
from __future__ import annotations

import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spinbox.api._pb.spinbox.agent.v1 import network_pb2

from . import cni, netns, plumbing
from .plumbing import PlumbedInterface

log = logging.getLogger(__name__)

Persist = Callable[[dict[str, Any]], Awaitable[None] | None]


@dataclass
class DNSConfig:
    nameservers: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    domain: str = ""

    @classmethod
    def from_cni(cls, result: Mapping[str, Any] | None) -> DNSConfig:
        dns = (result or {}).get("dns") or {}
        return cls([str(s) for s in dns.get("nameservers") or []], [str(s) for s in dns.get("search") or []],
                   [str(s) for s in dns.get("options") or []], str(dns.get("domain") or ""))

    @classmethod
    def from_resolv_conf(cls, path: str = "/etc/resolv.conf") -> DNSConfig:
        """The host's resolvers, minus loopback ones (127.0.0.53 etc. mean nothing in the guest)."""
        out = cls()
        try:
            text = open(path).read()
        except OSError:
            return out
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 2:
                continue
            key, vals = words[0], words[1:]
            if key == "nameserver":
                try:
                    if not ipaddress.ip_address(vals[0].split("%")[0]).is_loopback:
                        out.nameservers.append(vals[0])
                except ValueError:
                    pass
            elif key == "search":
                out.search = vals
            elif key == "domain":
                out.domain = vals[0]
            elif key == "options":
                out.options.extend(vals)
        return out

    def empty(self) -> bool:
        return not (self.nameservers or self.search or self.options or self.domain)


@dataclass
class HostNetwork:
    """What exists on the host for one sandbox's network (live TAP fds included)."""
    sandbox_id: str
    netns_path: str
    owns_netns: bool                        # we created it (ctr run): we delete it
    mode: str                               # "cni" (we ran CNI) or "existing" (CRI's netns)
    ifname: str = "eth0"
    network_name: str = ""
    cache_dir: str = cni.DEFAULT_CACHE_DIR
    interfaces: list[PlumbedInterface] = field(default_factory=list)
    dns: DNSConfig = field(default_factory=DNSConfig)
    cni_result: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        return {"version": 1, "sandbox_id": self.sandbox_id, "netns": self.netns_path,
                "owns_netns": self.owns_netns, "mode": self.mode, "ifname": self.ifname,
                "network": self.network_name, "cache_dir": self.cache_dir,
                "taps": [p.tap_name for p in self.interfaces],
                "links": [p.config.name for p in self.interfaces]}

    def describe(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.interfaces]

    def close_fds(self) -> None:
        """Close our TAP fds (once QEMU has its copies, or on teardown)."""
        for p in self.interfaces:
            plumbing.close_fd(p)

    def guest_request(self, hostname: str = "", hosts: Iterable[tuple[str, Iterable[str]]] = (),
                      link_timeout_ms: int = 0) -> network_pb2.ConfigureRequest:
        ifaces = [network_pb2.Interface(mac=p.config.mac, name=p.config.name, mtu=p.config.mtu,
                                        addresses=p.config.addresses,
                                        routes=[network_pb2.Route(dst=r.dst, gateway=r.gateway, metric=r.metric)
                                                for r in p.config.routes])
                  for p in self.interfaces]
        return network_pb2.ConfigureRequest(
            interfaces=ifaces, hostname=hostname,
            dns=network_pb2.DNS(nameservers=self.dns.nameservers, search=self.dns.search,
                                options=self.dns.options, domain=self.dns.domain),
            hosts=[network_pb2.HostEntry(ip=ip, names=list(names)) for ip, names in hosts],
            link_timeout_ms=link_timeout_ms)


async def _call(persist: Persist | None, net: HostNetwork) -> None:
    if persist is not None:
        r = persist(net.state())
        if inspect.isawaitable(r):
            await r


class HostNetworks:
    """Sets up, attaches to and tears down sandboxes' host networks (one CNI client)."""

    def __init__(self, conf_dir: str = cni.DEFAULT_CONF_DIR, bin_dirs: Iterable[str] = cni.DEFAULT_BIN_DIRS,
                 cache_dir: str = cni.DEFAULT_CACHE_DIR, lock_path: str | None = cni.DEFAULT_LOCK_PATH,
                 netns_dir: str = netns.NETNS_RUN_DIR, exec_timeout: float = cni.DEFAULT_EXEC_TIMEOUT,
                 host_resolv_conf: str | None = "/etc/resolv.conf") -> None:
        self.conf_dir, self.cache_dir, self.netns_dir = conf_dir, cache_dir, netns_dir
        self.host_resolv_conf = host_resolv_conf
        self.client = cni.CNIClient(bin_dirs=bin_dirs, cache_dir=cache_dir, lock_path=lock_path,
                                    exec_timeout=exec_timeout)

    def netns_name(self, sandbox_id: str) -> str:
        return f"spinbox-{sandbox_id}"

    async def setup(self, sandbox_id: str, network: str | Mapping[str, Any] | cni.NetworkConfigList = "",
                    ifname: str = "eth0", cni_args: Iterable[tuple[str, str]] = (),
                    capability_args: Mapping[str, Any] | None = None, persist: Persist | None = None) -> HostNetwork:
        """ctr run mode: a fresh netns, CNI ADD of the network (a name in conf_dir, "" = the
        first there, or a conflist given as data), then a TAP per interface. All or nothing."""
        if isinstance(network, cni.NetworkConfigList):
            netconf = network
        elif isinstance(network, Mapping):
            netconf = cni.parse_conflist(network)
        else:
            netconf = cni.load_network(self.conf_dir, network)
        path = netns.path_of(self.netns_name(sandbox_id), self.netns_dir)
        net = HostNetwork(sandbox_id, path, owns_netns=True, mode="cni", ifname=ifname,
                             network_name=netconf.name, cache_dir=self.cache_dir)
        rt = cni.RuntimeConf(sandbox_id, path, ifname, tuple(cni_args), dict(capability_args or {}))
        rt.validate()
        await _call(persist, net)                  # before anything exists: names only
        await netns.create(self.netns_name(sandbox_id), self.netns_dir)   # exists already: fail, touch nothing
        try:
            net.cni_result = await self.client.add(netconf, rt)
            net.interfaces = await plumbing.plumb(path)
            await _call(persist, net)
        except BaseException:
            try:
                await self.teardown(net)
            except Exception:
                pass        # the original error is what the caller must see; state is persisted
            raise
        net.dns = DNSConfig.from_cni(net.cni_result)
        if net.dns.empty() and self.host_resolv_conf:
            net.dns = DNSConfig.from_resolv_conf(self.host_resolv_conf)
        return net

    async def attach(self, netns_path: str, sandbox_id: str = "", persist: Persist | None = None,
                     dns: DNSConfig | None = None) -> HostNetwork:
        """CRI mode: CRI created the pod netns and ran CNI; only plumb its interfaces. The
        host's own netns is refused (netns.NetnsError) before anything is touched."""
        netns.check_not_host(netns_path)
        net = HostNetwork(sandbox_id, netns_path, owns_netns=False, mode="existing",
                             cache_dir=self.cache_dir, dns=dns or DNSConfig())
        net.interfaces = await plumbing.plumb(netns_path)
        try:
            await _call(persist, net)
        except BaseException:
            await plumbing.unplumb(netns_path, net.interfaces)
            raise
        return net

    async def teardown(self, net: HostNetwork | Mapping[str, Any]) -> None:
        """Release everything setup/attach created, from the live object or from its persisted
        state (after a crash). Idempotent; every step is tried, the first error is raised."""
        if isinstance(net, HostNetwork):
            live, st = net.interfaces, net.state()
        else:
            live, st = [], dict(net)
        errors: list[BaseException] = []
        path = st["netns"]
        try:
            if live:
                await plumbing.unplumb(path, live)
            else:
                await plumbing.unplumb(path, tap_names=st.get("taps") or [], veth_names=st.get("links") or [])
        except Exception as e:
            errors.append(e)
        if st.get("mode") == "cni" and st.get("network"):
            try:
                client = self.client
                if st.get("cache_dir") and st["cache_dir"] != self.cache_dir:
                    client = cni.CNIClient(self.client.bin_dirs, st["cache_dir"], self.client.lock_path,
                                           self.client.exec_timeout)
                await client.delete_cached(st["network"], st["sandbox_id"], st.get("ifname") or "eth0")
            except Exception as e:
                errors.append(e)
        if st.get("owns_netns"):
            try:
                await netns.delete(path)
            except Exception as e:
                errors.append(e)
        if isinstance(net, HostNetwork):
            net.close_fds()
        if errors:
            raise errors[0]
