"""Verifying a TDX quote: the chain of vouching from Intel's root down to the TD's report.

Read bottom-up, a quote makes four claims, and each is one check here:

``pck_chain``, ``root``, ``pck_ca``, ``pck``, ``validity``
    The PCK certificate chain in the quote (or given with ``--certs``) is
    PCK -> PCK Platform/Processor CA -> Intel SGX Root CA, each link an ECDSA P-256
    signature, every certificate valid at ``at``, and the root is the one pinned in this
    package (a look-alike root in the quote fails ``root``).
``qe_report_signature``
    The PCK key signed the quoting enclave's 384-byte report (r||s, big-endian).
``qe_identity``
    That enclave is Intel's TD quoting enclave: MRSIGNER is Intel's enclave signing key
    hash and ISVPRODID is 2. (Without this, any enclave on a genuine platform could get a
    PCK-signed report and vouch for a key of its choosing.) The QE's TCB level against
    Intel's QE Identity collateral is not evaluated here.
``qe_report_data``
    The QE report binds the attestation key: report_data[0:32] = SHA-256(attestation key
    || QE auth data) and report_data[32:64] is zero.
``quote_signature``
    The attestation key (x||y, P-256) signed header+body with ECDSA/SHA-256.

Then the optional :class:`TdxPolicy`: ``debug`` (TD_ATTRIBUTES.DEBUG clear), ``mr_td``
(in an allow-list) and ``report_data`` (equal to the nonce). Evaluating the platform's TCB
level against Intel's TCB Info and CRLs needs collateral from Intel PCS and is not done.

A TDREPORT alone cannot be verified off the platform (its MAC key never leaves the CPU):
:func:`verify_tdreport` checks the two hashes that bind TEE_TCB_INFO and TDINFO to the MAC'd
part and records the MAC as a failed check that says exactly that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cvmattest import certs as certmod
from cvmattest.binary import MalformedEvidence
from cvmattest.result import VerificationResult
from cvmattest.sgx_pck import read_pck_platform
from cvmattest.tdx import TdReport, TdxQuote

INTEL_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
"""MRSIGNER of Intel's quoting enclaves: SHA-256 of Intel's enclave signing key modulus."""
TD_QE_ISV_PROD_ID = 2


@dataclass(frozen=True, slots=True)
class TdxPolicy:
    """Requirements beyond authenticity: debug off, MRTD allow-list, report_data == nonce."""

    forbid_debug: bool = False
    allowed_mr_td: frozenset[bytes] | None = None
    report_data: bytes | None = None


def _ecdsa_p256_problem(
    key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes, what: str
) -> str | None:
    """Verify a raw r||s (32+32 bytes, big-endian) ECDSA-SHA256 signature."""
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return f"ECDSA P-256 signature over {what} does not verify"
    return None


def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey | None:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        return None


def _fmspc_note(pck: x509.Certificate) -> str:
    try:
        return f" (FMSPC {read_pck_platform(pck).fmspc.hex()})"
    except MalformedEvidence:
        return ""


def _chain_problem(chain: Sequence[x509.Certificate]) -> str | None:
    if len(chain) != 3:
        return f"expected 3 certificates (PCK, CA, root), found {len(chain)}"
    names = [certmod.common_name(c) for c in chain]
    if not names[0].startswith("Intel SGX PCK Certificate"):
        return f"the first certificate is {names[0]!r}, not an Intel SGX PCK Certificate"
    return None


def verify_tdx_quote(
    quote: TdxQuote,
    *,
    at: datetime,
    pck_chain: Sequence[x509.Certificate] | None = None,
    policy: TdxPolicy | None = None,
) -> VerificationResult:
    """Run every check on ``quote``; see the module docstring. ``pck_chain`` overrides the embedded one."""
    result = VerificationResult(tee="tdx", evidence_type=f"tdx-quote-v{quote.version}", at=at)
    if pck_chain is not None:
        chain, problem = list(pck_chain), None
    else:
        try:
            chain, problem = certmod.load_certificates(quote.pck_chain_pem, "PCK chain"), None
        except (certmod.CertificateError, MalformedEvidence) as exc:
            chain, problem = [], f"the quote's PCK chain does not parse: {exc}"
    problem = problem or _chain_problem(chain)
    if not result.record("pck_chain", problem, f"{len(chain)} certificates in the quote"):
        pck_key = None
    else:
        pck, ca, root = chain
        pinned = certmod.intel_sgx_root_ca()
        root_problem = (
            None
            if certmod.same_certificate(root, pinned)
            else "the chain's root is not the pinned Intel SGX Root CA"
        )
        root_problem = root_problem or certmod.verify_x509_signature(pinned, pinned)
        result.record("root", root_problem, "pinned Intel SGX Root CA")
        result.record(
            "pck_ca",
            certmod.verify_x509_signature(ca, pinned),
            f"{certmod.common_name(ca)} signed by the root",
        )
        result.record(
            "pck",
            certmod.verify_x509_signature(pck, ca),
            f"PCK{_fmspc_note(pck)} signed by {certmod.common_name(ca)}",
        )
        problems = [p for p in (certmod.validity_problem(c, at) for c in (pinned, ca, pck)) if p]
        result.record("validity", "; ".join(problems) or None, f"3 certificates valid at {at.isoformat()}")
        key = pck.public_key()
        pck_key = key if isinstance(key, ec.EllipticCurvePublicKey) else None

    if pck_key is None:
        result.skipped("qe_report_signature", "no usable PCK key")
    else:
        result.record(
            "qe_report_signature",
            _ecdsa_p256_problem(pck_key, quote.qe_report_signature, quote.qe_report.raw, "the QE report"),
            "QE report signed by the PCK key",
        )
    qe = quote.qe_report
    identity_problem = None
    if qe.mr_signer != INTEL_QE_MRSIGNER:
        identity_problem = f"QE MRSIGNER {qe.mr_signer.hex()[:16]}... is not Intel's"
    elif qe.isv_prod_id != TD_QE_ISV_PROD_ID:
        identity_problem = f"QE ISVPRODID is {qe.isv_prod_id}, not 2 (TD quoting enclave)"
    result.record("qe_identity", identity_problem, f"Intel TD QE, ISVSVN {qe.isv_svn}")

    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    binding_problem = None
    if qe.report_data[:32] != binding:
        binding_problem = "QE report_data[0:32] is not SHA-256(attestation key || QE auth data)"
    elif qe.report_data[32:] != bytes(32):
        binding_problem = "QE report_data[32:64] is not zero"
    result.record("qe_report_data", binding_problem, "the QE report binds the attestation key")

    attestation_key = _attestation_key(quote.attestation_key)
    if attestation_key is None:
        result.failed("quote_signature", "the attestation key is not a point on P-256")
    else:
        result.record(
            "quote_signature",
            _ecdsa_p256_problem(
                attestation_key,
                quote.signature,
                quote.signed_bytes,
                f"header+body (0..{len(quote.signed_bytes):#x})",
            ),
            "header and body signed by the attestation key",
        )
    _check_policy(quote, policy, result)
    return result


def _check_policy(quote: TdxQuote, policy: TdxPolicy | None, result: VerificationResult) -> None:
    if policy is None:
        return
    body = quote.body
    if policy.forbid_debug:
        result.record(
            "debug",
            "TD_ATTRIBUTES.DEBUG is set: the host can read the TD's memory" if body.debug else None,
            "TD is not debuggable",
        )
    if policy.allowed_mr_td is not None:
        result.require_allowed("mr_td", "MRTD", body.mr_td, policy.allowed_mr_td)
    if policy.report_data is not None:
        result.require_nonce(body.report_data, policy.report_data)


def verify_tdreport(report: TdReport, *, at: datetime) -> VerificationResult:
    """Check a TDREPORT's internal hashes; its MAC can only be checked on the platform (always fails)."""
    result = VerificationResult(tee="tdx", evidence_type="tdx-tdreport", at=at)
    result.record(
        "tee_tcb_info_hash",
        None
        if hashlib.sha384(report.tee_tcb_info).digest() == report.fields["tee_tcb_info_hash"]
        else "SHA-384(TEE_TCB_INFO, bytes 256..495) is not TEE_TCB_INFO_HASH (bytes 32..80)",
        "SHA-384(TEE_TCB_INFO) matches",
    )
    result.record(
        "tee_info_hash",
        None
        if hashlib.sha384(report.td_info).digest() == report.fields["tee_info_hash"]
        else "SHA-384(TDINFO, bytes 512..1024) is not TEE_INFO_HASH (bytes 80..128)",
        "SHA-384(TDINFO) matches",
    )
    result.failed(
        "mac",
        "a TDREPORT's MAC is keyed to the CPU and cannot be checked off-platform; "
        "get a quote (configfs-tsm) and verify that instead",
    )
    return result
