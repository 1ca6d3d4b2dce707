"""What an Intel PCK certificate says about its platform: FMSPC, PCE-ID, TCB, PPID.

The PCK leaf of a TDX quote's chain carries one private extension, ``SGX Extensions``
(OID ``1.2.840.113741.1.13.1``), defined in Intel's *SGX PCK Certificate and Certificate
Revocation List Profile Specification*. It is a SEQUENCE of (OID, value) pairs::

    .1  PPID         OCTET STRING (16)   platform provisioning id (encrypted per platform)
    .2  TCB          SEQUENCE of (OID, value): .2.1-.2.16 SGX TCB components (INTEGER),
                                            .2.17 PCESVN (INTEGER), .2.18 CPUSVN (OCTET STRING 16)
    .3  PCE-ID       OCTET STRING (2)
    .4  FMSPC        OCTET STRING (6)    family-model-stepping-platform: which TCB Info applies
    .5  SGX Type     ENUMERATED          0 standard, 1 scalable, 2 scalable with integrity

FMSPC and the TCB are what an Intel PCS TCB Info lookup needs (``/tdx/certification/v4/
tcb?fmspc=...``); :mod:`cvmattest.intel_tcb` evaluates a quote's TCB status against it.
The extension is read with the small DER walker below: ``cryptography`` exposes unknown
extensions only as raw bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from cvmattest.binary import MalformedEvidence

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_STRUCTURE = "PCK SGX extension"


def _der_elements(data: bytes, base: int = 0) -> Iterator[tuple[int, bytes, int]]:
    """(tag, content, offset) of each DER element in ``data``, in order."""
    offset = 0
    while offset < len(data):
        if offset + 2 > len(data):
            raise MalformedEvidence(_STRUCTURE, "tag/length", base + offset, "is truncated")
        tag, length = data[offset], data[offset + 1]
        header = 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4 or offset + 2 + count > len(data):
                raise MalformedEvidence(_STRUCTURE, "length", base + offset + 1, "is not a usable DER length")
            length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
            header += count
        start = offset + header
        if start + length > len(data):
            raise MalformedEvidence(
                _STRUCTURE, f"element tag {tag:#x}", base + offset, "runs past its parent"
            )
        yield tag, data[start : start + length], base + start
        offset = start + length


def _decode_oid(content: bytes) -> str:
    first, rest = divmod(content[0], 40) if content else (0, 0)
    parts = [min(first, 2), rest + 40 * max(0, first - 2)]
    value = 0
    for byte in content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


def _pairs(content: bytes, base: int) -> Iterator[tuple[str, int, bytes]]:
    """(OID, value tag, value content) of a SEQUENCE OF SEQUENCE { OID, value }."""
    for tag, pair, offset in _der_elements(content, base):
        if tag != 0x30:
            raise MalformedEvidence(_STRUCTURE, "entry", offset, f"has tag {tag:#x}, not SEQUENCE")
        elements = list(_der_elements(pair, offset))
        if len(elements) != 2 or elements[0][0] != 0x06:
            raise MalformedEvidence(_STRUCTURE, "entry", offset, "is not an (OID, value) pair")
        yield _decode_oid(elements[0][1]), elements[1][0], elements[1][1]


@dataclass(frozen=True, slots=True)
class PckPlatform:
    """The platform facts of a PCK certificate."""

    fmspc: bytes
    pce_id: bytes
    ppid: bytes
    sgx_type: int | None
    pcesvn: int
    cpusvn: bytes
    sgx_tcb_components: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "fmspc": self.fmspc.hex(),
            "pce_id": self.pce_id.hex(),
            "ppid": self.ppid.hex(),
            "sgx_type": self.sgx_type,
            "pcesvn": self.pcesvn,
            "cpusvn": self.cpusvn.hex(),
            "sgx_tcb_components": list(self.sgx_tcb_components),
        }


def read_pck_platform(cert: x509.Certificate) -> PckPlatform:
    """Decode the SGX Extensions of a PCK certificate; :class:`MalformedEvidence` if absent or bad."""
    try:
        extension = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSIONS_OID)).value
    except x509.ExtensionNotFound:
        raise MalformedEvidence(
            _STRUCTURE, SGX_EXTENSIONS_OID, 0, "is missing: not a PCK certificate"
        ) from None
    raw = extension.value if isinstance(extension, x509.UnrecognizedExtension) else b""
    outer = list(_der_elements(raw))
    if len(outer) != 1 or outer[0][0] != 0x30:
        raise MalformedEvidence(_STRUCTURE, "SGX Extensions", 0, "is not a SEQUENCE")
    values: dict[str, bytes] = {}
    components = [0] * 16
    pcesvn = 0
    cpusvn = b""
    for oid, tag, content in _pairs(outer[0][1], outer[0][2]):
        suffix = oid.removeprefix(SGX_EXTENSIONS_OID + ".")
        if suffix == "2" and tag == 0x30:
            for tcb_oid, _, tcb_value in _pairs(content, 0):
                index = int(tcb_oid.rsplit(".", 1)[1])
                if 1 <= index <= 16:
                    components[index - 1] = int.from_bytes(tcb_value, "big")
                elif index == 17:
                    pcesvn = int.from_bytes(tcb_value, "big")
                elif index == 18:
                    cpusvn = tcb_value
        else:
            values[suffix] = content
    if "4" not in values:
        raise MalformedEvidence(_STRUCTURE, "FMSPC", 0, "is missing")
    return PckPlatform(
        fmspc=values["4"],
        pce_id=values.get("3", b""),
        ppid=values.get("1", b""),
        sgx_type=int.from_bytes(values["5"], "big") if "5" in values else None,
        pcesvn=pcesvn,
        cpusvn=cpusvn,
        sgx_tcb_components=tuple(components),
    )
