"""Building the dev guest image and keeping it in a cache keyed by every input."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cvmcore.defaults import cache_dir
from cvmcore.durable import write_durably
from host_daemon.devguest.base import FORMAT_VERSION
from host_daemon.devguest.cpio import CpioEntry, newc_archive, with_parent_dirs
from host_daemon.devguest.init import render_init
from host_daemon.devguest.inputs import GuestKernel, ModuleTree, find_busybox, find_guest_kernel, plan_modules
from host_daemon.devguest.modules import OPTIONAL_MODULES, REQUIRED_MODULES


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
        return record_json(self)


def record_json(record: object) -> dict[str, object]:
    """A dataclass instance as JSON-ready fields (paths as strings): the images' manifests."""
    d = dataclasses.asdict(record)  # type: ignore[call-overload]
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cvmctl/dev-guest``."""
    return cache_dir("dev-guest")


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


def cache_key(parts: Iterable[tuple[str, bytes]]) -> str:
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
    key = cache_key(
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
        write_durably(kernel_copy, vmlinuz, mode=0o644)
        write_durably(initrd, gzip.compress(archive, compresslevel=9, mtime=0), mode=0o644)
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
        write_durably(manifest, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)
    return image


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
