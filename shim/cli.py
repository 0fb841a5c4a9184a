"""`spinbox`: the host command-line tool.

    spinbox check                      diagnose this host and boot one test VM
    spinbox template build|list|remove the VM template cache of this host's config
    spinbox monitor [--listen|--socket]  Prometheus endpoint for every sandbox (docs/monitoring.md)
    spinbox install [--root D] [--dry-run] [--edit-config] [--cni]
                                       put the shim where the host's containerd finds it
    spinbox uninstall [--root D] [--dry-run]  remove exactly what install added
"""
from __future__ import annotations

import argparse
import asyncio
import sys


def _template(action: str) -> int:
    from spinbox.shim import config as config_mod
    from spinbox.shim.errors import SpinboxError
    from spinbox.shim.templates import TemplateCache

    try:
        cfg = config_mod.load()
        cache = TemplateCache(config_mod.template_dir(cfg))
        if action == "list":
            for p in cache.templates():
                print(p)
            return 0
        if action == "remove":
            for p in cache.remove_all():
                print(f"removed {p}")
            return 0
        if cfg.runtime.start != "template":
            print(f"runtime.start is {cfg.runtime.start!r}: no template needed")
            return 0
        t = asyncio.run(cache.build(config_mod.vm_config(cfg), config_mod.guest_image(cfg).hash))
    except SpinboxError as e:
        print(f"spinbox template {action}: {e}", file=sys.stderr)
        return 1
    print(f"built {t.dir}")
    return 0


def _add_install_parsers(sub) -> None:
    from spinbox.shim import install

    ip = sub.add_parser("install", help="put the shim where the host's containerd finds it; "
                                        "write /etc/spinbox/config.json if absent; add or show "
                                        "the containerd runtime entry")
    up = sub.add_parser("uninstall", help="remove exactly what install added (its manifest, "
                                          f"{install.MANIFEST}); config.toml as it was before")
    for p in (ip, up):
        p.add_argument("--root", default="/", help="do everything below this directory (default /)")
        p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    ip.add_argument("--edit-config", action="store_true",
                    help="containerd 1.6/1.7: append the runtime tables to config.toml (saved first; "
                         "uninstall restores it) instead of printing them")
    ip.add_argument("--cni", action="store_true",
                    help=f"also install the example CNI network for ctr run ({install.CNI_CONFLIST}; "
                         "only into an empty CNI conf dir)")
    ip.add_argument("--containerd", default="containerd", help="the containerd binary to ask its version")
    ip.add_argument("--containerd-version", default=None, metavar="X.Y",
                    help="containerd's version instead of asking the binary")
    ip.add_argument("--shim", default=None, help="the shim the launcher runs (default: this "
                                                 "installation's containerd-shim-spinbox-v1)")
    ip.add_argument("--share-dir", default=install.DEFAULT_SHARE_DIR,
                    help="paths.share_dir of a new config.json (guest kernel and image)")


def _install(args: argparse.Namespace) -> int:
    from spinbox.shim import install

    if args.cmd == "uninstall":
        return install.run_uninstall(args.root, dry_run=args.dry_run)
    return install.run_install(args.root, dry_run=args.dry_run, edit_config=args.edit_config,
                               cni=args.cni, containerd=args.containerd,
                               containerd_version=args.containerd_version, shim=args.shim,
                               share_dir=args.share_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="spinbox", description="spinbox host tool")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="diagnose this host and boot one test VM")
    tp = sub.add_parser("template", help="the VM template cache (runtime.start = template)")
    tp.add_argument("action", choices=("build", "list", "remove"),
                    help="build: boot and save the template of this config's VM shape now "
                         "(the first sandbox then starts from it); list; remove all")
    _add_install_parsers(sub)
    # listed here for --help; its own parser takes its arguments (below)
    sub.add_parser("monitor", add_help=False,
                   help="Prometheus metrics of this node's sandboxes (spinbox monitor --help)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["monitor"]:
        from spinbox.shim.monitor import run as run_monitor

        return run_monitor(argv[1:])
    args = ap.parse_args(argv)
    if args.cmd == "check":
        from spinbox.shim.check import run_check

        return run_check()
    if args.cmd == "template":
        return _template(args.action)
    if args.cmd in ("install", "uninstall"):
        return _install(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
