"""vminitd entry point.

    vminitd                                   as the VM's PID 1: everything (mounts, cgroups,
                                              channel from the kernel cmdline, power off)
    vminitd --listen unix:/path [--state-dir DIR] [--runc PATH]
                                              the agent outside a VM (a child subreaper), for tests
Addresses: unix:/path, vsock:PORT, virtio-serial:NAME.

Start-up is kept lean (under TCG every module costs tens of milliseconds): before the agent
answers its first ping only asyncio, ttrpc, the generated service descriptors and the PID 1
mounts are loaded. The agent (runc driver, bundles, stdio, network) loads right after, in the
background, or at once when a request needs it (server.AgentServer). argparse is only imported
when there are arguments to parse: as PID 1 there are none.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from types import SimpleNamespace

from . import init as _init

# `python -m spinbox.vminitd.main` runs this module as __main__: its spec still has its name,
# which puts it under the `spinbox.vminitd` logger that log.setup() configures.
log = logging.getLogger(__spec__.name if __spec__ is not None else __name__)

# Option defaults, shared by the parser and the no-argument fast path.
DEFAULTS = {"listen": None, "state_dir": None, "runc": None, "drain_timeout": 5.0, "verbose": False}


def _parse(argv: list[str]) -> SimpleNamespace:
    if not argv:
        return SimpleNamespace(**DEFAULTS)
    import argparse
    ap = argparse.ArgumentParser(prog="vminitd", description="spinbox guest agent")
    ap.add_argument("--listen", help="unix:/path | vsock:PORT | virtio-serial:NAME (default: from the kernel cmdline)")
    ap.add_argument("--state-dir", help="runc root, bundles, sockets (default /run/spinbox)")
    ap.add_argument("--runc", help="OCI runtime binary (default: the kernel command line's "
                                   "spinbox.oci_runtime in a VM, else runc)")
    ap.add_argument("--drain-timeout", type=float,
                    help="seconds without output progress before an exit is reported anyway")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.set_defaults(**DEFAULTS)
    # As PID 1 the kernel may pass unknown words from its command line: ignore them.
    return SimpleNamespace(**vars(ap.parse_known_args(argv)[0]))


def oci_runtime(cmdline: dict[str, str]) -> str:
    """The OCI runtime the host chose (kernel command line); runc when none or an unknown one
    is named (logged: the host validates the name, so an unknown one is a mismatch)."""
    from spinbox.api import contract
    name = cmdline.get(contract.OCI_RUNTIME_PARAM, "runc")
    if name not in contract.OCI_RUNTIMES:
        log.warning("unknown %s=%r: using runc", contract.OCI_RUNTIME_PARAM, name)
        return "runc"
    return name


def _hostile_wrap(cmdline: dict[str, str]):
    """The test-only hostile agent (vminitd/hostile.py), when the kernel command line asks."""
    if "spinbox.hostile" not in cmdline:
        return None
    from . import hostile
    active = hostile.modes(cmdline)
    return lambda impls, agent: hostile.wrap(impls, agent, active)


def main(argv: list[str] | None = None) -> int:
    pid1 = os.getpid() == 1
    args = _parse(argv if argv is not None else sys.argv[1:])
    from .log import setup as setup_logging
    setup_logging(verbose=args.verbose)
    if pid1:
        _init.setup_pid1()
    try:
        return asyncio.run(_amain(args, pid1))
    except KeyboardInterrupt:
        return 130


async def _amain(args: SimpleNamespace, pid1: bool) -> int:
    from .reaper import Reaper, become_subreaper
    from .server import AgentServer

    loop = asyncio.get_running_loop()
    reaper = Reaper()
    if not pid1:
        become_subreaper()
    reaper.install(loop)
    state_dir = args.state_dir or "/run/spinbox"
    runtime = args.runc or (oci_runtime(_init.cmdline()) if pid1 else "runc")

    def make_agent():
        from pathlib import Path

        from .agent import Agent
        # In the VM the guest is ours: /spinbox. Outside one, several agents may share the
        # host's cgroups: a parent per agent, removed at exit.
        return Agent(Path(state_dir), reaper, runc_binary=runtime, drain_idle_timeout=args.drain_timeout,
                     cgroup_parent="/spinbox" if pid1 else f"/spinbox-vminitd-{os.getpid()}")

    stop = asyncio.Event()
    power = {"reboot": False, "off": False}

    def request_power_off(reboot: bool = False) -> None:
        power.update(reboot=reboot, off=True)
        stop.set()

    server = AgentServer(make_agent, on_shutdown=request_power_off if pid1 else None,
                         wrap=_hostile_wrap(_init.cmdline()) if pid1 else None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    listen = args.listen
    if listen is None:
        if not pid1:
            log.warning("--listen is required outside a VM")
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
        log.warning(f"unknown listen address {listen!r}")
        return 2
    log.info(f"ready in {_init.uptime():.2f}s (listening on {listen})")
    # The agent's modules load now, while the host finishes its side of the boot. A failure
    # there (a broken image, an unwritable state dir) ends vminitd, as it would at start-up.
    warm_up = asyncio.ensure_future(server.warm_up())

    def on_warm_up_done(t: asyncio.Future[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            stop.set()

    warm_up.add_done_callback(on_warm_up_done)
    await stop.wait()
    failed = warm_up.exception() if warm_up.done() and not warm_up.cancelled() else None
    warm_up.cancel()
    log.info(f"shutting down: the agent failed to load: {failed!r}" if failed else "shutting down: killing containers")
    for srv in listeners:
        srv.close()
    if server.agent is not None:
        await server.agent.shutdown()
    await server.close()
    for t in tasks:
        t.cancel()
    reaper.uninstall()
    if kind == "unix":
        try:
            os.unlink(addr)
        except OSError:
            pass
    if failed is not None:
        raise failed
    if pid1:
        _init.power_off(reboot=power["reboot"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
