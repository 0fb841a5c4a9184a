#!/usr/bin/env bash
# Fallback guest kernel: Debian's linux-image-cloud-amd64, unpacked (not installed: nothing goes to
# /boot or /lib/modules), turned into a PVH-bootable vmlinux, plus the modules the guest needs.
#
# Output, in ${SPINBOX_SHARE_DIR:-/usr/share/spinbox}/debian/:
#   vmlinux          ELF extracted from the bzImage (CONFIG_PVH=y: QEMU -kernel boots it directly)
#   vmlinux.config   the kernel's config
#   modules/*.ko     virtio, vsock, virtio-mem, fuse/virtiofs, erofs, overlay and their dependencies
#   modules.load     the .ko names in insmod order (dependencies first), one per line
#   kernel.json      release, package version, module list
# The guest image (initrd/) must insmod modules.load in order before it touches any device:
# this kernel has every virtio driver as a module, and no 9p at all.
# Cached in ${SPINBOX_CACHE_DIR:-/var/cache/spinbox}/kernel/debian/<package version>/.
set -euo pipefail

t_start=$(date +%s.%N)
meta_pkg=${SPINBOX_DEBIAN_KERNEL_PKG:-linux-image-cloud-amd64}
share_dir=${SPINBOX_SHARE_DIR:-/usr/share/spinbox}/debian
cache_root=${SPINBOX_CACHE_DIR:-/var/cache/spinbox}/kernel/debian
# What the guest needs; dependencies are added from modules.dep.
wanted=(virtio_pci virtio_mmio virtio_blk virtio_console virtio_net virtio_mem virtio_balloon
        virtio_rng vmw_vsock_virtio_transport erofs fuse virtiofs overlay)

die() { echo "kernel/debian-kernel.sh: error: $*" >&2; exit 1; }
log() { echo "kernel/debian-kernel.sh: $*" >&2; }

# The metapackage depends on the versioned image package, e.g. linux-image-6.1.0-56-cloud-amd64.
image_pkg=$(apt-cache depends "$meta_pkg" 2>/dev/null \
            | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $image_pkg ]] || die "cannot resolve $meta_pkg to an image package (apt-get update?)"
pkg_version=$(apt-cache policy "$image_pkg" | awk '/Candidate:/ {print $2}')
release=${image_pkg#linux-image-}
work=$cache_root/$image_pkg-$pkg_version

if [[ ! -f $work/done ]]; then
    rm -rf "$work"
    mkdir -p "$work/deb" "$work/root"
    log "downloading $image_pkg $pkg_version"
    # (run as root: keep apt from trying to drop to _apt, which cannot write our cache)
    (cd "$work/deb" && apt-get download -q -o APT::Sandbox::User=root \
        "$image_pkg=$pkg_version" >/dev/null)
    dpkg-deb -x "$work"/deb/*.deb "$work/root"
    # modules.dep is made by depmod at install time, it is not in the package
    depmod -b "$work/root" "$release"

    # The bzImage payload is compressed (LZ4 for this kernel); find the stream by its magic and
    # decompress it. The result is the ELF vmlinux with its PVH note.
    python3 - "$work/root/boot/vmlinuz-$release" "$work/vmlinux" <<'EOF'
import lzma, gzip, subprocess, sys, zlib
data = open(sys.argv[1], "rb").read()
candidates = [  # (magic, decompress command)
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
    (b"\x1f\x8b\x08", ["gzip", "-dc"]),
]
for magic, cmd in candidates:
    i = data.find(magic)
    while i >= 0:
        # trailing garbage after the stream makes the tools complain; the output is still whole
        out = subprocess.run(cmd, input=data[i:], capture_output=True).stdout
        if out[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(out)
            sys.exit(0)
        i = data.find(magic, i + 1)
sys.exit("no compressed ELF payload found in " + sys.argv[1])
EOF
    readelf -n "$work/vmlinux" | grep -q 'Xen.*0x00000012' \
        || die "extracted vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
    touch "$work/done"
fi

moddir=$work/root/lib/modules/$release
[[ -f $moddir/modules.dep ]] || die "no modules.dep in $moddir (depmod failed?)"

# Resolve dependencies (modules.dep lines: "kernel/path/a.ko: kernel/path/b.ko ...", where the
# dependencies are already listed in load order); emit dependencies before dependants.
mapfile -t load_order < <(python3 - "$moddir/modules.dep" "${wanted[@]}" <<'EOF'
import os, sys
deps = {}
for line in open(sys.argv[1]):
    mod, _, rest = line.partition(":")
    deps[mod] = rest.split()
by_name = {os.path.basename(m).split(".ko")[0].replace("-", "_"): m for m in deps}
order, seen = [], set()
def visit(m):
    if m in seen:
        return
    seen.add(m)
    for d in reversed(deps[m]):  # modules.dep lists the deepest dependency last
        visit(d)
    order.append(m)
for name in sys.argv[2:]:
    if name not in by_name:
        sys.exit(f"module {name} not in this kernel")
    visit(by_name[name])
print("\n".join(order))
EOF
)

rm -rf "$share_dir.tmp"
mkdir -p "$share_dir.tmp/modules"
names=()
for rel in "${load_order[@]}"; do
    base=$(basename "$rel")
    case "$base" in
        *.ko) cp "$moddir/$rel" "$share_dir.tmp/modules/$base" ;;
        *.ko.xz) xz -dc "$moddir/$rel" > "$share_dir.tmp/modules/${base%.xz}"; base=${base%.xz} ;;
        *) die "unexpected module file $rel" ;;
    esac
    names+=("$base")
done
printf '%s\n' "${names[@]}" > "$share_dir.tmp/modules.load"
cp "$work/vmlinux" "$share_dir.tmp/vmlinux"
cp "$work/root/boot/config-$release" "$share_dir.tmp/vmlinux.config"
cat > "$share_dir.tmp/kernel.json" <<EOF
{
  "release": "$release",
  "package": "$image_pkg",
  "package_version": "$pkg_version",
  "vmlinux_bytes": $(stat -c %s "$work/vmlinux"),
  "modules": [$(printf '"%s",' "${names[@]}" | sed 's/,$//')]
}
EOF
rm -rf "$share_dir"
mkdir -p "$(dirname "$share_dir")"
mv "$share_dir.tmp" "$share_dir"
log "installed $release ($pkg_version) into $share_dir with ${#names[@]} modules in" \
    "$(awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }') s"
