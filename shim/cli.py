"""`spinbox`: the host command-line tool.

    spinbox check                      diagnose this host and boot one test VM
    spinbox template build|list|remove the VM template cache of this host's config
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="spinbox", description="spinbox host tool")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="diagnose this host and boot one test VM")
    tp = sub.add_parser("template", help="the VM template cache (runtime.start = template)")
    tp.add_argument("action", choices=("build", "list", "remove"),
                    help="build: boot and save the template of this config's VM shape now "
                         "(the first sandbox then starts from it); list; remove all")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        from spinbox.shim.check import run_check

        return run_check()
    if args.cmd == "template":
        return _template(args.action)
    return 2


if __name__ == "__main__":
    sys.exit(main())
