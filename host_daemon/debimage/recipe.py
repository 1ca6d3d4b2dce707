"""What goes into the Debian guest image, and the commands that make it (pure: no I/O here).

:class:`Recipe` is every choice the build makes that is not a file: the suites and mirror,
the packages, the image's free space. :func:`mmdebstrap_argv` turns it into the one
``mmdebstrap`` command line, :func:`customize_script` into the shell script mmdebstrap runs
on the host after the packages are installed (``--customize-hook``, with the chroot as
``$1``), and :func:`guest_cmdline` into the kernel command line that boots the image.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence

from cvmcore.defaults import AGENT_VSOCK_PORT

# Bump when the layout of the image directory or the customize script's contract changes.
FORMAT_VERSION = 1

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

# bookworm's own kernel (6.1) has SEV_GUEST and the haltpoll cpuidle driver, but not
# TDX_GUEST_DRIVER (upstream 6.2) nor TSM_REPORTS, the configfs-tsm report interface
# (upstream 6.7). bookworm-backports' kernel (6.12) has all four; only the kernel comes from
# there (apt's "package/suite" form), everything else from bookworm and its updates.
KERNEL_PACKAGE = f"linux-image-amd64/{SUITE}-backports"

BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",  # systemd-run and systemctl from the agent: the bus the unit's ExecStart reaches
    "kmod",
    "iproute2",
    "initramfs-tools",
    "zstd",  # initramfs-tools' default compressor in bookworm
    "python3",
    "python3-venv",  # /opt/cvmctl is a venv, as the unit's comment tells users to make it
    "man-db",  # `man cvm-agent`: the unit's Documentation=
    "e2fsprogs",  # mkfs.ext4 for the scratch disk (cvm-scratch.service)
)
"""The system: init, the kernel's module loader and initramfs, Python for the agent, man, and
the file system tools for the scratch disk."""

WORKLOAD_PACKAGES = (
    "nginx",
    "iperf3",
    "iputils-ping",
    "memcached",
    "libmemcached-tools",
    "fio",
    "sysbench",
    "stress-ng",
    "mbw",
    "msr-tools",
    "cpuid",
)
"""The catalogue's guest tools (workloads.catalogue: Workload.guest_tools), as
scripts/install-workload-tools.sh installs them on a host."""

LEFT_OUT_OF_IMAGE: dict[str, str] = {
    "blender": "about 640 MB installed with its 153 dependencies (scripts/install-workload-tools.sh), "
    "more than the rest of the image together; a guest without it refuses the blender workload "
    "with one line naming the package",
}
"""Catalogue guest tools the image does not carry, and why."""

SERVICES_OFF = (
    "nginx.service",
    "memcached.service",
    "iperf3.service",
    "systemd-networkd-wait-online.service",
)
"""Installed, never started at boot: the benchmarks start their own instance on their own
port and config; nothing in the image waits for network-online.target."""

MASKED_UNITS = (
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "sys-kernel-debug.mount",  # the agent mounts debugfs itself, read-only, in its namespace
    "sys-kernel-tracing.mount",
    "dev-hugepages.mount",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-pstore.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "fstrim.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "man-db.timer",
    "getty@tty1.service",  # no display: the console's serial getty stays
    "modprobe@drm.service",  # no display
)
"""What a headless virtio guest with a snapshot root never uses: masked, because under TCG
every unit and module costs seconds of boot."""

BLACKLISTED_MODULES = (
    "kvm",
    "kvm_amd",
    "kvm_intel",
    "ahci",
    "libahci",
    "i2c_i801",
    "i2c_smbus",
    "lpc_ich",
    "iTCO_wdt",
    "iTCO_vendor_support",
    "pcspkr",
    "serio_raw",
    "bochs",
    "floppy",
    "joydev",
    "evdev",
)
"""Drivers udev would load for QEMU's q35 board (SATA, SMBus, watchdog, VGA, input) that a guest
reached over virtio never uses (modprobe.d(5) ``blacklist``: no loading by alias)."""

SERVICES_ON = (
    "cvm-agent.service",
    "cvm-scratch.service",  # wanted by the scratch disk's device: runs only in a VM that has one
    "systemd-networkd.service",
    "systemd-network-generator.service",
)

INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
"""What the initrd needs to mount the root (their dependencies come along: initramfs-tools'
manual_add_modules resolves them); everything else udev loads from the root later."""

ROOT_LABEL = "cvm-root"
# A fixed file system UUID and directory hash seed: two builds from the same tree give the
# same superblock (mkfs.ext4 picks both at random otherwise).
ROOT_UUID = "6c1c4d1e-5b7a-4c4f-9f57-63766d726f6f"
SOURCE_DATE_EPOCH = 1735689600  # 2025-01-01T00:00:00Z: file times in the image
STAGE_IN_GUEST = "/tmp/cvm-stage"
VENV = "/opt/cvmctl"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything the image is made of besides files; part of the cache key."""

    mirror: str = DEFAULT_MIRROR
    security_mirror: str = DEFAULT_SECURITY_MIRROR
    suite: str = SUITE
    packages: tuple[str, ...] = (*BASE_PACKAGES, KERNEL_PACKAGE, *WORKLOAD_PACKAGES)
    free_mib: int = 768  # room for logs, the workloads' scratch files and pip's caches

    def sources(self) -> list[str]:
        """One-line apt sources, as mmdebstrap takes them after the target."""
        s, m = self.suite, self.mirror
        return [
            f"deb {m} {s} main",
            f"deb {m} {s}-updates main",
            f"deb {self.security_mirror} {s}-security main",
            f"deb {m} {s}-backports main",
        ]

    def describe(self) -> str:
        """A stable text of the recipe for the cache key and the manifest."""
        return "\n".join(
            [f"format {FORMAT_VERSION}", *self.sources(), *sorted(self.packages), str(self.free_mib)]
        )


def mmdebstrap_argv(recipe: Recipe, target: str, stage: str, hook: str) -> list[str]:
    """``mmdebstrap`` making a directory tree at ``target``, then running ``hook`` with the
    chroot as $1 and ``stage`` (the host directory of wheels, units and man pages) as $2.

    ``--variant=apt``: Essential packages plus apt, then only what :class:`Recipe` names and
    their dependencies (no Priority: important set, no recommends), so the image holds what
    the agent and the catalogue use. The directory format lets the build copy the kernel
    out and make the ext4 file system itself with a fixed UUID.
    """
    argv = [
        "mmdebstrap",
        "--variant=apt",
        "--format=directory",
        f"--include={','.join(recipe.packages)}",
        "--aptopt=APT::Install-Recommends false",
        # The tree is in root's cache directory, which apt's _apt user cannot enter.
        '--aptopt=APT::Sandbox::User "root"',
        # Before the kernel package's postinst builds the initrd: only the modules that find
        # and mount the root go in (MODULES=most takes every storage and file system driver,
        # several times the size, and a TCG guest pays for each byte it decompresses).
        "--essential-hook=" + initramfs_config_command(),
        f'--customize-hook={shlex.quote(hook)} "$1" {shlex.quote(stage)}',
    ]
    return [*argv, recipe.suite, target, *recipe.sources()]


def initramfs_config_command() -> str:
    """A hook command: initramfs-tools told to take only :data:`INITRD_MODULES` (MODULES=list)."""
    modules = "\\n".join(INITRD_MODULES)
    # modules.d, not /etc/initramfs-tools/modules: that one is the package's conffile.
    return (
        'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d" && '
        "printf 'MODULES=list\\n' > \"$1/etc/initramfs-tools/conf.d/cvm.conf\" && "
        f"printf '{modules}\\n' > \"$1/usr/share/initramfs-tools/modules.d/cvm\""
    )


def customize_script(*, unit_files: Sequence[str], man_pages: Sequence[str]) -> str:
    """The customize hook (runs on the host, the chroot as ``$1``): agent, units, config.

    ``$2`` is the staging directory, copied to :data:`STAGE_IN_GUEST` in the chroot:
    ``wheels/`` (the wheelhouse), ``units/`` (``unit_files``) and ``man/`` (``man_pages``,
    the section is the suffix). Writes the installed package list (``dpkg-query``) to
    ``$2/packages.txt``.
    """
    units = " ".join(shlex.quote(u) for u in unit_files)
    pages = " ".join(shlex.quote(p) for p in man_pages)
    return f"""#!/bin/sh
# cvmctl Debian guest: customize hook for mmdebstrap (generated by host_daemon.debimage).
set -eu
root=$1
rm -rf "$root{STAGE_IN_GUEST}"
cp -a "$2" "$root{STAGE_IN_GUEST}"
echo "image: installing cvmctl into {VENV}" >&2
chroot "$root" python3 -m venv {VENV}
chroot "$root" {VENV}/bin/pip install --quiet --no-index --no-cache-dir --disable-pip-version-check \\
    --find-links {STAGE_IN_GUEST}/wheels cvmctl

echo "image: units, man pages, configuration" >&2
for unit in {units}; do
    install -m 0644 "$root{STAGE_IN_GUEST}/units/$unit" "$root/etc/systemd/system/$unit"
done
for page in {pages}; do
    section=${{page##*.}}
    install -D -m 0644 "$root{STAGE_IN_GUEST}/man/$page" "$root/usr/local/share/man/man$section/$page"
done
rm -rf "$root{STAGE_IN_GUEST}"
chroot "$root" mandb --quiet || true

chroot "$root" systemctl enable {" ".join(SERVICES_ON)}
chroot "$root" systemctl disable {" ".join(SERVICES_OFF)} 2>/dev/null || true
chroot "$root" systemctl mask {" ".join(MASKED_UNITS)}
printf 'blacklist %s\\n' {" ".join(BLACKLISTED_MODULES)} > "$root/etc/modprobe.d/cvm-guest.conf"

echo cvm-guest > "$root/etc/hostname"
printf '127.0.0.1 localhost\\n127.0.1.1 cvm-guest\\n' > "$root/etc/hosts"
printf 'LABEL={ROOT_LABEL} / ext4 rw,errors=remount-ro 0 1\\n' > "$root/etc/fstab"
# /dev/cpu/N/msr for the vmexit workload's rdmsr timing.
printf 'msr\\n' > "$root/etc/modules-load.d/cvm-workloads.conf"
# The console is the only way in; the journal stays in memory (the disk is a snapshot).
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\\nStorage=volatile\\nForwardToConsole=no\\n' > "$root/etc/systemd/journald.conf.d/cvm.conf"

chroot "$root" dpkg-query -W -f '${{Package}}\\t${{Version}}\\n' | LC_ALL=C sort > "$2/packages.txt"
"""


def guest_cmdline(*, console: str, ip: str | None, root_label: str = ROOT_LABEL) -> str:
    """The kernel command line for the image: root by label, console, a static address.

    ``ip`` is ``ADDR/LEN,GATEWAY`` (the dev guest's ``cvm.ip`` form) or None for no network;
    systemd-network-generator turns the ``ip=`` option it becomes into a .network file
    (the dracut syntax, ``ip=<client>::<gateway>:<netmask>::<interface>:off``).
    ``net.ifnames=0`` keeps the first NIC ``eth0`` so that the option can name it.
    ``fsck.mode=skip``: the root is a fresh snapshot of a file system made by mkfs.
    """
    words = [f"root=LABEL={root_label}", "rw", f"console={console}", "fsck.mode=skip", "net.ifnames=0"]
    if ip is not None:
        address, gateway = ip.split(",")
        addr, prefix = address.split("/")
        words.append(f"ip={addr}::{gateway}:{_netmask(int(prefix))}::eth0:off")
    return " ".join(words)


def _netmask(prefix: int) -> str:
    bits = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    return ".".join(str((bits >> s) & 0xFF) for s in (24, 16, 8, 0))


def agent_listen() -> str:
    """What the unit's ExecStart passes as --listen (the host dials this port)."""
    return f"vsock://any:{AGENT_VSOCK_PORT}"
