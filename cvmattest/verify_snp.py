"""Verifying an SEV-SNP report: who signed it, is that key AMD's, and does it say what we need.

The checks, in the order they run (names as they appear in the result):

``signature_algo``
    The report says it is signed with ECDSA P-384/SHA-384 (the only algorithm, code 1).
``signing_key``
    KEY_INFO names a VCEK or VLEK; "none" (7) means the report is unsigned.
``leaf``
    A certificate for that key type was given (by ``--certs``, the extended report's
    certificate table, or the KDS).
``product``
    The report's CPUID (v3+) and the certificate's productName agree on the generation.
    For a v2 report, which does not say, the certificate decides.
``ark``
    The root is AMD's ARK for that product, as pinned in this package. A supplied ARK that
    differs from the pinned one fails here: trust comes from the package, never the input.
``ark_self_signed``, ``ask`` / ``asvk``, ``vcek`` / ``vlek``
    Each link of ARK -> ASK/ASVK -> VCEK/VLEK is an RSASSA-PSS (SHA-384, salt 48) signature.
``validity``
    Every certificate in the chain is valid at the verification time ``at``. The time is an
    argument, never the clock read inside: evidence is often checked long after it was made
    (the shared test VLEK expired on 2025-12-10).
``crl``, ``revocation``
    AMD's CRL for the product (given, or fetched with ``--kds``) is signed by the ARK
    (RSASSA-PSS SHA-384) and current, and does not list the ASK/ASVK. Without a CRL, ``crl``
    is recorded as skipped with the reason.
``report_signature``
    ECDSA P-384 over bytes 0x000-0x29F with the leaf key; r and s are stored as 72-byte
    little-endian integers, which we re-encode as the DER signature ``cryptography`` takes.
``hwid``
    A VCEK is issued for one chip: its hwID extension must equal chip_id (the first 8 bytes
    on Turin). A VLEK is issued for a cloud provider and has no hwID: skipped.
``tcb``
    The certificate's SPL extensions must equal the report's ``reported_tcb``: a VCEK is
    derived per TCB, so a mismatch means the wrong certificate (or a rolled-back TCB).

Then the optional :class:`SnpPolicy`: ``debug`` (policy bit 19 clear), ``minimum_tcb``
(each named component of ``reported_tcb`` at least the minimum), ``measurement`` (in an
allow-list) and ``report_data`` (equal to the verifier's nonce).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cvmattest import certs as certmod
from cvmattest.result import VerificationResult
from cvmattest.snp import (
    SIGNATURE_ALGO_ECDSA_P384_SHA384,
    Product,
    SigningKey,
    SnpReport,
    parse_snp_report,
)


@dataclass(frozen=True, slots=True)
class SnpPolicy:
    """What a relying party requires of a genuine report, beyond its being genuine.

    ``minimum_tcb`` maps component names (``bootloader``, ``tee``, ``snp``, ``microcode``,
    ``fmc``) to the lowest acceptable SPL in ``reported_tcb``. ``allowed_measurements`` is an
    allow-list of 48-byte launch digests (``None``: any). ``report_data``, when set, must
    equal the report's 64 bytes exactly.
    """

    minimum_tcb: Mapping[str, int] = field(default_factory=dict)
    allowed_measurements: frozenset[bytes] | None = None
    forbid_debug: bool = False
    report_data: bytes | None = None


def _pick_leaf(
    report: SnpReport, leaves: Sequence[certmod.AmdKeyCertificate], want_vlek: bool
) -> certmod.AmdKeyCertificate | None:
    """The certificate of the right kind, preferring one issued for this chip and TCB."""
    candidates = [leaf for leaf in leaves if leaf.is_vlek == want_vlek]
    for leaf in candidates:
        product = leaf.product
        if (
            leaf.hwid is not None
            and product is not None
            and leaf.hwid == report.chip_id_for(product)
            and all(leaf.tcb.get(k) == v for k, v in report.reported_tcb.components.items())
        ):
            return leaf
    return candidates[0] if candidates else None


def _pick_intermediate(
    supplied: Sequence[x509.Certificate], leaf: x509.Certificate, product: Product, vlek: bool, pinned: bool
) -> x509.Certificate | None:
    """The supplied ASK/ASVK that issued ``leaf``, else (``pinned``) the pinned one for the product."""
    for cert in supplied:
        if cert.subject == leaf.issuer:
            return cert
    return certmod.amd_intermediate(product, vlek) if pinned else None


def verify_snp_report(
    report: SnpReport,
    certificates: Sequence[x509.Certificate] = (),
    *,
    at: datetime,
    policy: SnpPolicy | None = None,
    crl: x509.CertificateRevocationList | None = None,
    crl_unavailable: str | None = None,
    arks: Mapping[Product, x509.Certificate] | None = None,
) -> VerificationResult:
    """Run every check on ``report`` with the given certificates; see the module docstring.

    ``certificates`` may hold the VCEK or VLEK and, optionally, the ASK/ASVK and ARK in any
    order (extra certificates are ignored). The ARK is AMD's pinned one unless the caller
    passes its own ``arks`` (product -> root; a test chain): the trust anchor is always the
    verifier's choice, never the input's. With ``arks``, no pinned intermediate is used.
    """
    result = VerificationResult(tee="sev-snp", evidence_type="sev-snp-report", at=at)
    result.record(
        "signature_algo",
        None
        if report.signature_algo == SIGNATURE_ALGO_ECDSA_P384_SHA384
        else f"is {report.signature_algo}; only 1 (ECDSA P-384 with SHA-384) is defined",
        "ECDSA P-384 with SHA-384",
    )
    signing_key = report.key_info.signing_key
    if signing_key not in (SigningKey.VCEK, SigningKey.VLEK):
        result.failed(
            "signing_key", f"KEY_INFO signing key is {report.key_info.signing_key_code}: not VCEK or VLEK"
        )
        _check_policy(report, policy, result)
        return result
    want_vlek = signing_key is SigningKey.VLEK
    kind = "VLEK" if want_vlek else "VCEK"
    result.passed("signing_key", kind)

    leaves, intermediates, roots = certmod.classify_amd_certificates(certificates)
    leaf = _pick_leaf(report, [certmod.read_amd_key_certificate(c) for c in leaves], want_vlek)
    if leaf is None:
        others = ", ".join(certmod.common_name(c) for c in leaves) or "none"
        result.failed(
            "leaf", f"the report is signed by a {kind} but no {kind} certificate was given ({others})"
        )
        _check_policy(report, policy, result)
        return result
    result.passed("leaf", f"{kind} certificate {certmod.common_name(leaf.certificate)}")

    product = _check_product(report, leaf, result)
    if product is None:
        _check_policy(report, policy, result)
        return result
    if report.product is None and product.uses_turin_tcb_layout:
        # A v3+ report from a CPU model this code does not know, certified as Turin: read its
        # TCB fields with the Turin layout the certificate implies.
        report = parse_snp_report(report.raw, product=product)

    if arks is not None and product not in arks:
        result.failed("ark", f"no root for {product.value} among the given ARKs")
        _check_policy(report, policy, result)
        return result
    ark = certmod.amd_ark(product) if arks is None else arks[product]
    pinned, anchor = ("AMD's pinned", "pinned") if arks is None else ("the given", "given")
    foreign_roots = [r for r in roots if not certmod.same_certificate(r, ark)]
    result.record(
        "ark",
        f"the supplied {certmod.common_name(foreign_roots[0])} is not {pinned} ARK-{product.value}"
        if foreign_roots
        else None,
        f"{anchor} ARK-{product.value}",
    )
    result.record("ark_self_signed", certmod.verify_amd_signature(ark, ark), "RSASSA-PSS SHA-384")
    intermediate = _pick_intermediate(intermediates, leaf.certificate, product, want_vlek, arks is None)
    link = "asvk" if want_vlek else "ask"
    if intermediate is None:
        result.failed(link, f"no {link.upper()} for {product.value} was given and none is pinned")
        chain = [ark, leaf.certificate]
    else:
        result.record(
            link,
            certmod.verify_amd_signature(intermediate, ark),
            f"{certmod.common_name(intermediate)} signed by ARK-{product.value}",
        )
        result.record(
            kind.lower(),
            certmod.verify_amd_signature(leaf.certificate, intermediate),
            f"{kind} signed by {certmod.common_name(intermediate)}",
        )
        chain = [ark, intermediate, leaf.certificate]
    problems = [p for p in (certmod.validity_problem(c, at) for c in chain) if p]
    result.record(
        "validity", "; ".join(problems) or None, f"{len(chain)} certificates valid at {at.isoformat()}"
    )
    check_crl(crl, crl_unavailable, ark, chain, at, result)

    result.record("report_signature", _report_signature_problem(report, leaf.certificate), f"by the {kind}")
    _check_hwid(report, leaf, product, result)
    _check_tcb(report, leaf, result)
    _check_policy(report, policy, result)
    return result


def check_crl(
    crl: x509.CertificateRevocationList | None,
    unavailable: str | None,
    ark: x509.Certificate,
    chain: Sequence[x509.Certificate],
    at: datetime,
    result: VerificationResult,
) -> None:
    """``crl``: the ARK signed the CRL and it is current; ``revocation``: no chain link is on it.

    AMD's CRL is the ARK's, so it can list what the ARK signed: the ASK or ASVK. A VCEK or
    VLEK is signed by the ASK/ASVK, whose CRL AMD does not publish (go-sev-guest checks the
    ASK the same way; AMD supersedes VCEKs by TCB version rather than revoking them).
    """
    if crl is None:
        result.skipped(
            "crl", unavailable or "no CRL given (--crl FILE, or --kds to fetch AMD's): not checked"
        )
        return
    if not result.record(
        "crl",
        certmod.amd_crl_problem(crl, ark, at),
        f"{certmod.common_name(ark)}'s CRL of {crl.last_update_utc.date()}, {len(list(crl))} revoked",
    ):
        return
    revoked = certmod.revoked_by(crl, chain)
    result.record(
        "revocation",
        "; ".join(revoked) or None,
        "not on the CRL: " + ", ".join(certmod.common_name(c) for c in chain if c.issuer == crl.issuer),
    )


def _check_product(
    report: SnpReport, leaf: certmod.AmdKeyCertificate, result: VerificationResult
) -> Product | None:
    from_report = report.product
    from_cert = leaf.product
    if from_report is None and from_cert is None:
        result.failed("product", "neither the report (v2 has no CPUID) nor the certificate names the product")
        return None
    if from_report is not None and from_cert is not None and from_report is not from_cert:
        result.failed(
            "product",
            f"the report comes from {from_report.value} (CPUID) but the certificate is for {from_cert.value}",
        )
        return None
    product = from_report or from_cert
    assert product is not None
    source = "report CPUID" if from_report else "certificate"
    if report.version == 2 and product.uses_turin_tcb_layout:
        result.failed(
            "product", "a version-2 report cannot come from Turin, yet the certificate is for Turin"
        )
        return None
    result.passed("product", f"{product.value} (from the {source})")
    return product


def _report_signature_problem(report: SnpReport, leaf: x509.Certificate) -> str | None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        return "the certificate does not hold an ECDSA P-384 key"
    try:
        key.verify(
            encode_dss_signature(report.signature_r, report.signature_s),
            report.signed_bytes,
            ec.ECDSA(hashes.SHA384()),
        )
    except InvalidSignature:
        return "ECDSA P-384 signature over bytes 0x000-0x29F does not verify with the certificate's key"
    return None


def _check_hwid(
    report: SnpReport, leaf: certmod.AmdKeyCertificate, product: Product, result: VerificationResult
) -> None:
    if leaf.is_vlek:
        result.skipped("hwid", "a VLEK is issued per cloud provider, not per chip")
        return
    expected = report.chip_id_for(product)
    if leaf.hwid is None:
        result.failed("hwid", "the VCEK has no hwID extension (1.3.6.1.4.1.3704.1.4)")
    elif leaf.hwid != expected:
        result.failed(
            "hwid",
            f"VCEK hwID {leaf.hwid.hex()[:16]}... is not the report's chip_id {expected.hex()[:16]}...",
        )
    else:
        result.passed("hwid", f"chip_id matches ({len(expected)} bytes)")


def _check_tcb(report: SnpReport, leaf: certmod.AmdKeyCertificate, result: VerificationResult) -> None:
    mismatches = []
    for name, value in report.reported_tcb.components.items():
        certified = leaf.tcb.get(name)
        if certified != value:
            mismatches.append(f"{name}: certificate {certified}, report {value}")
    result.record(
        "tcb",
        "reported_tcb differs from the certificate: " + "; ".join(mismatches) if mismatches else None,
        f"reported_tcb {report.reported_tcb} is what the certificate certifies",
    )


def _check_policy(report: SnpReport, policy: SnpPolicy | None, result: VerificationResult) -> None:
    if policy is None:
        return
    if policy.forbid_debug:
        result.record(
            "debug",
            "the guest policy allows debugging (bit 19): the host can read its memory"
            if report.policy.debug_allowed
            else None,
            "debugging not allowed by the guest policy",
        )
    if policy.minimum_tcb:
        components = report.reported_tcb.components
        low = []
        for name, minimum in policy.minimum_tcb.items():
            if name not in components:
                low.append(f"{name}: not part of the {report.reported_tcb.layout.value} TCB layout")
            elif components[name] < minimum:
                low.append(f"{name} {components[name]} < {minimum}")
        result.record(
            "minimum_tcb",
            "reported_tcb below the minimum: " + "; ".join(low) if low else None,
            "reported_tcb meets " + ", ".join(f"{k}>={v}" for k, v in policy.minimum_tcb.items()),
        )
    if policy.allowed_measurements is not None:
        result.require_allowed("measurement", "measurement", report.measurement, policy.allowed_measurements)
    if policy.report_data is not None:
        result.require_nonce(report.report_data, policy.report_data)
