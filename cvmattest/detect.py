"""Which kind of evidence a blob is, told from its first bytes, and the one call that parses any.

The three formats start differently enough that four bytes decide (little-endian)::

    SNP report   u32 version 2..5                          02 00 00 00 / 03 00 00 00 / 05 00 00 00
    TDX quote    u16 version 4|5, u16 key type 2, u32 0x81 04 00 02 00 81 00 00 00
    TDREPORT     REPORTTYPE.TYPE 0x81, SUBTYPE 0           81 00 .. ..

A file that is ASCII hex (as virtee/snpguest writes reports, or with a ``0x`` prefix as
dcap-qvl's sample quote is) is decoded first. An SNP report may be followed by its
certificate table (the extended report's layout); anything else after it is refused.
"""

from __future__ import annotations

import enum
import string
from typing import TypeAlias

from cvmattest.binary import MalformedEvidence
from cvmattest.snp import SUPPORTED_VERSIONS, SnpReport, parse_snp_attestation
from cvmattest.tdx import TEE_TYPE_TDX, TdReport, TdxQuote, parse_tdreport, parse_tdx_quote

ParsedEvidence: TypeAlias = SnpReport | TdxQuote | TdReport


class EvidenceKind(enum.Enum):
    SNP_REPORT = "sev-snp-report"
    TDX_QUOTE = "tdx-quote"
    TDREPORT = "tdx-tdreport"

    @property
    def tee(self) -> str:
        return "sev-snp" if self is EvidenceKind.SNP_REPORT else "tdx"


TEES = ("sev-snp", "tdx")
_HEX_DIGITS = frozenset(string.hexdigits.encode())
_WHITESPACE = frozenset(string.whitespace.encode())


def unhex_if_text(data: bytes) -> bytes:
    """``data`` decoded from ASCII hex, else unchanged.

    Hex text is an even number of hex digits, optionally after ``0x`` / ``0X``, with any
    whitespace (line breaks, spaces) anywhere. No binary evidence can look like that: every
    format starts with a version byte below 0x20.
    """
    stripped = bytes(b for b in data if b not in _WHITESPACE)
    if stripped[:2] in (b"0x", b"0X"):
        stripped = stripped[2:]
    if stripped and len(stripped) % 2 == 0 and _HEX_DIGITS.issuperset(stripped):
        return bytes.fromhex(stripped.decode("ascii"))
    return data


def detect_kind(data: bytes, tee: str | None = None) -> EvidenceKind:
    """The kind of evidence ``data`` holds; ``tee`` ("sev-snp" or "tdx") narrows the choice."""
    head = data[:8]
    if len(head) < 4:
        raise MalformedEvidence("evidence", "header", 0, f"is {len(data)} bytes: too short to be evidence")
    u32 = int.from_bytes(head[:4], "little")
    if tee not in (None, *TEES):
        raise MalformedEvidence("evidence", "--tee", 0, f"{tee!r} is not one of {', '.join(TEES)}")
    if tee != "tdx" and u32 in SUPPORTED_VERSIONS:
        return EvidenceKind.SNP_REPORT
    if tee != "sev-snp":
        if head[0] in (4, 5) and head[1] == 0 and int.from_bytes(head[4:8], "little") == TEE_TYPE_TDX:
            return EvidenceKind.TDX_QUOTE
        if head[0] == TEE_TYPE_TDX and head[1] == 0:
            return EvidenceKind.TDREPORT
    if tee == "sev-snp":
        return EvidenceKind.SNP_REPORT  # let the parser say precisely what is wrong
    wanted = {"tdx": "a TDX quote or TDREPORT", None: "an SNP report, TDX quote or TDREPORT"}[tee]
    raise MalformedEvidence("evidence", "header", 0, f"starts {head.hex()}, which is not {wanted}")


def parse_evidence(data: bytes, tee: str | None = None) -> ParsedEvidence:
    """Detect and parse any supported evidence (hex text accepted)."""
    data = unhex_if_text(data)
    kind = detect_kind(data, tee)
    if kind is EvidenceKind.SNP_REPORT:
        return parse_snp_attestation(data)
    if kind is EvidenceKind.TDX_QUOTE:
        return parse_tdx_quote(data)
    return parse_tdreport(data)
