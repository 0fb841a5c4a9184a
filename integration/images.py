"""Local OCI images for integration tests (no registry is reachable): busybox-static + applet
symlinks + /etc/passwd, packed as an OCI image-layout tar that `ctr images import` accepts
(docs/host-facts.md §3). Stdlib only; the result is cached per content in the temp dir.

    tar = build_busybox_image(tmp_dir)                 # -> Path of the tar
    ref = import_busybox(containerd)                   # build + `ctr images import`, returns ref
    pause = import_busybox(containerd, PAUSE_REF, cmd=["/bin/sleep", "2147483647"], namespace="k8s.io")
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = "/bin/busybox"
BUSYBOX_REF = "docker.io/library/spinbox-busybox:latest"
PAUSE_REF = "docker.io/library/spinbox-pause:latest"   # busybox whose Cmd sleeps forever (CRI sandbox_image)


def _applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout
    return sorted(a for a in out.split() if a and a != "busybox" and "/" not in a)


def _layer_tar(cmd_paths: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add_dir(name: str) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(ti)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 0
            tar.addfile(ti, io.BytesIO(data))

        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            add_dir(d)
        add_file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        for applet in cmd_paths:
            ti = tarfile.TarInfo(f"bin/{applet}")
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
            tar.addfile(ti)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    ti = tarfile.TarInfo(f"blobs/sha256/{digest}")
    ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
    tar.addfile(ti, io.BytesIO(data))
    return "sha256:" + digest


def build_busybox_image(out_dir: str | os.PathLike[str], ref: str = BUSYBOX_REF,
                        cmd: list[str] | None = None) -> Path:
    """Write `<out_dir>/<name>.tar` (an OCI image layout) and return its path."""
    layer = _layer_tar(_applets())
    layer_gz = gzip.compress(layer, mtime=0)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": cmd or ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
        "history": [{"created_by": "spinbox integration/images.py"}],
    }
    config_b = json.dumps(config, sort_keys=True).encode()
    name = ref.rsplit("/", 1)[-1].replace(":", "-")
    out = Path(out_dir) / f"{name}.tar"
    with tarfile.open(out, "w") as tar:
        config_d = _blob(tar, config_b)
        layer_d = _blob(tar, layer_gz)
        manifest = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_d, "size": len(config_b)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_d, "size": len(layer_gz)}],
        }
        manifest_b = json.dumps(manifest, sort_keys=True).encode()
        manifest_d = _blob(tar, manifest_b)
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_d,
            "size": len(manifest_b), "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1]}}]}
        for fname, data in (("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
                            ("index.json", json.dumps(index).encode())):
            ti = tarfile.TarInfo(fname)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            tar.addfile(ti, io.BytesIO(data))
    return out


def import_busybox(containerd, ref: str = BUSYBOX_REF, *, cmd: list[str] | None = None,
                   namespace: str | None = None) -> str:
    """Build the busybox image in the containerd's temp dir and import it; returns the ref.
    `cmd` sets the image's Cmd (e.g. a sleep-forever "pause" image for CRI's sandbox_image);
    `namespace` imports into another containerd namespace (CRI uses `k8s.io`)."""
    tar = build_busybox_image(containerd.base, ref, cmd)
    try:
        containerd.ctr("images", "import", str(tar), namespace=namespace)
    finally:
        tar.unlink(missing_ok=True)
    return ref
