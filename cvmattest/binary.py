"""Bounds-checked reading of little-endian binary structures, with errors that name the field.

Every attestation structure in this package (SNP report, TDX quote, TDREPORT, certificate
table) is a fixed C layout read at known offsets. Reading one with plain slicing or
:func:`struct.unpack_from` turns a truncated file into an ``IndexError``, a ``struct.error``
or - worse - a silently short ``bytes``. :class:`FieldReader` reads a named field at an
offset and, if the buffer ends first, raises :class:`MalformedEvidence` saying which
structure, which field, where it starts and where the input ended. Reading the 4-byte
``version`` of an SNP report from a 2-byte input gives::

    SNP report: field 'version' at offset 0x0 (4 bytes) is truncated: the input ends at 0x2

:class:`MalformedEvidence` is a :class:`cvmcore.errors.UsageError` (exit code 2): retrying
with the same bytes cannot succeed.
"""

from __future__ import annotations

from cvmcore.errors import UsageError


class MalformedEvidence(UsageError):
    """Evidence bytes that do not have the shape their format requires.

    ``structure`` names the format ("SNP report", "TDX quote v4", ...), ``field`` the field
    that could not be read, ``offset`` its absolute offset in the input.
    """

    def __init__(self, structure: str, field: str, offset: int, problem: str) -> None:
        super().__init__(f"{structure}: field '{field}' at offset {offset:#x} {problem}")
        self.structure = structure
        self.field = field
        self.offset = offset
        self.problem = problem


class FieldReader:
    """Reads named little-endian fields of ``data``; offsets are relative to ``base``.

    ``base`` is where this structure starts inside the whole input, so that a nested
    structure (the QE report inside a quote) reports offsets into the file the user has.
    """

    __slots__ = ("base", "data", "structure")

    def __init__(self, data: bytes, structure: str, base: int = 0) -> None:
        self.data = data
        self.structure = structure
        self.base = base

    def __len__(self) -> int:
        return len(self.data)

    def bytes(self, offset: int, size: int, field: str) -> bytes:
        """``size`` bytes at ``offset``; raises :class:`MalformedEvidence` if they run past the end."""
        end = offset + size
        if offset < 0 or size < 0 or end > len(self.data):
            raise MalformedEvidence(
                self.structure,
                field,
                self.base + offset,
                f"({size} bytes) is truncated: the input ends at {self.base + len(self.data):#x}",
            )
        return bytes(self.data[offset:end])

    def uint(self, offset: int, size: int, field: str) -> int:
        """An unsigned little-endian integer of ``size`` bytes."""
        return int.from_bytes(self.bytes(offset, size, field), "little")

    def u8(self, offset: int, field: str) -> int:
        return self.uint(offset, 1, field)

    def u16(self, offset: int, field: str) -> int:
        return self.uint(offset, 2, field)

    def u32(self, offset: int, field: str) -> int:
        return self.uint(offset, 4, field)

    def u64(self, offset: int, field: str) -> int:
        return self.uint(offset, 8, field)

    def sub(self, offset: int, size: int, field: str, structure: str) -> FieldReader:
        """A reader over ``size`` bytes at ``offset``, for a nested structure."""
        return FieldReader(self.bytes(offset, size, field), structure, self.base + offset)

    def invalid(self, offset: int, field: str, problem: str) -> MalformedEvidence:
        """An error for a field that is present but holds a value the format does not allow."""
        return MalformedEvidence(self.structure, field, self.base + offset, problem)
