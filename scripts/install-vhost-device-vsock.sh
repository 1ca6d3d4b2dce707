#!/usr/bin/env bash
# Install vhost-device-vsock (the rust-vmm vhost-user vsock backend) from Debian unstable,
# with an apt pin so that nothing else is ever taken from unstable.
#
# Why: these machines have no /dev/vhost-vsock, so QEMU's vhost-vsock-pci cannot work. QEMU's
# vhost-user-vsock-pci with vhost-device-vsock gives the guest a real virtio-vsock device while
# the host side is a unix socket ("hybrid vsock": connect, send `CONNECT <port>\n`, read
# `OK <port>\n`). The package exists only in unstable; on bookworm it needs nothing but libc.
#
# What it changes, all idempotent (rewritten with the same content on every run):
#   /etc/apt/sources.list.d/cvmctl-unstable.sources   the unstable suite, same mirror and keyring
#   /etc/apt/preferences.d/cvmctl-unstable            the pin:
#       Package: vhost-device-vsock / Pin: release a=unstable / Pin-Priority: 500
#       Package: *                  / Pin: release a=unstable / Pin-Priority: -1
# apt_preferences(5): the first *specific* record matching a version decides its priority;
# general records (Package: *) only apply when no specific one does. A priority below 0
# forbids installing the version, so every other package (libc6 included) keeps coming from
# bookworm, and `apt-get upgrade` can never pull anything else from unstable. If a future
# unstable vhost-device-vsock needs a newer libc than bookworm's, apt refuses it instead of
# upgrading libc.
set -euo pipefail

if command -v vhost-device-vsock >/dev/null 2>&1 && [[ -f /etc/apt/preferences.d/cvmctl-unstable ]]; then
    echo "install-vhost-device-vsock.sh: already installed: $(vhost-device-vsock --version 2>/dev/null | head -n1)"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install-vhost-device-vsock.sh: must run as root (apt-get)" >&2
    exit 1
fi

# shellcheck source=lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"
mirror=$(debian_mirror)

# The pin goes in first, so that there is never a moment when unstable is a source without it.
cat >/etc/apt/preferences.d/cvmctl-unstable <<'EOF'
# Written by cvmctl scripts/install-vhost-device-vsock.sh: take only vhost-device-vsock from
# unstable; never install or upgrade anything else from it.
Package: vhost-device-vsock
Pin: release a=unstable
Pin-Priority: 500

Package: *
Pin: release a=unstable
Pin-Priority: -1
EOF

cat >/etc/apt/sources.list.d/cvmctl-unstable.sources <<EOF
# Written by cvmctl scripts/install-vhost-device-vsock.sh (pinned: see
# /etc/apt/preferences.d/cvmctl-unstable).
Types: deb
URIs: ${mirror}
Suites: unstable
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends vhost-device-vsock
vhost-device-vsock --version 2>/dev/null | head -n1 || true
