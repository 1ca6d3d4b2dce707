"""One entry point that verifies any supported evidence with one set of options.

:func:`verify_evidence` dispatches on the parsed evidence type to
:func:`~cvmattest.verify_snp.verify_snp_report`,
:func:`~cvmattest.verify_tdx.verify_tdx_quote` or
:func:`~cvmattest.verify_tdx.verify_tdreport`, translating the common options
(nonce, allowed measurements, debug) into each TEE's policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from cryptography import x509

from cvmattest.detect import ParsedEvidence
from cvmattest.intel_tcb import Collateral
from cvmattest.result import VerificationResult
from cvmattest.snp import Product, SnpReport
from cvmattest.tdx import TdxQuote
from cvmattest.verify_snp import SnpPolicy, verify_snp_report
from cvmattest.verify_tdx import DEFAULT_ACCEPTED_TCB, TdxPolicy, verify_tdreport, verify_tdx_quote
from cvmcore.errors import UsageError

REPORT_DATA_SIZE = 64


def expected_report_data(nonce: bytes) -> bytes:
    """The 64 report-data bytes a nonce of up to 64 bytes yields (zero-padded, as the kernel does)."""
    if len(nonce) > REPORT_DATA_SIZE:
        raise UsageError(f"a nonce is at most {REPORT_DATA_SIZE} bytes, got {len(nonce)}; hash it first")
    return nonce + bytes(REPORT_DATA_SIZE - len(nonce))


def verify_evidence(
    evidence: ParsedEvidence,
    certificates: Sequence[x509.Certificate] = (),
    *,
    at: datetime,
    nonce: bytes | None = None,
    allowed_measurements: frozenset[bytes] | None = None,
    forbid_debug: bool = False,
    minimum_tcb: Mapping[str, int] | None = None,
    collateral: Collateral | None = None,
    accepted_tcb: frozenset[str] = DEFAULT_ACCEPTED_TCB,
    crl: x509.CertificateRevocationList | None = None,
    crl_unavailable: str | None = None,
    arks: Mapping[Product, x509.Certificate] | None = None,
) -> VerificationResult:
    """Verify any evidence. For TDX, ``certificates`` (if given) replace the quote's PCK chain.

    ``allowed_measurements`` is the SNP launch measurement or the TDX MRTD allow-list;
    ``minimum_tcb`` applies to SNP only; ``collateral`` and ``accepted_tcb`` to TDX quotes.
    ``arks`` (SNP only) are the relying party's own roots in place of AMD's pinned ARKs: a
    test chain, never something the evidence brings.
    """
    if collateral is not None and not isinstance(evidence, TdxQuote):
        raise UsageError("Intel collateral applies to TDX quotes only")
    report_data = None if nonce is None else expected_report_data(nonce)
    if isinstance(evidence, SnpReport):
        policy = SnpPolicy(
            minimum_tcb=dict(minimum_tcb or {}),
            allowed_measurements=allowed_measurements,
            forbid_debug=forbid_debug,
            report_data=report_data,
        )
        return verify_snp_report(
            evidence, certificates, at=at, policy=policy, crl=crl, crl_unavailable=crl_unavailable, arks=arks
        )
    if crl is not None:
        raise UsageError("an AMD CRL applies to SEV-SNP reports only")
    if minimum_tcb:
        raise UsageError("a minimum TCB applies to SEV-SNP reports only")
    if arks is not None:
        raise UsageError("replacement ARKs apply to SEV-SNP reports only")
    if isinstance(evidence, TdxQuote):
        tdx_policy = TdxPolicy(
            forbid_debug=forbid_debug, allowed_mr_td=allowed_measurements, report_data=report_data
        )
        return verify_tdx_quote(
            evidence,
            at=at,
            pck_chain=list(certificates) or None,
            policy=tdx_policy,
            collateral=collateral,
            accepted_tcb=accepted_tcb,
        )
    result = verify_tdreport(evidence, at=at)
    if report_data is not None:
        result.require_nonce(evidence.report_data, report_data)
    return result
