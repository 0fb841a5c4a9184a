#!/usr/bin/env bash
# Build the spinbox guest kernel: Debian's linux-source-6.1 + `make tinyconfig` + kernel/spinbox.config,
# everything built in, PVH-bootable vmlinux (QEMU -kernel takes the ELF directly, no bzImage).
#
# Cached by content hash = sha256(fragment + linux-source package version + this script):
#   ${SPINBOX_CACHE_DIR:-/var/cache/spinbox}/kernel/<hash>/{vmlinux,config,kernel.json}
# and installed into ${SPINBOX_SHARE_DIR:-/usr/share/spinbox}/{vmlinux,vmlinux.config,kernel.json}.
# A cache hit only copies (well under a second).
#
# Usage: kernel/build.sh [--config-only]
#   --config-only   generate and verify the .config, do not compile (for iterating on the fragment)
# Env:   SPINBOX_CACHE_DIR, SPINBOX_SHARE_DIR, SPINBOX_KERNEL_JOBS (default: nproc),
#        SPINBOX_KERNEL_SOURCE_PKG (default linux-source-6.1), SPINBOX_KERNEL_SOURCE_TAR
set -euo pipefail

t_start=$(date +%s.%N)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment=$here/spinbox.config
self=$here/build.sh
src_pkg=${SPINBOX_KERNEL_SOURCE_PKG:-linux-source-6.1}
src_tar=${SPINBOX_KERNEL_SOURCE_TAR:-/usr/src/$src_pkg.tar.xz}
cache_root=${SPINBOX_CACHE_DIR:-/var/cache/spinbox}/kernel
share_dir=${SPINBOX_SHARE_DIR:-/usr/share/spinbox}
jobs=${SPINBOX_KERNEL_JOBS:-$(nproc)}
config_only=0

die() { echo "kernel/build.sh: error: $*" >&2; exit 1; }
log() { echo "kernel/build.sh: $*" >&2; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

for arg in "$@"; do
    case "$arg" in
        --config-only) config_only=1 ;;
        -h|--help) sed -n '2,14p' "$self"; exit 0 ;;
        *) die "unknown argument: $arg" ;;
    esac
done

[[ -f $fragment ]] || die "config fragment missing: $fragment"
src_version=$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null) \
    || die "package $src_pkg is not installed (apt-get install $src_pkg)"
[[ -f $src_tar ]] || die "kernel source tarball missing: $src_tar (from package $src_pkg)"

hash=$( { cat "$fragment"; printf '\n%s %s\n' "$src_pkg" "$src_version"; cat "$self"; } \
        | sha256sum | cut -d' ' -f1)
out=$cache_root/$hash

install_outputs() {
    mkdir -p "$share_dir"
    local f dst
    for f in vmlinux:vmlinux config:vmlinux.config kernel.json:kernel.json; do
        dst=$share_dir/${f#*:}
        # copy + rename so a reader never sees a half-written kernel
        if ! cmp -s "$out/${f%%:*}" "$dst" 2>/dev/null; then
            cp "$out/${f%%:*}" "$dst.tmp.$$"
            mv -f "$dst.tmp.$$" "$dst"
        fi
    done
    log "installed $share_dir/vmlinux (hash $hash) in $(elapsed "$t_start") s"
}

if [[ $config_only == 0 && -f $out/vmlinux && -f $out/kernel.json ]]; then
    log "cache hit: $out"
    install_outputs
    exit 0
fi

mkdir -p "$cache_root"
# One build at a time per cache: the object dir below is shared between fragment versions so
# that changing one option recompiles only what depends on it.
exec 9>"$cache_root/.build.lock"
flock 9

# Pristine source tree per package version (out-of-tree builds need it clean).
src=$cache_root/src-$src_version
if [[ ! -f $src/Makefile ]]; then
    log "extracting $src_tar"
    rm -rf "$src.tmp"
    mkdir -p "$src.tmp"
    tar -xJf "$src_tar" -C "$src.tmp" --strip-components=1
    mv "$src.tmp" "$src"
fi
obj=$cache_root/obj-$src_version
mkdir -p "$obj"

# Reproducible build metadata (no user, host, date or build counter in the image).
kmake=(make -C "$src" O="$obj" ARCH=x86_64 -j"$jobs"
       KBUILD_BUILD_TIMESTAMP="$(date -u -d @0)" KBUILD_BUILD_USER=spinbox
       KBUILD_BUILD_HOST=spinbox KBUILD_BUILD_VERSION=1)

t_build=$(date +%s.%N)
"${kmake[@]}" -s tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment" >/dev/null
"${kmake[@]}" -s olddefconfig >/dev/null

# tinyconfig + olddefconfig silently drop options whose dependencies are off: check every
# assignment of the fragment against the final .config.
missing=0
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]}
        if ! grep -qxF -- "$line" "$obj/.config"; then
            got=$(grep -E "^(# )?$sym[= ]" "$obj/.config" || echo "$sym absent (no such symbol?)")
            echo "  wanted $line, got: $got" >&2
            missing=$((missing + 1))
        fi
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]}
        if grep -qE "^$sym=" "$obj/.config"; then
            echo "  wanted $line, got: $(grep -E "^$sym=" "$obj/.config")" >&2
            missing=$((missing + 1))
        fi
    fi
done < "$fragment"
if (( missing > 0 )); then
    die "$missing option(s) of $fragment did not survive tinyconfig+olddefconfig (missing dependencies?)"
fi
log "config verified: every option of $(basename "$fragment") is in effect"
if [[ $config_only == 1 ]]; then
    echo "$obj/.config"
    exit 0
fi

log "building vmlinux with -j$jobs in $obj"
"${kmake[@]}" vmlinux
release=$(make -s -C "$src" O="$obj" ARCH=x86_64 kernelrelease)

tmp=$out.tmp.$$
rm -rf "$tmp"
mkdir -p "$tmp"
# No debug info is built (tinyconfig), so only the symbol table is left to drop. strip keeps the
# allocated sections, including the .note.Xen PVH entry point QEMU needs.
strip --strip-all -o "$tmp/vmlinux" "$obj/vmlinux"
cp "$obj/.config" "$tmp/config"
build_s=$(elapsed "$t_build")
cat > "$tmp/kernel.json" <<EOF
{
  "release": "$release",
  "source_package": "$src_pkg",
  "source_version": "$src_version",
  "hash": "$hash",
  "build_seconds": $build_s,
  "jobs": $jobs,
  "vmlinux_bytes": $(stat -c %s "$tmp/vmlinux"),
  "unstripped_bytes": $(stat -c %s "$obj/vmlinux")
}
EOF
rm -rf "$out"
mv "$tmp" "$out"
log "built $release in $build_s s -> $out"
install_outputs
