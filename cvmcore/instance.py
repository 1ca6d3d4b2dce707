"""One process per state directory, and private directories that a killed process cannot leak.

Both rest on the same kernel fact: an ``flock(2)`` lock belongs to the open file description,
so the kernel drops it when the last descriptor closes, which includes the process dying by
SIGKILL or a crash. A held lock therefore means "a live process owns this", with no pid
file to go stale and no pid that a later process may reuse.

**Single instance.** :func:`lock_state_dir` takes an exclusive lock on ``<dir>/<name>.lock``
and keeps its descriptor for the life of the process. A second daemon on the same directory
(which would manage the same QEMU processes, or restore the same idle-polling originals)
fails at once with :class:`AlreadyRunning`, naming the pid written into the lock file. The
descriptor is close-on-exec: a QEMU or a benchmark server the daemon starts must not inherit
the lock, or a restarted daemon would be locked out by its own VMs.

**Private directories.** :func:`private_directory` makes a directory under the system's
temporary directory (``cvm-grpc-``, ``cvmctl-server-``, ``cvmctl-relay-``...) holding a locked
file ``.owner``. Every call first sweeps the directories of its prefix whose lock nobody holds
any more: the leftovers of a process that was killed before it could remove its own. A
directory whose owner is alive is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import structlog

from cvmcore.errors import AlreadyRunning, UsageError

log = structlog.get_logger("cvmcore.instance")

OWNER_FILE: Final = ".owner"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_state_dir(directory: Path, prog: str) -> int:
    """Lock ``directory`` for this process; the descriptor to keep open (closing it unlocks).

    Raises :class:`AlreadyRunning` when a live process holds it, naming that process.
    """
    path = directory / f"{prog}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    if not _try_lock(fd):
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        finally:
            os.close(fd)
        raise AlreadyRunning(
            f"another {prog} (pid {holder}) is using the state directory {directory}: "
            "stop it first, or give this one its own --state-dir"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def sweep_private_directories(prefix: str, parent: Path | None = None) -> list[Path]:
    """Remove the directories ``<parent>/<prefix>*`` whose owner is gone; the ones removed.

    Only directories of this user that hold an unlocked ``.owner`` are removed: anything
    else with the prefix (another user's, or one made by other software) is left alone.
    """
    base = Path(parent or tempfile.gettempdir())
    removed: list[Path] = []
    uid = os.getuid()
    try:
        entries = [entry for entry in os.scandir(base) if entry.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            fd = os.open(Path(entry.path) / OWNER_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if _try_lock(fd):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
        finally:
            os.close(fd)
    if removed:
        log.info("stale_directories_removed", prefix=prefix, count=len(removed))
    return removed


class PrivateDirectory:
    """A new private (0700) directory under ``parent`` (the temporary directory), owned by
    this process until :meth:`cleanup` removes it; a killed owner's directory is removed by
    the next process that makes one with the same prefix."""

    def __init__(self, prefix: str, parent: Path | None = None) -> None:
        sweep_private_directories(prefix, parent)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._fd = -1
        try:
            # Locked before it gets the name a sweep looks for, so no sweep can see it unlocked.
            pending = self.path / f"{OWNER_FILE}.new"
            self._fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.rename(pending, self.path / OWNER_FILE)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            if self._fd >= 0:
                os.close(self._fd)
            raise

    def cleanup(self) -> None:
        """Remove the directory (idempotent)."""
        if self._fd >= 0:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._fd)
            self._fd = -1


@contextlib.contextmanager
def private_directory(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A :class:`PrivateDirectory` for the extent of the context."""
    directory = PrivateDirectory(prefix, parent)
    try:
        yield directory.path
    finally:
        directory.cleanup()
