"""`containerd-shim-spinbox-v1`: the entry point containerd executes.

The Task service arrives with the Shim issue; until then only `-v` works and every other action
fails with a message that says so (containerd shows the shim's output in its error).
"""
from __future__ import annotations

import sys

VERSION = "0.1.0"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "-v" in args or "--version" in args:
        print(f"containerd-shim-spinbox-v1 version {VERSION}")
        return 0
    print("containerd-shim-spinbox-v1: the task service is not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
