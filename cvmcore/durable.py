"""Writing a file so that a crash leaves the old content or the new, never a mixture.

Every program here that replaces a file it will read again (the agent's idle-polling
originals, the KDS certificate cache, the dev guest's manifest, evidence the CLI saves)
does it the same way:

1. write a temporary file beside the target, with a name no other writer uses (the pid
   and a random suffix, created with ``O_EXCL``);
2. ``fsync`` it, so its bytes are on disk before its name is;
3. ``rename`` it over the target (atomic within one file system: a reader sees the old
   file or the whole new one);
4. ``fsync`` the directory, so the rename itself survives a power cut.

A failure at any step removes the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename, an unlink) survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, *, mode: int = 0o600, make_parents: bool = True) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) as the module docstring describes.

    Raises :class:`OSError` as the file system does; ``path`` is then unchanged.
    """
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not narrow or widen what the caller asked for
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_directory(path.parent)


def remove_durably(path: Path) -> None:
    """Remove ``path`` (if present) and make the removal survive a crash."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_directory(path.parent)
