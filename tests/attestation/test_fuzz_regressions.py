"""Inputs the fuzzer (benchmarks/fuzz.py) found: each must stay a documented refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmattest.certs import CertificateError, load_certificate_file

FUZZ = Path(__file__).parents[1] / "fixtures" / "attestation" / "fuzz"


@pytest.mark.parametrize("path", sorted(FUZZ.glob("certificate-*.der")), ids=lambda p: p.name)
def test_a_malformed_certificate_is_a_certificate_error_at_load(path: Path) -> None:
    with pytest.raises(CertificateError, match="not a certificate"):
        load_certificate_file(path.read_bytes(), path.name)
