"""The real-hardware vectors in tests/fixtures/attestation (see PROVENANCE.md there), for the tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from cryptography import x509

from cvmattest.certs import load_certificates

VERIFIED_ON = datetime(2026, 11, 26, tzinfo=UTC)
"""When the vectors were verified (PROVENANCE.md); every certificate but the VLEK is valid then."""
VLEK_VALID_AT = datetime(2025, 6, 1, tzinfo=UTC)
"""The AWS VLEK was valid from 2024-12-10 to 2025-12-10."""


@dataclass(frozen=True)
class SnpVector:
    name: str
    report: bytes
    certificates: list[x509.Certificate]
    at: datetime
    expected: dict[str, Any]


@dataclass(frozen=True)
class TdxVector:
    name: str
    quote: bytes
    expected: dict[str, Any]


@cache
def expected_json(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "expected.json").read_text())
    return data


def read_evidence(path: Path) -> bytes:
    data = path.read_bytes()
    return bytes.fromhex(data.decode()) if path.suffix == ".hex" else data


def snp_vectors(root: Path) -> list[SnpVector]:
    vectors = []
    for name, expected in expected_json(root)["snp"].items():
        sources = expected["verifies_with"]
        certs = load_certificates((root / sources["leaf"]).read_bytes())
        certs += load_certificates((root / sources["ask_or_asvk_and_ark"]).read_bytes())
        at = VLEK_VALID_AT if expected["signing_key"] == "VLEK" else VERIFIED_ON
        vectors.append(SnpVector(name, read_evidence(root / name), certs, at, expected))
    return vectors


def tdx_quote_vectors(root: Path) -> list[TdxVector]:
    return [
        TdxVector(name, (root / name).read_bytes(), expected)
        for name, expected in expected_json(root)["tdx"].items()
        if "quote" in name
    ]


SNP_NAMES = [
    "snp/milan_v2_gosevguest_report.bin",
    "snp/milan_v2_virtee_report.hex",
    "snp/milan_v3_msft_report.bin",
    "snp/genoa_v3_msft_report.bin",
    "snp/turin_v5_msft_report.bin",
    "snp/milan_v3_vlek_aws_report.bin",
]
TDX_QUOTE_NAMES = [
    "tdx/quote_v4_spr_e4_gotdxguest.dat",
    "tdx/quote_v4_trustee.dat",
    "tdx/quote_v5_tdx15_gotdxguest.dat",
]


def snp_vector(root: Path, name: str) -> SnpVector:
    return next(v for v in snp_vectors(root) if v.name == name)


def tdx_vector(root: Path, name: str) -> TdxVector:
    return next(v for v in tdx_quote_vectors(root) if v.name == name)
