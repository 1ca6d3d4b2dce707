"""Kernel modules (pure): names, ``modules.dep``, ``.modinfo`` dependencies, load order."""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence

from host_daemon.devguest.base import ImageError

# Loaded in this order (after their dependencies); a failure stops the boot.
REQUIRED_MODULES: tuple[str, ...] = (
    "9pnet_virtio",
    "9p",
    "overlay",
    "vmw_vsock_virtio_transport",
    "virtio_net",
    "virtio_blk",
    # The scratch disk's file system (Debian builds ext4 as a module). ext4 asks the crypto
    # API for crc32c at mount time, which would modprobe it: there is no modprobe here, so
    # the generic implementation is loaded first.
    "crc32c_generic",
    "ext4",
)
# Loaded, with their dependencies, only in the TEE named (a failure is logged, not fatal):
# sev-guest serves SNP guests (/dev/sev-guest, configfs-tsm), tdx-guest TDs. Loading them
# elsewhere only fails, and costs boot time. /init decides the TEE as ``tee=`` in
# _INIT_TEMPLATE: the cpuinfo flag ``tdx_guest`` (X86_FEATURE_TDX_GUEST, set only in a TD);
# ``sev_snp`` (in a guest, which is all /init ever runs in) or the ``sev-guest`` platform
# device that an SNP guest kernel registers.
OPTIONAL_MODULES: Mapping[str, str] = {"sev-guest": "sev-snp", "tdx-guest": "tdx"}

MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def module_name(path: str) -> str:
    """The canonical module name of a module file: basename, no ``.ko[.xz|.zst|.gz]``, ``-`` -> ``_``.

    The kernel treats ``-`` and ``_`` in module names as the same character.
    """
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
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
