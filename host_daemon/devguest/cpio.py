"""The newc cpio format, written and read (pure): the initramfs's container."""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Iterable


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
