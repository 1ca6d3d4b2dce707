"""Building the Debian guest image and keeping it in a cache keyed by every input (I/O).

Steps, each announced on stderr with its elapsed time (``image: [n/5] ...``):

1. the wheelhouse: cvmctl's wheel built from the source checkout, and the wheels of its
   dependencies (pinned to the versions the running interpreter has, for CPython 3.11 on
   glibc 2.36: Debian 12's Python), through pip and its configured index;
2. ``mmdebstrap`` makes the tree from Debian's packages (:mod:`.recipe`); its customize hook
   installs the wheels into ``/opt/cvmctl``, the unit and the man pages;
3. the kernel and initrd (made by the kernel package's own initramfs-tools hook in the
   chroot) are copied out for direct boot;
4. ``mkfs.ext4 -d`` turns the tree into the root file system image, with a fixed UUID,
   hash seed and time (``E2FSPROGS_FAKE_TIME``);
5. ``manifest.json`` and ``packages.txt`` (every installed package and version).

Everything is made in ``<key>.tmp`` and renamed to ``<key>`` at the end, then ``current``
is pointed at it: an interrupted build leaves nothing a VM would use, and the daemon finds
the newest image through ``current`` without the source checkout.

What is in the key: the recipe (suites, mirror, packages), the customize script, every file
the wheel is built from, the dependency pins, the unit files and the man pages. What is not:
the mirror's state. Two builds from the same key on the same day give the same package list;
``--force`` rebuilds against what the mirror has now.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from cvmcore.defaults import cache_dir
from cvmcore.durable import write_durably
from host_daemon.debimage.base import ImageBuildError
from host_daemon.debimage.recipe import (
    ROOT_LABEL,
    ROOT_UUID,
    SOURCE_DATE_EPOCH,
    Recipe,
    customize_script,
    mmdebstrap_argv,
)
from host_daemon.devguest.build import cache_key, record_json

#: The installable packages of the checkout; the wheel is built from these and pyproject.toml.
SOURCE_PACKAGES = ("cvm", "cvmcore", "cvmattest", "workloads", "guest_agent", "host_daemon", "cvmctl")
UNIT_FILES = ("cvm-agent.service", "cvm-scratch.service")
CURRENT = "current"
GUEST_PYTHON = "3.11"  # Debian 12's python3
# Debian 12's glibc is 2.36: a wheel for any older manylinux fits. pip does not widen a
# --platform it is given, so every tag is named (manylinux2014 is manylinux_2_17's old name).
GUEST_PLATFORMS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)), "manylinux2014_x86_64")
STEPS = 5


@dataclasses.dataclass(frozen=True)
class DebianImage:
    """A built image: root file system, kernel and initrd for direct boot, and how it was made."""

    key: str
    directory: Path
    root: Path
    kernel: Path
    initrd: Path
    kernel_release: str
    root_bytes: int
    packages: int
    cached: bool
    build_seconds: float

    def to_json(self) -> dict[str, object]:
        return record_json(self)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cvmctl/debian-guest``."""
    return cache_dir("debian-guest")


def source_tree(start: Path | None = None) -> Path:
    """The checkout this code runs from (the directory with pyproject.toml and systemd/)."""
    root = start if start is not None else Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "systemd").is_dir():
        raise ImageBuildError(
            f"{root} is not a cvmctl source checkout (no pyproject.toml and systemd/): "
            "the image installs a wheel built from one; pass --source DIR"
        )
    return root


def source_files(root: Path) -> list[Path]:
    """The files a wheel is built from, sorted: Python sources, stubs, markers, the project file."""
    files = [root / "pyproject.toml", root / "README.md", root / "LICENSE"]
    for package in SOURCE_PACKAGES:
        base = root / "proto" / package if package == "cvm" else root / package
        for path in base.rglob("*"):
            if (
                path.is_file()
                and "__pycache__" not in path.parts
                and path.suffix in (".py", ".pyi", ".typed", ".pem")
            ):
                files.append(path)
    return sorted(f for f in files if f.is_file())


def dependency_pins() -> list[str]:
    """``name==version`` of every distribution the running interpreter has (pip constraints)."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "cvmctl":
            pins[re.sub(r"[-_.]+", "-", name).lower()] = dist.version
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


class _Progress:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.step = 0

    def __call__(self, message: str) -> None:
        self.step += 1
        elapsed = time.monotonic() - self.started
        print(f"image: [{self.step}/{STEPS}] {message} ({elapsed:.0f} s)", file=self.stream, flush=True)


def _run(argv: list[str], what: str, *, env: Mapping[str, str] | None = None, timeout: float = 1800) -> None:
    """Run a build step with its output on our stderr; a failure names the step."""
    try:
        done = subprocess.run(argv, stdout=sys.stderr, env=env, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{what}: {argv[0]} is not installed (run scripts/install-image-tools.sh)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from exc
    if done.returncode != 0:
        raise ImageBuildError(f"{what}: {argv[0]} exited with {done.returncode} (its output is above)")


def _wheelhouse(source: Path, pins: list[str], out: Path) -> None:
    out.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
        "building the cvmctl wheel",
    )
    wheels = sorted(out.glob("cvmctl-*.whl"))
    if not wheels:
        raise ImageBuildError("building the cvmctl wheel: pip made no cvmctl-*.whl")
    constraints = out.parent / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    _run(
        [
            *pip,
            "download",
            "--quiet",
            "--dest",
            str(out),
            "--only-binary=:all:",
            f"--python-version={GUEST_PYTHON}",
            "--implementation=cp",
            *(f"--platform={tag}" for tag in GUEST_PLATFORMS),
            "--constraint",
            str(constraints),
            str(wheels[0]),
        ],
        "fetching the dependencies' wheels",
    )


def _image_size(tree: Path, free_mib: int) -> int:
    """Bytes for an ext4 holding ``tree`` with ``free_mib`` to spare, in whole 64 MiB."""
    used = 0
    for dirpath, _dirs, files in os.walk(tree):
        for f in files:
            try:
                used += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                continue
    mib = used // (1 << 20)
    total = int(mib * 1.15) + 64 + free_mib  # inodes, journal and metadata on top of the data
    return ((total + 63) // 64) * 64 << 20


def _load(directory: Path, key: str, cached: bool, seconds: float) -> DebianImage | None:
    manifest = directory / "manifest.json"
    try:
        record = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    image = DebianImage(
        key=key,
        directory=directory,
        root=directory / "root.img",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        kernel_release=str(record.get("kernel_release", "")),
        root_bytes=int(record.get("root_bytes", 0)),
        packages=int(record.get("packages", 0)),
        cached=cached,
        build_seconds=seconds,
    )
    if not (image.root.is_file() and image.kernel.is_file() and image.initrd.is_file()):
        return None
    return image


def current_key(cache: Path | None = None) -> str | None:
    """The key ``current`` points at (the last image built), None before the first build."""
    link = (cache if cache is not None else default_cache_dir()) / CURRENT
    return link.resolve().name if link.exists() else None


def current_image(cache: Path | None = None) -> DebianImage:
    """The image ``current`` points at (the last one built); for the daemon, which has no checkout."""
    cache = cache if cache is not None else default_cache_dir()
    key = current_key(cache)
    image = _load(cache / key, key, True, 0.0) if key is not None else None
    if image is None:
        raise ImageBuildError(f"no Debian guest image in {cache}: run `cvmctl image build debian` first")
    return image


def load_image(directory: Path) -> DebianImage:
    """An image directory given by path (``image = "/path/to/dir"`` in a spec)."""
    image = _load(directory, directory.name, True, 0.0)
    if image is None:
        raise ImageBuildError(
            f"{directory} is not a built Debian guest image (root.img, vmlinuz, initrd.img, manifest.json)"
        )
    return image


def build_debian_image(
    *,
    man_pages: Mapping[str, bytes],
    recipe: Recipe | None = None,
    source: Path | None = None,
    cache: Path | None = None,
    force: bool = False,
    progress: TextIO | None = None,
) -> DebianImage:
    """Build the image, or return the cached one built from the same inputs (see the module doc)."""
    started = time.monotonic()
    recipe = recipe if recipe is not None else Recipe()
    source = source_tree(source)
    cache = cache if cache is not None else default_cache_dir()
    units = {name: (source / "systemd" / name).read_bytes() for name in UNIT_FILES}
    script = customize_script(unit_files=sorted(units), man_pages=sorted(man_pages))
    pins = dependency_pins()
    files = source_files(source)
    key = cache_key(
        [
            ("recipe", recipe.describe().encode()),
            ("script", script.encode()),
            ("pins", "\n".join(pins).encode()),
            *((f"unit:{name}", data) for name, data in sorted(units.items())),
            *((f"man:{name}", data) for name, data in sorted(man_pages.items())),
            *((f"src:{f.relative_to(source).as_posix()}", f.read_bytes()) for f in files),
        ]
    )
    if not force and (image := _cached(cache, key, started)) is not None:
        return image

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "a+b") as lock:
        # One build at a time per cache (two would share <key>.tmp); a build that waited
        # finds the image the other one made.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and (image := _cached(cache, key, started)) is not None:
            return image
        return _build(recipe, source, cache, key, units, man_pages, script, pins, started, progress)


def _cached(cache: Path, key: str, started: float) -> DebianImage | None:
    image = _load(cache / key, key, True, time.monotonic() - started)
    if image is not None:
        _point_current(cache, key)
    return image


def _build(
    recipe: Recipe,
    source: Path,
    cache: Path,
    key: str,
    units: Mapping[str, bytes],
    man_pages: Mapping[str, bytes],
    script: str,
    pins: list[str],
    started: float,
    progress: TextIO | None,
) -> DebianImage:
    directory = cache / key
    say = _Progress(progress if progress is not None else sys.stderr)
    work = cache / f"{key}.tmp"
    if work.exists():
        shutil.rmtree(work)
    (work / "stage" / "units").mkdir(parents=True)
    (work / "stage" / "man").mkdir()
    for name, data in units.items():
        (work / "stage" / "units" / name).write_bytes(data)
    for name, data in man_pages.items():
        (work / "stage" / "man" / name).write_bytes(data)
    hook = work / "customize.sh"
    hook.write_text(script)
    hook.chmod(0o755)

    say(f"wheelhouse: cvmctl from {source}, {len(pins)} pinned dependencies")
    _wheelhouse(source, pins, work / "stage" / "wheels")

    say(f"mmdebstrap {recipe.suite}: {len(recipe.packages)} packages from {recipe.mirror}")
    tree = work / "tree"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
    _run(mmdebstrap_argv(recipe, str(tree), str(work / "stage"), str(hook)), "mmdebstrap", env=env)
    packages_txt = work / "packages.txt"
    shutil.copyfile(work / "stage" / "packages.txt", packages_txt)  # the hook's dpkg-query

    say("kernel and initrd for direct boot")
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one kernel in the image's /boot, found {[k.name for k in kernels]}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    initrd = tree / "boot" / f"initrd.img-{release}"
    if not initrd.is_file():
        raise ImageBuildError(f"the kernel package made no {initrd.name} (initramfs-tools missing?)")
    shutil.copyfile(kernels[0], work / "vmlinuz")
    shutil.copyfile(initrd, work / "initrd.img")

    size = _image_size(tree, recipe.free_mib)
    say(f"root file system: ext4, {size >> 20} MiB")
    root_img = work / "root.img"
    with open(root_img, "wb") as f:
        f.truncate(size)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            ROOT_LABEL,
            "-U",
            ROOT_UUID,
            "-E",
            f"hash_seed={ROOT_UUID},root_owner=0:0",
            "-d",
            str(tree),
            str(root_img),
        ],
        "mkfs.ext4",
        env={**env, "E2FSPROGS_FAKE_TIME": str(SOURCE_DATE_EPOCH)},
    )
    shutil.rmtree(tree)
    shutil.rmtree(work / "stage")

    say("manifest")
    packages = packages_txt.read_text().splitlines()
    record = {
        "key": key,
        "kernel_release": release,
        "root_bytes": root_img.stat().st_size,
        "packages": len(packages),
        "recipe": recipe.describe().splitlines(),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    write_durably(
        work / "manifest.json", (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), mode=0o644
    )
    if directory.exists():
        shutil.rmtree(directory)
    work.rename(directory)
    _point_current(cache, key)
    image = _load(directory, key, False, time.monotonic() - started)
    assert image is not None
    return image


def _point_current(cache: Path, key: str) -> None:
    link = cache / CURRENT
    if link.is_symlink() and os.readlink(link) == key:
        return
    tmp = cache / f"{CURRENT}.new"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(key)
    tmp.replace(link)


def remove_cached_images(cache: Path | None = None, keep: str | None = None) -> list[Path]:
    """Delete cached images other than ``keep`` (and unfinished ``*.tmp`` builds); those removed."""
    cache = cache if cache is not None else default_cache_dir()
    removed = []
    if cache.is_dir():
        for entry in sorted(cache.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and entry.name != keep:
                shutil.rmtree(entry)
                removed.append(entry)
    return removed
