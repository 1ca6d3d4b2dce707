"""The build's inputs on disk: the guest kernel, busybox, the kernel's module tree."""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from host_daemon.devguest.base import ImageError
from host_daemon.devguest.init import InitModule
from host_daemon.devguest.modules import (
    MODULE_SUFFIXES,
    modinfo_depends,
    module_name,
    parse_modules_dep,
    resolve_module_order,
)

DEFAULT_KERNEL_ROOT = Path("/var/cache/cvmctl/guest-kernel")
KERNEL_ROOT_ENV = "CVM_GUEST_KERNEL_DIR"


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
                if f.endswith(MODULE_SUFFIXES):
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
