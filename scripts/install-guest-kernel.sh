#!/usr/bin/env bash
# Fetch the dev guest's kernel (Debian bookworm-backports, 6.12) and busybox-static into a
# cache directory, without installing either on this machine.
#
# Why 6.12 from backports: bookworm's own kernel (6.1) has neither the haltpoll cpuidle
# governor nor the TDX guest driver; the backports 6.12 image has SEV_GUEST,
# TDX_GUEST_DRIVER, TSM_REPORTS and CPU_IDLE_GOV_HALTPOLL.
#
# Why `apt-get download` + `dpkg-deb -x` and not `apt-get install linux-image-...`:
#   * Installing a linux-image package runs its maintainer scripts: they build an initramfs
#     for it (pulling in initramfs-tools), run update-grub where grub is present, and make it
#     the default boot entry. On a developer's machine or a CI host that would change what
#     the *host* boots next time; in a container without /boot or grub they can fail and
#     leave dpkg half-configured. We only want the files, for QEMU's -kernel and for the
#     modules we copy into our own initramfs.
#   * Extraction needs no dependency resolution (linux-image pulls kmod, linux-base,
#     initramfs-tools), never conflicts with what is installed (busybox-static Conflicts
#     with the `busybox` package that many machines have), and can be removed with `rm -rf`.
#   * The price: dpkg does not track these files, so they get no automatic upgrades. For a
#     guest kernel that is what we want: a fixed version until someone re-runs this script
#     with --upgrade.
#
# Layout (root: $CVM_GUEST_KERNEL_DIR, default /var/cache/cvmctl/guest-kernel):
#   debs/                      where the .deb files are downloaded (deleted once extracted)
#   kernel-<version>/          the kernel package extracted (boot/vmlinuz-*, lib/modules/*)
#   busybox-<version>/         busybox-static extracted (bin/busybox or usr/bin/busybox)
#   kernel -> kernel-<version> what host_daemon.devguest uses
#   busybox -> busybox-<version>
# (<version> is the Debian version with ':' replaced by '_'.)
# A directory is only linked once its extraction finished (written to *.tmp, then renamed),
# so an interrupted run never leaves a half tree behind the links.
#
# Idempotent: with both links present it does nothing (no apt-get update) unless --upgrade
# is given. The bookworm-backports sources entry is added only when no sources file names
# that suite yet (scripts/install-qemu.sh adds the same line; whichever runs first wins).
set -euo pipefail

usage() { echo "usage: $0 [--upgrade]" >&2; exit 2; }
upgrade=0
case "${1-}" in
    "") ;;
    --upgrade) upgrade=1 ;;
    *) usage ;;
esac

root=${CVM_GUEST_KERNEL_DIR:-/var/cache/cvmctl/guest-kernel}

if [[ $upgrade -eq 0 && -e "$root/kernel" && -e "$root/busybox" ]]; then
    echo "install-guest-kernel.sh: already present: $(readlink "$root/kernel"), $(readlink "$root/busybox") in $root"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install-guest-kernel.sh: must run as root (apt-get update, sources entry)" >&2
    exit 1
fi

# shellcheck source=lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"
ensure_bookworm_backports

export DEBIAN_FRONTEND=noninteractive
apt-get update -q

# linux-image-amd64 is a metapackage; the image itself is the one it depends on.
meta_version=$(apt-cache madison linux-image-amd64 | awk -F'|' '$3 ~ /bookworm-backports/ { gsub(/ /, "", $2); print $2; exit }')
if [[ -z "$meta_version" ]]; then
    echo "install-guest-kernel.sh: linux-image-amd64 not found in bookworm-backports" >&2
    exit 1
fi
image_pkg=$(apt-cache show "linux-image-amd64=${meta_version}" | sed -n 's/^Depends: *\(linux-image-[^ ,]*\).*/\1/p' | head -n1)
if [[ -z "$image_pkg" ]]; then
    echo "install-guest-kernel.sh: cannot tell which image linux-image-amd64 ${meta_version} depends on" >&2
    exit 1
fi

mkdir -p "$root/debs"
cd "$root/debs"

# fetch PACKAGE LINK: download, extract to LINK-<version>, point LINK at it.
fetch() {
    local pkg=$1 link=$2 deb version dir
    rm -f ./*.deb.partial
    # The files land in a root-owned cache: download as root rather than as _apt.
    apt-get download -q -o APT::Sandbox::User=root "$pkg"
    deb=$(ls -t ./"${pkg}"_*.deb | head -n1)
    version=$(dpkg-deb -f "$deb" Version)
    dir="$root/${link}-${version//:/_}"
    if [[ ! -d "$dir" ]]; then
        rm -rf "$dir.tmp"
        mkdir -p "$dir.tmp"
        dpkg-deb -x "$deb" "$dir.tmp"
        mv "$dir.tmp" "$dir"
    fi
    rm -f "$deb"  # the extracted tree is what is used; apt can fetch the .deb again
    ln -sfn "$(basename "$dir")" "$root/$link.new"
    mv -T "$root/$link.new" "$root/$link"
    echo "install-guest-kernel.sh: $link -> $(basename "$dir")"
}

fetch "$image_pkg" kernel
fetch busybox-static busybox

ls "$root/kernel/boot/"vmlinuz-* >/dev/null
