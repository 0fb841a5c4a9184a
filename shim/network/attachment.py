"""One sandbox's attachment to its network, across its VM's life. Host side only: it never
touches the VM or the agent. It hands the sandbox a plan, and the sandbox applies it.

    net = NetworkAttachment(sandbox_id, settings, state=state)
    choice = net.decide(spec)          # pure + reads the conf dir: bad config fails here,
                                       # before a VM is booted
    await net.prepare()                # host side (netns, CNI ADD, TAPs); runs while the VM
                                       # boots ("generic VM first, sandbox parts after")
    plan = net.plan(hostname)          # the NICs to hot-plug + the guest's ConfigureRequest
    try:                               # ... the sandbox, with the VM and the agent:
        for nic in plan.nics:
            await devices.add_tap_nic(vm, nic.tap_fd, nic.mac)
    finally:
        net.close_tap_fds()            # QEMU holds its own copies (or the VM is going away)
    names = await agent.configure_network(plan.request, timeout=plan.agent_timeout_s)
    net.record_guest(names)            # the guest's interface names, logged and kept
    await net.release()                # after QEMU is gone; idempotent

Everything created is recorded in the shim's state (kind "network") before the next thing is
created; `release_network_record`, registered for that kind, is what `delete` runs after a
crashed shim.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spinbox.shim import releasers
from spinbox.shim.errors import HostError

from . import cni, netns, plan as plan_mod

if TYPE_CHECKING:   # pyroute2 (0.2 s to import) is only loaded once a sandbox has a network
    from spinbox.api._pb.spinbox.agent.v1 import network_pb2
    from spinbox.shim.state import State

    from .host import HostNetwork, HostNetworks

log = logging.getLogger(__name__)

RECORD_KIND = "network"
GUEST_CALL_MARGIN_S = 5.0     # the agent call outlives the guest's own wait for its links


class NetworkSetupError(HostError):
    """The sandbox network could not be set up; the message names the cause (a plugin's own
    message, a config file, an annotation). Nothing it created is left behind."""


@dataclass(frozen=True)
class NetworkSettings:
    enabled: bool = True
    network: str = ""                      # CNI network name; "" = first config in conf_dir
    interface: str = "eth0"
    conf_dir: str = cni.DEFAULT_CONF_DIR
    bin_dirs: tuple[str, ...] = cni.DEFAULT_BIN_DIRS
    cache_dir: str = cni.DEFAULT_CACHE_DIR
    lock_path: str | None = cni.DEFAULT_LOCK_PATH
    host_resolv_conf: str | None = "/etc/resolv.conf"
    configure_timeout_s: float = 30.0      # guest Configure (waits for the hot-plugged NICs)

    @classmethod
    def from_config(cls, cfg: Any) -> NetworkSettings:
        """From a shim.config.SpinboxConfig."""
        return cls(enabled=cfg.network.enabled, network=cfg.network.network,
                   interface=cfg.network.interface, conf_dir=cfg.paths.cni_conf_dir,
                   bin_dirs=tuple(cfg.paths.cni_bin_dirs),
                   configure_timeout_s=max(cfg.timeouts.agent_call_s, 30.0))

    def host_networks(self) -> HostNetworks:
        from .host import HostNetworks
        return HostNetworks(conf_dir=self.conf_dir, bin_dirs=self.bin_dirs, cache_dir=self.cache_dir,
                            lock_path=self.lock_path, host_resolv_conf=self.host_resolv_conf)


@dataclass(frozen=True)
class NicPlan:
    """One virtio-net NIC for the sandbox to hot-plug."""
    tap_fd: int            # ours: QEMU gets a copy; closed by `close_tap_fds` afterwards
    mac: str               # the sandbox interface's MAC (the guest NIC must answer to it)
    tap_name: str          # on the host, in the sandbox netns (for logs)
    guest_name: str        # the name the guest should give it (the netns interface's)


@dataclass(frozen=True)
class GuestNetworkPlan:
    """What the sandbox applies to its VM and agent: NICs first, then the guest config."""
    nics: tuple[NicPlan, ...]
    request: network_pb2.ConfigureRequest   # for agent.configure_network (waits for the NICs)
    agent_timeout_s: float                   # timeout of that agent call


@dataclass
class ConnectedInterface:
    name: str              # in the guest
    mac: str
    addresses: list[str]
    gateway: str
    tap: str               # on the host, in the sandbox netns


@dataclass
class NetworkAttachment:
    sandbox_id: str
    settings: NetworkSettings = field(default_factory=NetworkSettings)
    state: State | None = None             # None in tests: nothing recorded
    owner: str = ""
    choice: plan_mod.NetworkChoice | None = None
    net: HostNetwork | None = None
    interfaces: list[ConnectedInterface] = field(default_factory=list)
    _netconf: cni.NetworkConfigList | None = None
    _recorded: dict[str, Any] | None = None       # the last state persisted

    # -- decide --------------------------------------------------------------------------

    def decide(self, spec: Mapping[str, Any]) -> plan_mod.NetworkChoice:
        s = self.settings
        try:
            choice = plan_mod.choose(spec, enabled=s.enabled, network=s.network)
            if choice.mode == "existing":       # before anything is recorded or touched
                netns.check_not_host(choice.netns_path)
            choice, self._netconf = plan_mod.resolve(choice, s.conf_dir)
        except (plan_mod.PlanError, cni.CNIError, netns.NetnsError) as e:
            raise NetworkSetupError(f"network for sandbox {self.sandbox_id}: {e}") from None
        self.choice = choice
        log.info("sandbox %s network: %s (%s)", self.sandbox_id, choice.mode, choice.reason)
        if choice.mode != "none" and self.state is not None:
            # Recorded before the VM is: cleanup runs newest first, so after a crash QEMU (which
            # holds the TAPs) is gone before the network is released. Filled in by prepare.
            self.state.record(RECORD_KIND, self.sandbox_id, owner=self.owner, net=None)
        return choice

    # -- host side -----------------------------------------------------------------------

    def _persist(self, net_state: dict[str, Any]) -> None:
        self._recorded = dict(net_state)
        if self.state is None:
            return
        s = self.settings
        self.state.record(RECORD_KIND, self.sandbox_id, owner=self.owner, net=net_state,
                          bin_dirs=list(s.bin_dirs), cache_dir=s.cache_dir, lock_path=s.lock_path)

    async def prepare(self) -> None:
        """Create the host side of the network chosen by `decide`. All or nothing."""
        choice = self.choice
        if choice is None:
            raise RuntimeError("NetworkAttachment.prepare before decide")
        if choice.mode == "none":
            return
        from . import plumbing
        from .host import DNSConfig

        nets = self.settings.host_networks()
        try:
            if choice.mode == "cni":
                self.net = await nets.setup(self.sandbox_id, self._netconf or "",
                                            ifname=self.settings.interface, persist=self._persist)
            else:
                dns = DNSConfig.from_resolv_conf(self.settings.host_resolv_conf) \
                    if self.settings.host_resolv_conf else None
                self.net = await nets.attach(choice.netns_path, self.sandbox_id, persist=self._persist,
                                             dns=dns)
        except (cni.CNIError, plumbing.PlumbingError, netns.NetnsError, OSError) as e:
            await self._undo(nets)
            raise NetworkSetupError(f"network for sandbox {self.sandbox_id}: {e}") from None
        except BaseException:
            await self._undo(nets)
            raise
        if choice.mode == "existing" and not self.net.interfaces:
            log.warning("sandbox %s: the network namespace %s has no interface to plumb",
                        self.sandbox_id, choice.netns_path)

    async def _undo(self, nets: HostNetworks) -> None:
        # setup/attach already tried to undo what they made; make sure (idempotent) and keep
        # the record if something is still left, so `delete` retries.
        if self._recorded is not None:
            try:
                await nets.teardown(self._recorded)
            except Exception as e:
                log.error("sandbox %s: undoing a failed network setup: %s", self.sandbox_id, e)
                return
        self._recorded = None
        self._forget()

    # -- the plan the sandbox applies to its VM and agent --------------------------------

    def plan(self, hostname: str = "") -> GuestNetworkPlan:
        """One NIC per plumbed interface (its TAP fd and the sandbox interface's MAC), and the
        guest's ConfigureRequest. Without a network: no NIC; the guest still gets loopback up
        and its hostname."""
        timeout = self.settings.configure_timeout_s
        net = self.net
        if net is None:
            from spinbox.api._pb.spinbox.agent.v1 import network_pb2
            return GuestNetworkPlan((), network_pb2.ConfigureRequest(hostname=hostname),
                                    timeout + GUEST_CALL_MARGIN_S)
        nics = tuple(NicPlan(p.tap_fd, p.config.mac, p.tap_name, p.config.name) for p in net.interfaces)
        req = net.guest_request(hostname=hostname, link_timeout_ms=int(timeout * 1000))
        return GuestNetworkPlan(nics, req, timeout + GUEST_CALL_MARGIN_S)

    def close_tap_fds(self) -> None:
        """Close our TAP fds once the NICs are plugged (QEMU holds its own copies) or the
        hot-plug failed (the VM is being torn down). Idempotent."""
        if self.net is not None:
            self.net.close_fds()

    def record_guest(self, names: Mapping[str, str]) -> list[ConnectedInterface]:
        """The agent's answer to the plan's request: guest interface name by MAC (lower case).
        An interface the guest did not name keeps the name it was asked to take."""
        plumbed = self.net.interfaces if self.net is not None else []
        self.interfaces = [ConnectedInterface(names.get(p.config.mac.lower(), p.config.name), p.config.mac,
                                              list(p.config.addresses), p.config.gateway, p.tap_name)
                           for p in plumbed]
        for i in self.interfaces:
            log.info("sandbox %s: guest %s %s %s gw %s (tap %s)", self.sandbox_id, i.name, i.mac,
                     ",".join(i.addresses), i.gateway or "-", i.tap)
        return self.interfaces

    # -- teardown ------------------------------------------------------------------------

    def _forget(self) -> None:
        if self.state is not None:
            with contextlib.suppress(Exception):
                self.state.forget(RECORD_KIND, self.sandbox_id)

    async def release(self) -> None:
        """CNI DEL, TAPs and our netns removed (the VM must be gone: QEMU holds the TAPs).
        Idempotent. A failure keeps the record, so `delete` retries."""
        net, self.net = self.net, None
        if net is not None:
            await self.settings.host_networks().teardown(net)
        elif self._recorded is not None:          # a failed prepare whose undo failed: retry
            await self.settings.host_networks().teardown(self._recorded)
        self._recorded = None
        self._forget()


@releasers.releaser(RECORD_KIND)
async def release_network_record(r: dict[str, Any]) -> str:
    """A "network" record (`delete` after a crash, the daemon's final cleanup): the teardown,
    from what `prepare` persisted."""
    st = r.get("net")
    if not isinstance(st, Mapping) or not st.get("netns"):
        return "network: nothing recorded"
    from .host import HostNetworks

    nets = HostNetworks(bin_dirs=tuple(r.get("bin_dirs") or cni.DEFAULT_BIN_DIRS),
                        cache_dir=str(r.get("cache_dir") or cni.DEFAULT_CACHE_DIR),
                        lock_path=r.get("lock_path", cni.DEFAULT_LOCK_PATH))
    await nets.teardown(st)
    return f"network of sandbox {st.get('sandbox_id')}: {st.get('mode')} in {st['netns']} released"
