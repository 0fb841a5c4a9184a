"""A private CNI test network for integration tests: its own bridge, a random 10.x.y.0/24, a
host-local dataDir under the test's temp dir, ipMasq off (no iptables rules), and the checks
that nothing of it is left (leases, veths on the bridge, cached results)."""
from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
from pathlib import Path

CNI_BIN = Path("/usr/lib/cni")
CNI_CACHE = Path("/var/lib/cni/results")


def missing_for_vm_networking(share_dir: Path) -> list[str]:
    """What a test with real guests on a CNI bridge needs beyond containerd (one line each)."""
    why = []
    for tool in ("qemu-system-x86_64", "runc", "busybox", "ip"):
        if shutil.which(tool) is None:
            why.append(f"`{tool}` not found")
    for plugin in ("bridge", "host-local", "loopback"):
        if not os.access(CNI_BIN / plugin, os.X_OK):
            why.append(f"no CNI plugin {CNI_BIN / plugin}")
    if not (share_dir / "image.json").exists():
        why.append(f"no guest image in {share_dir} (run scripts/setup / `task build`)")
    return why


class TestNet:
    """The private network: bridge, subnet, conf dir, IPAM dir. `prefix` names the bridge
    (`<prefix>-<random>`, at most 15 characters) and the network (`<prefix>-net-<random>`)."""

    __test__ = False      # not a pytest test class

    def __init__(self, work: Path, prefix: str = "spbn", conf_dir: Path | None = None) -> None:
        tag = secrets.token_hex(3)
        self.bridge = f"{prefix}-{tag}"
        self.name = f"{prefix}-net-{tag}"
        self.subnet = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        self.gateway = str(self.subnet.network_address + 1)
        self.nameserver = str(self.subnet.network_address + 53)
        self.conf_dir = conf_dir or work / "cni-conf"
        self.ipam_dir = work / "ipam"
        self.conf_dir.mkdir(parents=True, exist_ok=True)

    def conflist(self, name: str | None = None, **bridge_over) -> dict:
        bridge = {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                  "hairpinMode": True,
                  "ipam": {"type": "host-local", "ranges": [[{"subnet": str(self.subnet)}]],
                           "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.ipam_dir)},
                  # the bridge plugin copies this into its result: the guest's resolv.conf
                  "dns": {"nameservers": [self.nameserver], "search": ["sbx.test"]}}
        bridge.update(bridge_over)
        return {"cniVersion": "1.0.0", "name": name or self.name, "plugins": [bridge, {"type": "loopback"}]}

    def write(self, filename: str, doc: dict | str) -> Path:
        p = self.conf_dir / filename
        p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return p

    def leases(self) -> list[str]:
        """IP addresses host-local has handed out (its dataDir/<network>/<ip> files)."""
        out = []
        if self.ipam_dir.exists():
            for d in self.ipam_dir.iterdir():
                for f in d.iterdir() if d.is_dir() else []:
                    try:
                        ipaddress.ip_address(f.name)
                    except ValueError:
                        continue          # lock, last_reserved_ip.0
                    out.append(f.name)
        return sorted(out)

    def veths(self) -> list[str]:
        """Links enslaved to our bridge (each a sandbox's host-side veth)."""
        r = subprocess.run(["ip", "-j", "link", "show", "master", self.bridge], capture_output=True, text=True)
        return [link["ifname"] for link in json.loads(r.stdout or "[]")]

    def cached_results(self) -> list[str]:
        return sorted(p.name for p in CNI_CACHE.glob(f"{self.name}-*")) if CNI_CACHE.is_dir() else []

    def remove_bridge(self) -> None:
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
