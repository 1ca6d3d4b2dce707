"""The built-in dev guest: a kernel plus a small initramfs that boots the host's own root.

A user without a guest image of their own still gets a VM that runs the project's agent:
the dev guest boots Debian's bookworm-backports kernel (6.12: SEV_GUEST, TDX_GUEST_DRIVER,
TSM_REPORTS, the haltpoll governor) with an initramfs made here from three things:

* ``busybox-static`` as the only userspace binary (``/bin/busybox``, a shell for ``/init``);
* the kernel modules the guest needs that the Debian kernel builds as modules (9p over
  virtio, overlayfs, vsock over virtio, virtio-net, virtio-blk; the SNP and TDX guest
  drivers only when the CPU flags show SNP or TDX), decompressed, with every module they
  depend on;
* ``/init``, a shell script that mounts the host's root read-only over 9p with a tmpfs
  overlay on top, switches into it with ``chroot`` and runs the agent from the project's
  venv. Because the whole host root is visible, workloads (nginx, fio, iperf3...) installed
  on the host run in the guest unchanged.

``scripts/install-guest-kernel.sh`` extracts the kernel and busybox packages into
``/var/cache/cvmctl/guest-kernel`` (``$CVM_GUEST_KERNEL_DIR``) without installing them; this
module finds them there. The built image is cached under ``$XDG_CACHE_HOME/cvmctl/dev-guest/
<key>/``, where the key hashes every input (file contents, the init script, the format
version), so a second build is a lookup and a changed kernel or init makes a new image.

Guest console protocol
----------------------
``/init`` prints one line per phase on the console, ``cvm-boot: <phase> <uptime> [detail]``
where ``<uptime>`` is the first field of ``/proc/uptime`` (seconds since the kernel started,
10 ms resolution). Phases, in order (:data:`BOOT_PHASES`): ``init-start``,
``modules-loaded tee=<none|sev-snp|tdx>``, ``root-mounted <overlay|tmpfs-dirs>``,
``agent-exec <path>``; then ``agent-exit <rc>`` and ``poweroff`` when the agent ends
(``no-agent`` when none was given). Along the way: ``module-skipped <name>`` (an optional
module failed), ``net-failed``, and ``fail <what>`` (then ``poweroff``).
:func:`parse_boot_marker` reads such a line. A daemon gets the "kernel" boot phase from
QEMU's spawn to ``init-start`` and "userspace" from there to the agent answering over vsock.

Kernel command line (see :func:`dev_guest_cmdline`): ``cvm.agent=PATH`` (an executable in the
host root), ``cvm.port=N`` (its vsock port, passed as ``--listen vsock://any:N``),
``cvm.root=TAG`` (the 9p mount tag, default ``hostroot``), ``cvm.ip=ADDR/LEN,GATEWAY`` (static
address for ``eth0``, e.g. QEMU user networking's ``10.0.2.15/24,10.0.2.2``),
``cvm.debug=shell`` (a shell on the console instead of powering off), ``cvm.9pcache=MODE``
(the 9p ``cache=`` option, default ``loose``: the host root is read-only to the guest, and
measured ~1.5 s faster to a serving agent than ``none``), ``cvm.overlay=off`` (skip the
overlay, use the fallback root). The kernel keeps keys with a dot out of init's argv and
environment, but they stay readable in ``/proc/cmdline``. The matching QEMU options:
``-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on``, a vsock device
(``vhost-vsock-pci,guest-cid=N``, or ``vhost-user-vsock-pci`` with vhost-device-vsock
holding the CID), ``-no-reboot`` (a panic then ends QEMU) and ``-serial`` for the console.

Why the initramfs is written in Python rather than with ``cpio``: the newc format is a
110-byte ASCII header per entry (``Documentation/driver-api/early-userspace/buffer-format.rst``
in the kernel tree), so the writer is short and pure; it needs no ``cpio`` package (not
installed on a minimal Debian), can record root ownership and the ``/dev/console`` device
node without running as root or under fakeroot, and fixes inode numbers and mtimes so that
the same inputs give the same bytes (a reproducible image, and a cache key that means it).

Why module dependencies come from ``.modinfo`` rather than ``modules.dep``: Debian's kernel
package does not ship ``modules.dep`` (``depmod`` writes it in the package's postinst, which
extraction skips, and ``kmod`` may not be installed). Each module records its direct
dependencies itself, as the ``depends=`` string in its ELF ``.modinfo`` section (the field
``modinfo -F depends`` prints); :func:`resolve_module_order` takes the closure. A
``modules.dep`` is used when present (:func:`parse_modules_dep`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from cvmctl.errors import CvmError, UsageError

# Bump when the image layout or the init protocol changes: it is part of the cache key.
FORMAT_VERSION = 1

DEFAULT_KERNEL_ROOT = Path("/var/cache/cvmctl/guest-kernel")
KERNEL_ROOT_ENV = "CVM_GUEST_KERNEL_DIR"
HOST_ROOT_TAG = "hostroot"
DEFAULT_AGENT_PORT = 1024

# Loaded in this order (after their dependencies); a failure stops the boot.
REQUIRED_MODULES: tuple[str, ...] = (
    "9pnet_virtio",
    "9p",
    "overlay",
    "vmw_vsock_virtio_transport",
    "virtio_net",
    "virtio_blk",
)
# Loaded, with their dependencies, only in the TEE named (a failure is logged, not fatal):
# sev-guest serves SNP guests (/dev/sev-guest, configfs-tsm), tdx-guest TDs. Loading them
# elsewhere only fails, and costs ~0.25 s under TCG. /init decides the TEE as ``tee=`` in
# _INIT_TEMPLATE: the cpuinfo flag ``tdx_guest`` (X86_FEATURE_TDX_GUEST, set only in a TD);
# ``sev_snp`` (in a guest, which is all /init ever runs in) or the ``sev-guest`` platform
# device that an SNP guest kernel registers.
OPTIONAL_MODULES: Mapping[str, str] = {"sev-guest": "sev-snp", "tdx-guest": "tdx"}

MARKER_PREFIX = "cvm-boot:"
BOOT_PHASES: tuple[str, ...] = ("init-start", "modules-loaded", "root-mounted", "agent-exec")

_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


class ImageError(CvmError):
    """The dev guest cannot be built: an input is missing or malformed."""

    exit_code = 1


# --------------------------------------------------------------------------------------------
# newc cpio (pure)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive.

    ``mode`` carries the file type bits (``stat.S_IFREG`` ...) and the permissions;
    ``data`` is the content of a regular file or the target of a symlink; ``rdev`` the
    (major, minor) of a device node.
    """

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @staticmethod
    def directory(name: str, perm: int = 0o755) -> CpioEntry:
        return CpioEntry(name, stat.S_IFDIR | perm)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return CpioEntry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(name: str, target: str) -> CpioEntry:
        return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return CpioEntry(name, stat.S_IFCHR | perm, rdev=(major, minor))


_NEWC_MAGIC = b"070701"
_NEWC_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc_member(ino: int, entry: CpioEntry, nlink: int) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime: fixed, for reproducible archives
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check: only used by the "070702" variant
    )
    header = _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + name + _pad4(len(header) + len(name)) + entry.data + _pad4(len(entry.data))


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise ``entries`` as an SVR4 "newc" cpio archive (magic ``070701``), with trailer.

    Format (kernel ``Documentation/driver-api/early-userspace/buffer-format.rst``): each
    member is the 6-byte magic and 13 fields of 8 ASCII hex digits (ino, mode, uid, gid,
    nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize including the
    NUL, check), the NUL-terminated name padded to a multiple of 4 bytes counting the
    110-byte header, then the data padded to 4 bytes; the archive ends with a member named
    ``TRAILER!!!``. Names are relative (no leading ``/``); the kernel does not create parent
    directories, so they must come before their contents (see :func:`with_parent_dirs`).
    Every file gets its own inode number and nlink 1 (no hard links); uid, gid and mtime are 0.
    """
    out = bytearray()
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        if not entry.name or entry.name.startswith("/") or entry.name == _NEWC_TRAILER:
            raise ValueError(f"bad cpio member name {entry.name!r}")
        out += _newc_member(ino, entry, 2 if stat.S_ISDIR(entry.mode) else 1)
    out += _newc_member(ino + 1, CpioEntry(_NEWC_TRAILER, 0), 1)
    return bytes(out)


def with_parent_dirs(entries: Iterable[CpioEntry]) -> list[CpioEntry]:
    """Add a 0755 directory for every missing parent, sort by name, reject duplicates.

    Sorting by path puts every directory before its contents, which the kernel's unpacker
    needs, and makes the archive independent of the order the caller listed things in.
    """
    by_name: dict[str, CpioEntry] = {}
    for entry in entries:
        if entry.name in by_name:
            raise ValueError(f"duplicate cpio member {entry.name!r}")
        by_name[entry.name] = entry
    for name in list(by_name):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            by_name.setdefault(parent, CpioEntry.directory(parent))
    return [by_name[name] for name in sorted(by_name, key=lambda n: n.split("/"))]


def parse_newc(archive: bytes) -> list[CpioEntry]:
    """Read a newc archive back (for tests and ``cvmctl image`` inspection). Stops at the trailer."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if archive[pos : pos + 6] != _NEWC_MAGIC:
            raise ValueError(f"no newc magic at offset {pos}")
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start : data_start + filesize]
        pos = data_start + filesize + (-filesize % 4)
        if name == _NEWC_TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, data, (rmaj, rmin)))


# --------------------------------------------------------------------------------------------
# kernel modules (pure)
# --------------------------------------------------------------------------------------------


def module_name(path: str) -> str:
    """The canonical module name of a module file: basename, no ``.ko[.xz|.zst|.gz]``, ``-`` -> ``_``.

    The kernel treats ``-`` and ``_`` in module names as the same character.
    """
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    """Parse ``modules.dep`` (``path: dep-path dep-path ...`` per line) into name -> dependency names."""
    deps: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise ValueError(f"malformed modules.dep line: {line!r}")
        deps[module_name(path.strip())] = tuple(module_name(p) for p in rest.split())
    return deps


def elf_section(elf: bytes, wanted: str) -> bytes | None:
    """The bytes of section ``wanted`` of a little-endian ELF64 file, or None if it has none.

    ELF64 header fields used (System V gABI): e_shoff (u64 at 0x28), e_shentsize (u16 at
    0x3A), e_shnum (u16 at 0x3C), e_shstrndx (u16 at 0x3E); section header: sh_name (u32 at
    0), sh_offset (u64 at 0x18), sh_size (u64 at 0x20).
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        (name,) = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    strtab = elf[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = header(i)
        end = strtab.find(b"\0", name_off)
        if strtab[name_off:end].decode(errors="replace") == wanted:
            return elf[offset : offset + size]
    return None


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's ``.modinfo`` section (later keys win)."""
    section = elf_section(elf, ".modinfo")
    info: dict[str, str] = {}
    for item in (section or b"").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info[key] = value
    return info


def modinfo_depends(elf: bytes) -> tuple[str, ...]:
    """A module's direct dependencies, from ``depends=`` in ``.modinfo`` (comma separated)."""
    raw = modinfo(elf).get("depends", "")
    return tuple(module_name(d) for d in raw.split(",") if d)


def resolve_module_order(
    wanted: Sequence[str],
    depends: Callable[[str], Sequence[str]],
    available: Callable[[str], bool],
) -> list[str]:
    """Every module in ``wanted`` and its dependencies, each after all it depends on.

    ``depends(name)`` gives a module's dependencies, ``available(name)`` whether it exists
    as a loadable file (built-in ones are not, and the caller drops them from ``wanted``).
    Raises :class:`ImageError` for a missing module and for a dependency cycle. The order
    is deterministic: a depth-first post-order visiting ``wanted`` and dependencies in the
    order given.
    """
    order: list[str] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str) -> None:
        name = module_name(name)
        if name in done:
            return
        if name in visiting:
            raise ImageError(f"module dependency cycle: {' -> '.join([*visiting, name])}")
        if not available(name):
            via = f" (needed by {visiting[-1]})" if visiting else ""
            raise ImageError(f"kernel module {name} not found{via}")
        visiting.append(name)
        for dep in depends(name):
            visit(dep)
        visiting.pop()
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


# --------------------------------------------------------------------------------------------
# /init and the kernel command line (pure)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InitModule:
    """A module as ``/init`` loads it: its path in the initramfs, whether failure is fatal, and
    the TEE (``sev-snp``, ``tdx``) outside of which it is not even tried (optional only)."""

    name: str
    path: str
    required: bool
    tee: str | None = None


def render_init(modules: Sequence[InitModule]) -> str:
    """The text of ``/init``: a busybox ``sh`` script (see the module docstring for its protocol).

    Steps: mount proc, sysfs and devtmpfs; load ``modules`` in order; mount the 9p share
    read-only on ``/host``; make ``/newroot`` an overlay of it with a tmpfs upper layer
    (falling back to the read-only share with tmpfs on the directories programs write:
    ``/tmp``, ``/var/tmp``, ``/var/log``, ``/var/lib``, ``/var/cache``, ``/root``, ``/home``);
    an empty tmpfs on ``/run``; move /proc, /sys, /dev into it; bring up ``lo`` (and ``eth0``
    with ``cvm.ip``); mount configfs (configfs-tsm attestation) when present; run the agent
    chrooted; power off when it exits. Any failure before the agent prints ``cvm-boot: fail
    <uptime> <what>`` and powers off (``cvm.debug=shell``: a shell instead). Optional modules
    for a TEE are grouped in ``if [ "$tee" = ... ]`` blocks, in plan order.
    """
    lines: list[str] = []
    for tee, group in itertools.groupby(modules, key=lambda m: m.tee):
        indent = "    " if tee is not None else ""
        if tee is not None:
            lines.append(f'if [ "$tee" = {tee} ]; then')
        for m in group:
            if m.required:
                lines.append(f'{indent}insmod /{m.path} || fail "insmod {m.name}"')
            else:
                lines.append(f"{indent}insmod /{m.path} 2>/dev/null || mark module-skipped {m.name}")
        if tee is not None:
            lines.append("fi")
    module_block = "\n".join(lines) if lines else ":"
    return _INIT_TEMPLATE.replace("@FORMAT@", str(FORMAT_VERSION)).replace("@MODULES@", module_block)


_INIT_TEMPLATE = r"""#!/bin/busybox sh
# /init of the cvmctl dev guest (format @FORMAT@), generated by host_daemon.image.
/bin/busybox mount -t proc proc /proc
mark() {
    { read -r up _ </proc/uptime || read -r up _ </newroot/proc/uptime; } 2>/dev/null
    echo "cvm-boot: $1 $up${2:+ $2}"
}
mark init-start
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

agent= port=1024 tag=hostroot ip= debug= cache=loose overlay=on
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        cvm.agent=*) agent=${arg#*=} ;;
        cvm.port=*) port=${arg#*=} ;;
        cvm.root=*) tag=${arg#*=} ;;
        cvm.ip=*) ip=${arg#*=} ;;
        cvm.debug=*) debug=${arg#*=} ;;
        cvm.9pcache=*) cache=${arg#*=} ;;
        cvm.overlay=*) overlay=${arg#*=} ;;
    esac
done

finish() {
    sync
    if [ "$debug" = shell ]; then
        echo "cvm-boot: debug shell (exit to power off)"
        setsid cttyhack sh
    fi
    mark poweroff
    poweroff -f
}
fail() {
    mark fail "$1"
    finish
}

tee=none
case " $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) " in
    *" tdx_guest "*) tee=tdx ;;
    *" sev_snp "*) tee=sev-snp ;;
esac
[ -e /sys/bus/platform/devices/sev-guest ] && tee=sev-snp
@MODULES@
[ -d /sys/kernel/config ] && mount -t configfs configfs /sys/kernel/config
mark modules-loaded "tee=$tee"

mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache="$cache",ro "$tag" /host \
    || fail "mount 9p $tag"
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
if [ "$overlay" = on ] && mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work \
    overlay /newroot 2>/dev/null; then
    rootmode=overlay
else
    rootmode=tmpfs-dirs
    mount --bind /host /newroot || fail "bind /host"
    for d in /tmp /var/tmp; do
        [ -d "/newroot$d" ] && mount -t tmpfs -o mode=1777 tmpfs "/newroot$d"
    done
    for d in /var/log /var/lib /var/cache /root /home; do
        [ -d "/newroot$d" ] && mount -t tmpfs -o mode=0755 tmpfs "/newroot$d"
    done
fi
for d in proc sys dev; do
    mount --move "/$d" "/newroot/$d" || fail "move /$d"
done
# The host's /run holds its pid files and sockets: start empty. (With the overlay, /tmp shows
# the host's files and takes writes in the tmpfs layer, so a test can hand the guest a file.)
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
ln -sf /proc/self/fd /newroot/dev/fd 2>/dev/null
mark root-mounted "$rootmode"

hostname cvm-dev
ip link set lo up
if [ -n "$ip" ]; then
    ip link set eth0 up && ip addr add "${ip%%,*}" dev eth0 && ip route add default via "${ip#*,}" \
        || mark net-failed "$ip"
fi

if [ -z "$agent" ]; then
    mark no-agent
    finish
fi
mark agent-exec "$agent"
chroot /newroot /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 "$agent" --listen "vsock://any:$port"
mark agent-exit "$?"
finish
"""


def dev_guest_cmdline(
    agent: str | None,
    *,
    port: int = DEFAULT_AGENT_PORT,
    console: str = "ttyS0",
    root_tag: str = HOST_ROOT_TAG,
    ip: str | None = None,
    extra: Sequence[str] = (),
) -> str:
    """The kernel command line for the dev guest (``-append``).

    ``agent`` is an absolute path in the host root (e.g. ``/work/main/.venv/bin/cvm-agent``);
    None boots to the ``no-agent`` marker and powers off. ``panic=-1`` makes a kernel panic
    reboot at once, which QEMU's ``-no-reboot`` turns into an exit.
    """
    words = [f"console={console}", "panic=-1", f"cvm.root={root_tag}"]
    if agent is not None:
        if not agent.startswith("/") or any(c.isspace() for c in agent):
            raise UsageError(f"agent path must be absolute and without spaces, got {agent!r}")
        words.append(f"cvm.agent={agent}")
    if not 1 <= port <= 0xFFFFFFFF:
        raise UsageError(f"agent port must be 1..4294967295, got {port}")
    words.append(f"cvm.port={port}")
    if ip is not None:
        if not re.fullmatch(r"[0-9.]+/\d+,[0-9.]+", ip):
            raise UsageError(f"cvm.ip must look like 10.0.2.15/24,10.0.2.2, got {ip!r}")
        words.append(f"cvm.ip={ip}")
    words.extend(extra)
    return " ".join(words)


@dataclasses.dataclass(frozen=True)
class BootMarker:
    """One ``cvm-boot:`` console line: the phase, the guest's uptime in seconds, any detail."""

    phase: str
    uptime: float
    detail: str


def parse_boot_marker(line: str) -> BootMarker | None:
    """Parse a console line; None when it is not a ``cvm-boot:`` marker (or is malformed)."""
    m = re.search(r"cvm-boot: (\S+) (\d+(?:\.\d+)?)(?: (.*))?$", line.rstrip("\r\n"))
    if m is None:
        return None
    return BootMarker(m.group(1), float(m.group(2)), m.group(3) or "")


# --------------------------------------------------------------------------------------------
# inputs on disk (I/O)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    """An extracted kernel package: its release, bzImage, and ``lib/modules/<release>`` tree."""

    release: str
    vmlinuz: Path
    modules_dir: Path


def kernel_root() -> Path:
    return Path(os.environ.get(KERNEL_ROOT_ENV) or DEFAULT_KERNEL_ROOT)


def find_guest_kernel(tree: Path | None = None) -> GuestKernel:
    """The kernel in ``tree`` (default: ``<kernel_root()>/kernel``, as the install script lays it out).

    ``tree`` is a filesystem root holding ``boot/vmlinuz-<release>`` and
    ``lib/modules/<release>/`` (or ``usr/lib/modules``), as a kernel ``.deb`` extracts.
    """
    tree = tree if tree is not None else kernel_root() / "kernel"
    hint = "run scripts/install-guest-kernel.sh (as root) or pass --kernel-tree"
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if not images:
        raise ImageError(f"no boot/vmlinuz-* under {tree}: {hint}")
    if len(images) > 1:
        raise ImageError(f"several kernels under {tree}: {', '.join(p.name for p in images)}")
    release = images[0].name.removeprefix("vmlinuz-")
    for lib in ("lib", "usr/lib"):
        modules_dir = tree / lib / "modules" / release
        if modules_dir.is_dir():
            return GuestKernel(release, images[0], modules_dir)
    raise ImageError(f"no lib/modules/{release} under {tree}: {hint}")


def is_static_elf(data: bytes) -> bool:
    """True for an ELF64 executable without a PT_INTERP program header (no dynamic loader)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def find_busybox(path: Path | None = None) -> Path:
    """A statically linked busybox: ``path``, else the install script's, else ``/bin/busybox``."""
    root = kernel_root() / "busybox"
    candidates = (
        [path] if path is not None else [root / "bin/busybox", root / "usr/bin/busybox", Path("/bin/busybox")]
    )
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            if not is_static_elf(candidate.read_bytes()):
                raise ImageError(f"{candidate} is not a static ELF64 executable (install busybox-static)")
            return candidate
    raise ImageError(
        f"no static busybox at {', '.join(str(c) for c in candidates)}: run scripts/install-guest-kernel.sh"
    )


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes, decompressing ``.ko.xz`` and ``.ko.gz`` (``.ko.zst`` is refused)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise ImageError(f"{path}: zstd-compressed modules are not supported")
    return data


class ModuleTree:
    """The loadable modules of one kernel, indexed by canonical name (I/O: reads lazily)."""

    def __init__(self, kernel: GuestKernel) -> None:
        self.kernel = kernel
        self.paths: dict[str, Path] = {}
        for dirpath, _dirs, files in os.walk(kernel.modules_dir):
            for f in files:
                if f.endswith(_MODULE_SUFFIXES):
                    self.paths.setdefault(module_name(f), Path(dirpath) / f)
        builtin = kernel.modules_dir / "modules.builtin"
        self.builtin = (
            {module_name(line) for line in builtin.read_text().split()} if builtin.is_file() else set()
        )
        dep_file = kernel.modules_dir / "modules.dep"
        self._dep = parse_modules_dep(dep_file.read_text()) if dep_file.is_file() else None
        self._elf: dict[str, bytes] = {}

    def elf(self, name: str) -> bytes:
        if name not in self._elf:
            self._elf[name] = read_module(self.paths[name])
        return self._elf[name]

    def depends(self, name: str) -> tuple[str, ...]:
        if self._dep is not None and name in self._dep:
            return self._dep[name]
        return modinfo_depends(self.elf(name))

    def relpath(self, name: str) -> str:
        """Where the (decompressed) module goes in the initramfs."""
        rel = self.paths[name].relative_to(self.kernel.modules_dir).as_posix()
        for suffix in (".xz", ".gz"):
            rel = rel.removesuffix(suffix)
        return f"lib/modules/{self.kernel.release}/{rel}"


def plan_modules(
    tree: ModuleTree, required: Sequence[str], optional: Mapping[str, str | None]
) -> list[InitModule]:
    """Resolve required and optional modules to a load list; built-in ones are dropped.

    ``optional`` maps a module to the TEE that gates it (None: always try). A missing
    optional module is left out. Each optional module brings its own dependencies, gated
    alike, minus those a required module already loads.
    """

    def loadable(names: Iterable[str]) -> list[str]:
        return [n for n in (module_name(x) for x in names) if n not in tree.builtin]

    req = resolve_module_order(loadable(required), tree.depends, tree.paths.__contains__)
    plan = [InitModule(n, tree.relpath(n), True) for n in req]
    for raw, tee in optional.items():
        names = [n for n in loadable([raw]) if n in tree.paths]
        for n in resolve_module_order(names, tree.depends, tree.paths.__contains__):
            if n not in req:
                plan.append(InitModule(n, tree.relpath(n), False, tee))
    return plan


# --------------------------------------------------------------------------------------------
# build and cache (I/O)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DevGuestImage:
    """A built dev guest: what QEMU's ``-kernel`` and ``-initrd`` take, and how it was made."""

    key: str
    directory: Path
    kernel: Path
    initrd: Path
    kernel_release: str
    modules: tuple[str, ...]
    initrd_bytes: int
    cached: bool
    build_seconds: float

    def to_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cvmctl/dev-guest`` (``~/.cache`` when unset, per the XDG base dir spec)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cvmctl" / "dev-guest"


def initramfs_entries(busybox: bytes, init: str, modules: Mapping[str, bytes]) -> list[CpioEntry]:
    """The members of the initramfs (pure): busybox, ``/init``, the modules, mount points, console."""
    entries = [
        CpioEntry.file("bin/busybox", busybox, 0o755),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.file("init", init.encode(), 0o755),
        CpioEntry.char_device("dev/console", 5, 1),  # the kernel opens it as init's stdio
        CpioEntry.char_device("dev/null", 1, 3, 0o666),
        *(CpioEntry.directory(d) for d in ("proc", "sys", "tmp", "root", "etc", "host", "newroot", "rw")),
    ]
    entries += [CpioEntry.file(path, data) for path, data in modules.items()]
    return with_parent_dirs(entries)


def _cache_key(parts: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for label, data in parts:
        h.update(label.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:24]


def build_dev_guest(
    *,
    kernel: GuestKernel | None = None,
    busybox: Path | None = None,
    cache_dir: Path | None = None,
    required_modules: Sequence[str] = REQUIRED_MODULES,
    optional_modules: Mapping[str, str | None] = OPTIONAL_MODULES,
    force: bool = False,
) -> DevGuestImage:
    """Build the dev guest's initramfs, or return the cached one built from the same inputs.

    The image directory ``<cache_dir>/<key>/`` holds ``vmlinuz`` (a copy of the kernel, so
    the image never pairs modules with another kernel), ``initramfs.cpio.gz`` and
    ``manifest.json``. Files are written under temporary names and renamed, so concurrent
    builds and interrupted ones leave either nothing or a complete image.
    """
    started = time.monotonic()
    kernel = kernel if kernel is not None else find_guest_kernel()
    busybox_path = find_busybox(busybox)
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()

    tree = ModuleTree(kernel)
    plan = plan_modules(tree, required_modules, optional_modules)
    init = render_init(plan)
    busybox_bytes = busybox_path.read_bytes()
    vmlinuz = kernel.vmlinuz.read_bytes()
    module_files = {m.path: tree.elf(m.name) for m in plan}
    key = _cache_key(
        [
            ("format", str(FORMAT_VERSION).encode()),
            ("init", init.encode()),
            ("busybox", busybox_bytes),
            ("vmlinuz", vmlinuz),
            *sorted(module_files.items()),
        ]
    )
    directory = cache_dir / key
    initrd = directory / "initramfs.cpio.gz"
    kernel_copy = directory / "vmlinuz"
    manifest = directory / "manifest.json"
    cached = not force and manifest.is_file() and initrd.is_file() and kernel_copy.is_file()
    if not cached:
        archive = newc_archive(initramfs_entries(busybox_bytes, init, module_files))
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(kernel_copy, vmlinuz)
        _atomic_write(initrd, gzip.compress(archive, compresslevel=9, mtime=0))
    image = DevGuestImage(
        key=key,
        directory=directory,
        kernel=kernel_copy,
        initrd=initrd,
        kernel_release=kernel.release,
        modules=tuple(dict.fromkeys(m.name for m in plan)),
        initrd_bytes=initrd.stat().st_size,
        cached=cached,
        build_seconds=time.monotonic() - started,
    )
    if not cached:
        record = image.to_json() | {"cached": None, "build_seconds": None}
        _atomic_write(manifest, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return image


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_cached_images(cache_dir: Path | None = None, keep: str | None = None) -> list[Path]:
    """Delete cached images other than ``keep``; returns the directories removed."""
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    removed = []
    if cache_dir.is_dir():
        for entry in sorted(cache_dir.iterdir()):
            if entry.is_dir() and entry.name != keep:
                shutil.rmtree(entry)
                removed.append(entry)
    return removed
