"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# First, before any test module imports grpc: cvmcore sets grpcio's fork-support switch,
# which grpc reads once, at import (the programs import cvmcore first for the same reason).
import cvmcore  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The project's ``shared/`` folder: beside the checkout, or where CVM_SHARED_DIR says."""
    override = os.environ.get("CVM_SHARED_DIR")
    return Path(override) if override else REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def attestation_testdata() -> Path:
    """Real SNP reports and TDX quotes (../shared/testdata/attestation).

    Missing data fails the run in CI (CI=true) and skips elsewhere, so that a clone without
    the shared folder still runs every other test.
    """
    path = shared_dir() / "testdata" / "attestation"
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"attestation test data not found at {path}")
        pytest.skip(f"attestation test data not found at {path} (set CVM_SHARED_DIR)")
    return path
