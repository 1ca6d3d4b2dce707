#!/usr/bin/env bash
# Record a fixture tree inside the dev guest (the backports 6.12 kernel under QEMU TCG).
#
#   scripts/record-sysroot-dev-guest.sh tests/fixtures/sysroots/tcg-guest-6.12
#
# Boots the dev guest that host_daemon.devguest builds (scripts/setup.sh installs its kernel and
# busybox), with the host root shared read-only over 9p and, as its "agent", a small script
# that runs scripts/record-sysroot.py inside the guest and prints the tree as base64 tar on
# the serial console between REC-BEGIN and REC-END; this script decodes it into the output
# directory. The guest boots with swiotlb=force (so debugfs has swiotlb/ as a CVM would) and
# psi=1. Under TCG no cpuidle driver registers and the haltpoll governor does not either.
# QEMU runs under a deadline and exits with the guest (panic=-1, -no-reboot).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUTPUT_DIR}
repo=$PWD

image_dir=$(.venv/bin/python -c 'from host_daemon.devguest import build_dev_guest; print(build_dev_guest().directory)')
work=$(mktemp -d /tmp/record-dev-guest.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

cat >"$work/in-guest.sh" <<IN_GUEST
#!/bin/sh
$repo/.venv/bin/python $repo/scripts/record-sysroot.py /tmp/rec --max-cpus 4 --mount-debugfs >/dev/null
dmesg >/tmp/rec/dmesg.txt 2>/dev/null
echo REC-BEGIN
cd /tmp/rec && tar cz . | base64 -w0
echo
echo REC-END
IN_GUEST
chmod 755 "$work/in-guest.sh"

timeout 300 qemu-system-x86_64 -accel tcg -m 768 -smp 2 \
    -kernel "$image_dir/vmlinuz" -initrd "$image_dir/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 cvm.root=hostroot cvm.agent=$work/in-guest.sh swiotlb=force psi=1" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on \
    -display none -monitor none -serial stdio -no-reboot >"$work/console.txt" 2>&1

rm -rf "$out"
mkdir -p "$out"
awk '/REC-BEGIN/{f=1;next}/REC-END/{f=0}f' "$work/console.txt" | tr -d '\r\n' | base64 -d | tar xz -C "$out"
echo "recorded into $out"
