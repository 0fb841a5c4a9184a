"""vminitd entry point.

    vminitd                                   as the VM's PID 1: everything (mounts, cgroups,
                                              channel from the kernel cmdline, power off)
    vminitd --listen unix:/path [--state-dir DIR] [--runc PATH]
                                              the agent outside a VM (a child subreaper), for tests
Addresses: unix:/path, vsock:PORT, virtio-serial:NAME.

Imports are kept lean: this module pulls in only what the first second needs; protobuf,
the runc driver and the services load after the readiness-critical mounts.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from . import init as _init
from .log import log


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vminitd", description="spinbox guest agent")
    ap.add_argument("--listen", help="unix:/path | vsock:PORT | virtio-serial:NAME (default: from the kernel cmdline)")
    ap.add_argument("--state-dir", default=None, help="runc root, bundles, sockets (default /run/spinbox)")
    ap.add_argument("--runc", default="runc", help="OCI runtime binary")
    ap.add_argument("--drain-timeout", type=float, default=5.0,
                    help="seconds without output progress before an exit is reported anyway")
    ap.add_argument("-v", "--verbose", action="store_true")
    # As PID 1 the kernel may pass unknown words from its command line: ignore them.
    return ap.parse_known_args(argv)[0]


def main(argv: list[str] | None = None) -> int:
    pid1 = os.getpid() == 1
    args = _parse(argv if argv is not None else sys.argv[1:])
    if args.verbose:
        from . import log as _log
        _log.verbose = True
    if pid1:
        _init.setup_pid1()
    try:
        return asyncio.run(_amain(args, pid1))
    except KeyboardInterrupt:
        return 130


async def _amain(args: argparse.Namespace, pid1: bool) -> int:
    from pathlib import Path

    from .agent import Agent
    from .reaper import Reaper, become_subreaper
    from .server import AgentServer

    loop = asyncio.get_running_loop()
    reaper = Reaper()
    if not pid1:
        become_subreaper()
    reaper.install(loop)
    state_dir = Path(args.state_dir or "/run/spinbox")
    # In the VM the guest is ours: /spinbox. Outside one, several agents may share the host's
    # cgroups: a parent per agent, removed at exit.
    agent = Agent(state_dir, reaper, runc_binary=args.runc, drain_idle_timeout=args.drain_timeout,
                  cgroup_parent="/spinbox" if pid1 else f"/spinbox-vminitd-{os.getpid()}")
    stop = asyncio.Event()
    power = {"reboot": False, "off": False}

    def request_power_off(reboot: bool = False) -> None:
        power.update(reboot=reboot, off=True)
        stop.set()

    server = AgentServer(agent, on_shutdown=request_power_off if pid1 else None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    listen = args.listen
    if listen is None:
        if not pid1:
            log("--listen is required outside a VM")
            return 2
        from .channel import choose_transport
        kind, addr = choose_transport(_init.cmdline())
        listen = f"{kind}:{addr}"

    kind, _, addr = listen.partition(":")
    listeners = []
    tasks = []
    from . import channel
    if kind == "unix":
        listeners.append(await channel.serve_unix(addr, server.handle_connection))
    elif kind == "vsock":
        listeners.append(await channel.serve_vsock(int(addr), server.handle_connection))
    elif kind == "virtio-serial":
        tasks.append(asyncio.ensure_future(channel.serve_virtio_serial(addr, server.serve_fd, stop)))
    else:
        log(f"unknown listen address {listen!r}")
        return 2
    log(f"ready in {_init.uptime():.2f}s (listening on {listen})")
    await stop.wait()
    log("shutting down: killing containers")
    for srv in listeners:
        srv.close()
    await agent.shutdown()
    await server.close()
    for t in tasks:
        t.cancel()
    reaper.uninstall()
    if kind == "unix":
        try:
            os.unlink(addr)
        except OSError:
            pass
    if pid1:
        _init.power_off(reboot=power["reboot"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
