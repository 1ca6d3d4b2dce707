#!/usr/bin/env bash
# Install libvirt's daemon and client from Debian bookworm-backports, for the libvirt provider
# of the host exporter (`cvm-hostd --libvirt URI`) and its tests.
#
# Why backports: bookworm's libvirt 9.0 starts QEMU with `-no-acpi`, an option QEMU 10 (the
# project's QEMU, scripts/install-qemu.sh) no longer has, so no domain starts. libvirt 11.3 from
# bookworm-backports drives QEMU 10.0.
#
# What: the daemon with only its QEMU driver (libvirt-daemon, libvirt-daemon-driver-qemu; no
# network/nwfilter/storage drivers, so a started daemon never creates a default bridge on the
# host), virsh (libvirt-clients), virtlogd (libvirt-daemon-log), and libvirt-dev + pkg-config so
# pip can build the optional libvirt-python binding (the `libvirt` extra). No daemon is started
# by the install (policy-rc.d answers 101 while apt runs): tests start their own `libvirtd -d`.
#
# Idempotent: nothing happens when every package is installed at a version >= 11.
set -euo pipefail

log() { printf 'install-libvirt: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (apt-get)"
    exit 1
fi

PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-log libvirt-clients libvirt-dev pkg-config)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
    ver=$(dpkg-query -W -f='${Version}' libvirt-daemon)
    if [[ ${ver%%.*} =~ ^[0-9]+$ ]] && (( ${ver%%.*} >= 11 )); then
        log "already installed: libvirt ${ver}"
        exit 0
    fi
    missing=("${PACKAGES[@]}")
fi

# shellcheck source=scripts/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"
ensure_bookworm_backports

forbid_service_starts scripts/install-libvirt.sh

log "installing ${missing[*]} from bookworm-backports (services are not started)"
export DEBIAN_FRONTEND=noninteractive
# apt's lock may be held by another installer on a shared machine: wait for it.
apt-get update -q -o DPkg::Lock::Timeout=600
apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends -t bookworm-backports "${missing[@]}"
log "done: $(libvirtd --version)"
