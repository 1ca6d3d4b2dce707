"""The ``[scratch]`` disk: a raw file the daemon creates for each boot and deletes after it.

The study measured storage on a raw disk opened with ``aio=native`` and ``cache=none``
(O_DIRECT; docs/study.md, "Network and storage parameters"). A VM whose spec has a
``[scratch]`` table gets such a disk, backed by ``<run dir>/scratch.raw``:

* **where**: always the VM's own run directory (``<state_dir>/vms/<name>/``); the spec names
  no path, so a spec can never make the daemon create, truncate or delete a file elsewhere.
* **how**: created exclusively (``O_EXCL | O_NOFOLLOW``, mode 0600, any stale file of an
  earlier boot removed first), sized with ``ftruncate`` (sparse) and then reserved with
  ``fallocate(2)`` where the file system supports it, so that the guest's writes never meet
  ENOSPC (QEMU's default ``werror=enospc`` would pause the VM) and a benchmark's first writes do
  not pay for block allocation. Not on tmpfs: there ``fallocate`` pins RAM. Without
  ``fallocate`` the file stays sparse and the start is refused when the file system has less
  free space than the disk's size.
* **aio and cache** (``auto``): the daemon opens the new file with O_DIRECT and writes and
  reads one aligned 4 KiB block. If that works the disk gets ``cache=none`` and
  ``aio=native``, as the study's; if not (a file system without O_DIRECT) ``cache=writeback``
  and ``aio=threads`` (io_uring is not chosen automatically: a kernel may disable it with
  ``kernel.io_uring_disabled`` or a sandbox's seccomp filter, and QEMU then fails to start;
  with the page cache in between its gain is small). What was chosen is in the argv the daemon
  records (``cvmctl vm show``, and with every benchmark run). An explicit ``cache = "none"`` or
  ``aio = "native"`` on a file system without O_DIRECT is refused before QEMU starts.
* **when it goes**: when QEMU exits (stop, kill, crash, guest power-off: a scratch disk does
  not survive a reboot), when the VM is removed (with its run directory), and when the daemon
  starts, for every VM whose QEMU no longer runs. Nothing of it is left after ``vm rm``.

The guest finds the disk by its virtio-blk serial, :data:`~host_daemon.spec.SCRATCH_SERIAL`
(``/sys/block/vdX/serial``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from cvmcore.errors import HostNotReady
from host_daemon.qemu_args import ScratchDrive
from host_daemon.spec import O_DIRECT_CACHES, Aio, Cache, ScratchDisk

log = structlog.get_logger("host_daemon.scratch")

SCRATCH_FILE: Final = "scratch.raw"
"""The scratch disk's file name in a VM's run directory."""
PROBE_BYTES: Final = 4096
"""The O_DIRECT probe's block: aligned for 512-byte and 4 KiB logical blocks alike."""
_OCTAL: Final = re.compile(r"\\([0-7]{3})")
NO_FALLOCATE_FS: Final = frozenset({"tmpfs", "ramfs"})
"""File systems where reserving space means pinning memory: the file stays sparse there."""


@dataclass(frozen=True)
class CreatedScratch:
    """What :func:`create_scratch` made: the drive for the argv and how the file was made."""

    drive: ScratchDrive
    filesystem: str  # the run directory's file system type, from /proc/self/mountinfo
    direct_io: bool  # whether O_DIRECT worked on it
    allocation: str  # "fallocate" or "sparse"
    seconds: float


def scratch_path(run_dir: Path) -> Path:
    return run_dir / SCRATCH_FILE


def resolve_io(scratch: ScratchDisk, direct_io: bool, where: str = "the run directory") -> tuple[Aio, Cache]:
    """The ``aio`` and ``cache`` modes for ``scratch`` on a file system where O_DIRECT works
    (``direct_io``) or does not. Pure. ``auto``: ``native`` + ``none`` with O_DIRECT, else
    ``threads`` + ``writeback``. Raises :class:`HostNotReady` when the spec's explicit choice
    needs O_DIRECT and the file system refuses it.
    """
    if scratch.cache == "auto":
        cache: Cache = "none" if direct_io else "writeback"
    else:
        cache = scratch.cache
        if cache in O_DIRECT_CACHES and not direct_io:
            raise HostNotReady(
                f'scratch.cache = "{cache}" opens the disk with O_DIRECT, which the file system of'
                f' {where} refuses: use cache = "auto" or "writeback"'
            )
    if scratch.aio == "auto":
        aio: Aio = "native" if cache in O_DIRECT_CACHES else "threads"
    else:
        aio = scratch.aio
        if aio == "native" and cache not in O_DIRECT_CACHES:
            raise HostNotReady(
                f'scratch.aio = "native" needs O_DIRECT, which the file system of {where} refuses:'
                ' use aio = "auto", "threads" or "io_uring"'
            )
    return aio, cache


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the file system ``path`` is on: the longest mount point that contains it
    (``/proc/self/mountinfo``, proc(5)); "unknown" if none matches."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return "unknown"
    target = os.path.realpath(path)
    best, best_type = "", "unknown"
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        mount_point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])  # "\040" is a space
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, right.split()[0]
    return best_type


def direct_io_works(path: Path) -> bool:
    """Whether ``path`` can be opened with O_DIRECT and one aligned block written and read.

    Some file systems refuse the open (EINVAL: older tmpfs, many FUSE file systems), some
    accept it and fail the first I/O; either way QEMU's ``cache=none`` would not work there.
    The block written is zeros, at offset 0 of the new, empty file.
    """
    buffer = mmap.mmap(-1, PROBE_BYTES)  # page-aligned, zero-filled
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        buffer.close()
        return False
    try:
        return os.pwritev(fd, [buffer], 0) == PROBE_BYTES and os.preadv(fd, [buffer], 0) == PROBE_BYTES
    except OSError:
        return False
    finally:
        os.close(fd)
        buffer.close()


def _fallocate(fd: int, size: int) -> int:
    """``fallocate(fd, 0, 0, size)``: 0, or the errno (Python has only posix_fallocate, whose
    glibc fallback writes every block when the file system lacks fallocate)."""
    libc = ctypes.CDLL(None, use_errno=True)
    call = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return 0 if call(fd, 0, 0, size) == 0 else ctypes.get_errno()


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def create_scratch(run_dir: Path, scratch: ScratchDisk) -> CreatedScratch:
    """Create ``<run_dir>/scratch.raw`` for ``scratch`` (see the module docstring) and decide
    its aio and cache modes. Blocking (run it in a thread). On any failure nothing is left:
    the file is removed and :class:`HostNotReady` says why (no space, a refused mode)."""
    started = time.monotonic()
    path = scratch_path(run_dir)
    size = scratch.size_mib * 2**20
    fs = filesystem_type(run_dir)
    path.unlink(missing_ok=True)  # a file an earlier boot left behind
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise HostNotReady(f"scratch: cannot create {path}: {exc.strerror}") from exc
    try:
        try:
            stats = os.fstatvfs(fd)
            free = stats.f_bavail * stats.f_frsize  # before this file takes any of it
            os.ftruncate(fd, size)
            allocation = "sparse"
            if fs not in NO_FALLOCATE_FS:
                err = _fallocate(fd, size)
                if err == 0:
                    allocation = "fallocate"
                elif err == errno.ENOSPC:
                    raise HostNotReady(
                        f"scratch: cannot reserve {_gib(size)} for the scratch disk in {run_dir}"
                        f" ({_gib(free)} free): free some space or make [scratch] size smaller"
                    )
                elif err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise OSError(err, os.strerror(err))
            if allocation == "sparse" and free < size:
                raise HostNotReady(
                    f"scratch: the {fs} file system of {run_dir} has {_gib(free)} free, less than"
                    f" the scratch disk's {_gib(size)}: free some space or make [scratch] size smaller"
                )
        finally:
            os.close(fd)
        direct = direct_io_works(path)
        aio, cache = resolve_io(scratch, direct, where=f"{run_dir} ({fs})")
    except HostNotReady:
        path.unlink(missing_ok=True)
        raise
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise HostNotReady(f"scratch: cannot make {path}: {exc.strerror or exc}") from exc
    return CreatedScratch(
        drive=ScratchDrive(path=path, aio=aio, cache=cache),
        filesystem=fs,
        direct_io=direct,
        allocation=allocation,
        seconds=time.monotonic() - started,
    )


def remove_scratch(run_dir: Path) -> bool:
    """Delete the run directory's scratch file; whether there was one."""
    path = scratch_path(run_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.error("scratch_remove_failed", path=str(path), error=exc.strerror or str(exc))
        return False
    return True


def remove_stale_scratch(vms_dir: Path, running: Iterable[str]) -> list[Path]:
    """At daemon start: delete the scratch file of every VM directory under ``vms_dir`` whose
    VM is not among ``running`` (their QEMU was adopted). Returns the files removed."""
    keep = set(running)
    removed = []
    for path in sorted(vms_dir.glob(f"*/{SCRATCH_FILE}")):
        if path.parent.name not in keep and remove_scratch(path.parent):
            removed.append(path)
    return removed
