"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

# First, before any test module imports grpc: cvmcore sets grpcio's fork-support switch,
# which grpc reads once, at import (the programs import cvmcore first for the same reason).
import cvmcore  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
ATTESTATION_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "attestation"
"""Real SNP reports and TDX quotes, with their origins in PROVENANCE.md there."""


@pytest.fixture(scope="session")
def attestation_testdata() -> Path:
    """The real-hardware attestation vectors checked in under tests/fixtures/attestation."""
    if not (ATTESTATION_FIXTURES / "expected.json").is_file():
        pytest.fail(f"attestation test data missing from the checkout: {ATTESTATION_FIXTURES}")
    return ATTESTATION_FIXTURES
