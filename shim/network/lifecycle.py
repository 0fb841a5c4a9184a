"""One sandbox's network across its VM's life, as the shim drives it.

    net = SandboxNetworking(sandbox_id, settings, state=state)
    choice = net.decide(spec)                 # pure + reads the conf dir: bad config fails here,
                                              # before a VM is booted
    await net.prepare()                       # host side (netns, CNI ADD, TAPs); runs while the
                                              # VM boots ("generic VM first, sandbox parts after")
    await net.connect(vm, agent, hostname)    # NICs hot-plugged with the CNI MACs, guest configured
    await net.release()                       # after QEMU is gone; idempotent

Everything created is recorded in the shim's state (kind "network") before the next thing is
created, with a releaser (`release_record`) that `delete` runs after a crashed shim.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from typing import TYPE_CHECKING

from . import cni, plan

if TYPE_CHECKING:   # pyroute2 (0.2 s to import) is only loaded once a sandbox has a network
    from .sandbox import NetworkManager, SandboxNetwork

log = logging.getLogger("spinbox.shim.network")

RECORD_KIND = "network"
RELEASER = "spinbox.shim.network.lifecycle:release_record"


class NetworkSetupError(Exception):
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

    def manager(self) -> NetworkManager:
        from .sandbox import NetworkManager
        return NetworkManager(conf_dir=self.conf_dir, bin_dirs=self.bin_dirs, cache_dir=self.cache_dir,
                              lock_path=self.lock_path, host_resolv_conf=self.host_resolv_conf)


@dataclass
class ConnectedInterface:
    name: str              # in the guest
    mac: str
    addresses: list[str]
    gateway: str
    tap: str               # on the host, in the sandbox netns


@dataclass
class SandboxNetworking:
    sandbox_id: str
    settings: NetworkSettings = field(default_factory=NetworkSettings)
    state: Any = None                      # shim.state.State, or None (tests)
    owner: str = ""
    choice: plan.NetworkChoice | None = None
    net: SandboxNetwork | None = None
    interfaces: list[ConnectedInterface] = field(default_factory=list)
    _netconf: cni.NetworkConfigList | None = None
    _recorded: dict[str, Any] | None = None       # the last state persisted

    # -- decide --------------------------------------------------------------------------

    def decide(self, spec: Mapping[str, Any]) -> plan.NetworkChoice:
        s = self.settings
        try:
            choice = plan.choose(spec, enabled=s.enabled, network=s.network)
            choice, self._netconf = plan.resolve(choice, s.conf_dir)
        except (plan.PlanError, cni.CNIError) as e:
            raise NetworkSetupError(f"network for sandbox {self.sandbox_id}: {e}") from None
        self.choice = choice
        log.info("sandbox %s network: %s (%s)", self.sandbox_id, choice.mode, choice.reason)
        if choice.mode != "none" and self.state is not None:
            # Recorded before the VM is: cleanup runs newest first, so after a crash QEMU (which
            # holds the TAPs) is gone before the network is released. Filled in by prepare.
            self.state.record(RECORD_KIND, self.sandbox_id, owner=self.owner, release=RELEASER, net=None)
        return choice

    # -- host side -----------------------------------------------------------------------

    def _persist(self, net_state: dict[str, Any]) -> None:
        self._recorded = dict(net_state)
        if self.state is None:
            return
        s = self.settings
        self.state.record(RECORD_KIND, self.sandbox_id, owner=self.owner, release=RELEASER,
                          net=net_state, bin_dirs=list(s.bin_dirs), cache_dir=s.cache_dir,
                          lock_path=s.lock_path)

    async def prepare(self) -> None:
        """Create the host side of the network chosen by `decide`. All or nothing."""
        choice = self.choice
        if choice is None:
            raise RuntimeError("SandboxNetworking.prepare before decide")
        if choice.mode == "none":
            return
        from . import plumbing
        from .sandbox import DNSConfig

        mgr = self.settings.manager()
        try:
            if choice.mode == "cni":
                self.net = await mgr.setup(self.sandbox_id, self._netconf, ifname=self.settings.interface,
                                           persist=self._persist)
            else:
                dns = DNSConfig.from_resolv_conf(self.settings.host_resolv_conf) \
                    if self.settings.host_resolv_conf else None
                self.net = await mgr.attach(choice.netns_path, self.sandbox_id, persist=self._persist, dns=dns)
        except (cni.CNIError, plumbing.PlumbingError, OSError) as e:
            await self._undo(mgr)
            raise NetworkSetupError(f"network for sandbox {self.sandbox_id}: {e}") from None
        except BaseException:
            await self._undo(mgr)
            raise
        if choice.mode == "existing" and not self.net.interfaces:
            log.warning("sandbox %s: the network namespace %s has no interface to plumb",
                        self.sandbox_id, choice.netns_path)

    async def _undo(self, mgr: NetworkManager) -> None:
        # setup/attach already tried to undo what they made; make sure (idempotent) and keep
        # the record if something is still left, so `delete` retries.
        if self._recorded is not None:
            try:
                await mgr.teardown(self._recorded)
            except Exception as e:
                log.error("sandbox %s: undoing a failed network setup: %s", self.sandbox_id, e)
                return
        self._recorded = None
        self._forget()

    # -- guest side ----------------------------------------------------------------------

    async def connect(self, vm: Any, agent: Any, hostname: str = "") -> list[ConnectedInterface]:
        """Hot-plug one virtio-net per plumbed interface (the sandbox interface's MAC), hand
        QEMU the TAP fds, then configure the guest (waits for the NICs to appear there)."""
        from spinbox.shim.vm import devices

        net = self.net
        if net is not None:
            try:
                for p in net.interfaces:
                    # no handle kept: the NIC lives as long as the VM (QEMU's exit frees the TAP)
                    await devices.add_tap_nic(vm, p.tap_fd, p.config.mac)
            finally:
                net.close_fds()            # QEMU holds its own copies (or the VM is being torn down)
            req = net.guest_request(hostname=hostname,
                                    link_timeout_ms=int(self.settings.configure_timeout_s * 1000))
        else:
            from spinbox.api._pb.spinbox.agent.v1 import network_pb2
            req = network_pb2.ConfigureRequest(hostname=hostname)     # loopback up, hostname
        names = await agent.configure_network(req, timeout=self.settings.configure_timeout_s + 5)
        self.interfaces = [ConnectedInterface(names.get(p.config.mac.lower(), p.config.name), p.config.mac,
                                              list(p.config.addresses), p.config.gateway, p.tap_name)
                           for p in (net.interfaces if net is not None else [])]
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
            await self.settings.manager().teardown(net)
        elif self._recorded is not None:          # a failed prepare whose undo failed: retry
            await self.settings.manager().teardown(self._recorded)
        self._recorded = None
        self._forget()


def release_record(r: Mapping[str, Any]) -> str:
    """shim.state releaser for a "network" record (`delete` after a crash, the daemon's final
    cleanup). Sync, and called from inside the daemon's event loop too: runs the teardown on
    its own loop in a thread."""
    st = r.get("net")
    if not isinstance(st, Mapping) or not st.get("netns"):
        return "network: nothing recorded"
    from .sandbox import NetworkManager

    mgr = NetworkManager(bin_dirs=tuple(r.get("bin_dirs") or cni.DEFAULT_BIN_DIRS),
                         cache_dir=str(r.get("cache_dir") or cni.DEFAULT_CACHE_DIR),
                         lock_path=r.get("lock_path", cni.DEFAULT_LOCK_PATH))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(mgr.teardown(st))
        except BaseException as e:   # noqa: BLE001 -- handed to the caller's thread
            errors.append(e)

    t = threading.Thread(target=run, name="network-release")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return f"network of sandbox {st.get('sandbox_id')}: {st.get('mode')} in {st['netns']} released"
