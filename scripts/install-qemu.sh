#!/usr/bin/env bash
# Install QEMU 10.0 (qemu-system-x86, qemu-utils) from Debian bookworm-backports.
#
# Why backports: bookworm's own QEMU is 7.2, which does not know `-object sev-snp-guest`
# (added in QEMU 9.1). bookworm-backports carries 10.0.x, which does; neither knows
# `tdx-guest` (QEMU 10.1+).
#
# Idempotent: the sources entry is only written when missing, and apt-get install is a no-op
# when the packages are already at the backports version. The mirror is the one the
# machine's own bookworm entry uses (deb822 /etc/apt/sources.list.d/debian.sources or the
# classic /etc/apt/sources.list), so offline/proxied set-ups keep working.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "install-qemu.sh: must run as root (apt-get)" >&2
    exit 1
fi

# Skip everything when a backports QEMU (>= 9.1, knows sev-snp-guest) is already installed.
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    ver=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    read -r major minor <<<"${ver:-0 0}"
    if (( major > 9 || (major == 9 && minor >= 1) )) && command -v qemu-img >/dev/null 2>&1 && [[ -d /usr/share/OVMF ]]; then
        echo "install-qemu.sh: QEMU ${major}.${minor} already installed"
        exit 0
    fi
fi

# shellcheck source=scripts/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"
ensure_bookworm_backports

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Recommends would pull in the GUI, SPICE and OpenGL modules; ovmf (a Recommends) is named explicitly
# because the SNP normal-VM baseline boots OVMF.
apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils ovmf
qemu-system-x86_64 --version | head -n1
