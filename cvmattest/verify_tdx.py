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
    Intel's QE Identity collateral is ``qe_tcb`` / ``tcb_status``, when collateral is given.
``qe_report_data``
    The QE report binds the attestation key: report_data[0:32] = SHA-256(attestation key
    || QE auth data) and report_data[32:64] is zero.
``quote_signature``
    The attestation key (x||y, P-256) signed header+body with ECDSA/SHA-256.

With Intel's collateral (:mod:`cvmattest.intel_tcb`), :func:`check_collateral` adds the
collateral's signatures and dates, both CRLs, revocation, FMSPC, the QE and TDX module
identities and ``tcb_status`` (UpToDate, OutOfDate, ... with advisory IDs); without it
``tcb_status`` is recorded as skipped.

Then the optional :class:`TdxPolicy`: ``debug`` (TD_ATTRIBUTES.DEBUG clear), ``mr_td``
(in an allow-list) and ``report_data`` (equal to the nonce).

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
from cvmattest import intel_tcb
from cvmattest.binary import MalformedEvidence
from cvmattest.intel_tcb import Collateral
from cvmattest.result import VerificationResult
from cvmattest.sgx_pck import read_pck_platform
from cvmattest.tdx import TdReport, TdxQuote

INTEL_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
"""MRSIGNER of Intel's quoting enclaves: SHA-256 of Intel's enclave signing key modulus."""
TD_QE_ISV_PROD_ID = 2
DEFAULT_ACCEPTED_TCB = frozenset({"UpToDate"})
"""TCB statuses that pass ``tcb_status`` unless the caller accepts more (never Revoked)."""


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
    collateral: Collateral | None = None,
    accepted_tcb: frozenset[str] = DEFAULT_ACCEPTED_TCB,
) -> VerificationResult:
    """Run every check on ``quote``; see the module docstring. ``pck_chain`` overrides the embedded one.

    With ``collateral`` the platform's TCB is evaluated too (:func:`check_collateral`); the
    ``tcb_status`` check passes when the status is in ``accepted_tcb``.
    """
    result = VerificationResult(tee="tdx", evidence_type=f"tdx-quote-v{quote.version}", at=at)
    verified_chain: tuple[x509.Certificate, x509.Certificate] | None = None
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
        verified_chain = (pck, ca)

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
    if collateral is None:
        result.skipped(
            "tcb_status",
            "no collateral given (--collateral FILE, or --pcs to fetch it from Intel PCS): "
            "the platform's TCB level and revocation were not evaluated",
        )
    else:
        check_collateral(quote, verified_chain, collateral, at, result, accepted_tcb)
    _check_policy(quote, policy, result)
    return result


def _issuer_chain_problem(chain: Sequence[x509.Certificate], what: str, at: datetime) -> str | None:
    """``None`` if ``chain`` is [signer, Intel SGX Root CA], the root pinned and all valid at ``at``."""
    pinned = certmod.intel_sgx_root_ca()
    if len(chain) != 2 or not certmod.same_certificate(chain[1], pinned):
        return f"{what} is not [signing certificate, the pinned Intel SGX Root CA]"
    return certmod.verify_x509_signature(chain[0], pinned) or certmod.validity_problem(chain[0], at)


def _signed_document_problem(
    what: str,
    chain: Sequence[x509.Certificate],
    signature: bytes,
    signed: bytes,
    issued: datetime,
    next_update: datetime,
    at: datetime,
) -> str | None:
    return (
        _issuer_chain_problem(chain, f"the {what} issuer chain", at)
        or intel_tcb.signature_problem(chain[0], signature, signed)
        or intel_tcb.dates_problem(f"the {what}", issued, next_update, at)
    )


def check_collateral(
    quote: TdxQuote,
    chain: tuple[x509.Certificate, x509.Certificate] | None,
    collateral: Collateral,
    at: datetime,
    result: VerificationResult,
    accepted_tcb: frozenset[str] = DEFAULT_ACCEPTED_TCB,
) -> None:
    """Intel's collateral checks, each one named; ``chain`` is the verified (PCK, PCK CA) or ``None``.

    ``tcb_info`` and ``qe_identity_collateral``: signed by the TCB Signing certificate that
    the pinned root issued, current at ``at``. ``root_ca_crl``/``pck_crl``: signed by the
    root / the PCK's CA and current. ``revocation``: neither the PCK, its CA nor the TCB
    Signing certificate is on them. ``fmspc``: the TCB Info is the PCK's platform type's.
    ``qe_tcb``: the QE is the one the QE identity describes. ``tdx_module``: the SEAM signer
    and attributes are the module identity's. ``tcb_status``: the evaluation, with the
    advisory IDs.
    """
    tcb_info, qe_identity = collateral.tcb_info, collateral.qe_identity
    tcb_problem = _signed_document_problem(
        "TCB Info",
        collateral.tcb_info_chain,
        collateral.tcb_info_signature,
        tcb_info.signed,
        tcb_info.issue_date,
        tcb_info.next_update,
        at,
    )
    if tcb_problem is None and (tcb_info.id != "TDX" or tcb_info.version < 3):
        tcb_problem = (
            f"the TCB Info is {tcb_info.id!r} version {tcb_info.version}; a TDX quote needs TDX version 3"
        )
    result.record(
        "tcb_info",
        tcb_problem,
        f"TCB Info v{tcb_info.version} (evaluation data {tcb_info.evaluation_data_number}) signed by "
        f"Intel, current until {tcb_info.next_update.isoformat()}",
    )
    qe_problem = _signed_document_problem(
        "QE identity",
        collateral.qe_identity_chain,
        collateral.qe_identity_signature,
        qe_identity.signed,
        qe_identity.issue_date,
        qe_identity.next_update,
        at,
    )
    if qe_problem is None and qe_identity.id != "TD_QE":
        qe_problem = f"the QE identity is {qe_identity.id!r}, not TD_QE"
    result.record(
        "qe_identity_collateral",
        qe_problem,
        f"QE identity {qe_identity.id} signed by Intel, current until {qe_identity.next_update.isoformat()}",
    )

    pinned = certmod.intel_sgx_root_ca()
    crls: list[x509.CertificateRevocationList] = []
    if collateral.root_ca_crl is None:
        result.failed("root_ca_crl", "the collateral has no Root CA CRL: revoked CAs cannot be told")
    elif result.record(
        "root_ca_crl",
        intel_tcb.crl_problem(collateral.root_ca_crl, pinned, at, "the Root CA CRL"),
        f"Root CA CRL of {collateral.root_ca_crl.last_update_utc.date()}, signed by the root",
    ):
        crls.append(collateral.root_ca_crl)
    if chain is None:
        result.skipped("pck_crl", "no verified PCK chain to check the CRL against")
    elif collateral.pck_crl is None:
        result.failed("pck_crl", "the collateral has no PCK CRL: a revoked PCK cannot be told")
    elif result.record(
        "pck_crl",
        intel_tcb.crl_problem(collateral.pck_crl, chain[1], at, "the PCK CRL"),
        f"PCK CRL of {collateral.pck_crl.last_update_utc.date()}, signed by {certmod.common_name(chain[1])}, "
        f"{len(list(collateral.pck_crl))} revoked",
    ):
        crls.append(collateral.pck_crl)
    checked = [c for c in (*(chain or ()), collateral.tcb_info_chain[0], collateral.qe_identity_chain[0])]
    revoked = [why for crl in crls for cert in checked if (why := intel_tcb.revoked_in(crl, cert))]
    if crls:
        result.record(
            "revocation",
            "; ".join(dict.fromkeys(revoked)) or None,
            f"none of {len(checked)} certificates is on the {len(crls)} CRL(s)",
        )
    else:
        result.skipped("revocation", "no CRL could be used")

    if chain is None:
        result.skipped("tcb_status", "no verified PCK certificate to read the platform's TCB from")
        return
    try:
        platform = read_pck_platform(chain[0])
    except MalformedEvidence as exc:
        result.failed("fmspc", f"the PCK's SGX extensions do not parse: {exc}")
        return
    fmspc_problem = None
    if platform.fmspc != tcb_info.fmspc:
        fmspc_problem = f"the PCK is for FMSPC {platform.fmspc.hex()}, TCB Info for {tcb_info.fmspc.hex()}"
    elif platform.pce_id != tcb_info.pce_id:
        fmspc_problem = f"the PCK's PCE-ID {platform.pce_id.hex()}, the TCB Info's {tcb_info.pce_id.hex()}"
    if not result.record("fmspc", fmspc_problem, f"TCB Info is for the PCK's FMSPC {platform.fmspc.hex()}"):
        return
    result.record(
        "qe_tcb",
        intel_tcb.qe_identity_problem(qe_identity, quote),
        f"QE matches {qe_identity.id} (MRSIGNER, ISVPRODID {qe_identity.isvprodid}, masked attributes)",
    )
    module = intel_tcb.module_identity_for(tcb_info, quote.body.fields["tee_tcb_svn"])
    if module is not None:
        result.record(
            "tdx_module",
            intel_tcb.module_problem(module, quote),
            f"TDX module signer and attributes match {module.id or 'tdxModule'}",
        )
    if tcb_problem or qe_problem:
        # A status read from a document that is not Intel's, or no longer current, says nothing.
        result.skipped(
            "tcb_status", "the TCB Info or QE identity did not verify: no status is derived from it"
        )
        return
    evaluation = intel_tcb.evaluate_tcb(tcb_info, qe_identity, platform, quote)
    result.details["tcb"] = evaluation.to_dict()
    if evaluation.status is None:
        result.failed("tcb_status", f"TCB not supported: {evaluation.problem}")
        return
    advisories = ", ".join(evaluation.advisory_ids) or "none"
    detail = f"{evaluation.status} (advisories: {advisories})"
    result.record(
        "tcb_status",
        None
        if evaluation.status in accepted_tcb and evaluation.status != "Revoked"
        else f"{detail} is not accepted (accepted: {', '.join(sorted(accepted_tcb))})",
        detail,
    )


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
