"""Generate (or check) the Python modules for our .proto files.

Two source trees:
  * `api/proto/**.proto`  -> `api/_pb/**_pb2.py`   imported as `spinbox.api._pb.*`
  * `ttrpc/request.proto` -> `ttrpc/request_pb2.py` (the ttrpc library stays standalone)

protoc writes imports from the proto import path (`from containerd.types import mount_pb2`);
that would make `containerd` (and `types`) top-level packages, so the imports of our own files
are re-rooted under `spinbox.api._pb`. Proto package names, type URLs and the wire format are
unchanged by this: only where Python finds the module moves.

    python -m spinbox.api.protogen           # regenerate
    python -m spinbox.api.protogen --check   # exit 1 if the committed modules are stale
"""
from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "api" / "proto"
OUT_DIR = ROOT / "api" / "_pb"
PKG = "spinbox.api._pb"
TTRPC_PROTO = ROOT / "ttrpc" / "request.proto"


def _protoc(args: list[str]) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    import google.rpc  # googleapis-common-protos ships google/rpc/status.proto

    gapi = str(Path(google.rpc.__path__[0]).parent.parent)
    rc = protoc.main(["protoc", f"-I{include}", f"-I{gapi}", *args])
    if rc != 0:
        raise SystemExit(f"protoc failed ({rc}) for {args[-1]}")


def _rewrite_imports(path: Path, roots: set[str]) -> None:
    # One pass over all roots: a root named like PKG's own first part (`spinbox`, for the guest
    # API) must not be re-rooted again after another root's rewrite produced `from spinbox...`.
    alt = "|".join(re.escape(r) for r in sorted(roots))
    text = path.read_text()
    text = re.sub(rf"^from ({alt})(\.| import)", rf"from {PKG}.\1\2", text, flags=re.M)
    text = re.sub(rf"^import ({alt})\.", rf"import {PKG}.\1.", text, flags=re.M)
    path.write_text(text)


def generate(out: Path, ttrpc_out: Path) -> None:
    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    roots = {p.split("/")[0] for p in protos}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if protos:
        _protoc([f"-I{PROTO_DIR}", f"--python_out={out}", f"--pyi_out={out}", *protos])
    for dirpath, _, _ in os.walk(out):
        Path(dirpath, "__init__.py").touch()
    for f in out.rglob("*_pb2.py*"):
        _rewrite_imports(f, roots)
    ttrpc_out.mkdir(parents=True, exist_ok=True)
    _protoc([f"-I{TTRPC_PROTO.parent}", f"--python_out={ttrpc_out}", f"--pyi_out={ttrpc_out}",
             TTRPC_PROTO.name])


def _tree(d: Path) -> dict[str, Path]:
    return {p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file()
            and "__pycache__" not in p.parts}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out, tout = Path(tmp, "_pb"), Path(tmp, "ttrpc")
        generate(out, tout)
        stale = []
        want, have = _tree(out), _tree(OUT_DIR) if OUT_DIR.exists() else {}
        for name in sorted(set(want) | set(have)):
            if name not in want or name not in have or not filecmp.cmp(want[name], have[name], shallow=False):
                stale.append(f"api/_pb/{name}")
        for name in ("request_pb2.py", "request_pb2.pyi"):
            theirs = ROOT / "ttrpc" / name
            if not theirs.exists() or not filecmp.cmp(tout / name, theirs, shallow=False):
                stale.append(f"ttrpc/{name}")
    if stale:
        print("generated protobuf modules are stale; run `task protos`:", *stale, sep="\n  ",
              file=sys.stderr)
        return 1
    print("protobuf modules are current")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if generated files are stale")
    a = ap.parse_args()
    if a.check:
        return check()
    generate(OUT_DIR, ROOT / "ttrpc")
    print(f"generated {OUT_DIR.relative_to(ROOT)} and ttrpc/request_pb2.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
