"""Verification: the real vectors verify; tampering, wrong chains and wrong times are rejected."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest

from cvmattest.binary import MalformedEvidence
from cvmattest.certs import classify_amd_certificates, load_certificates
from cvmattest.result import CheckStatus
from cvmattest.snp import SIGNED_REGION_END, parse_snp_report
from cvmattest.tdx import QE_REPORT_SIZE, parse_tdreport, parse_tdx_quote
from cvmattest.verify_snp import SnpPolicy, verify_snp_report
from cvmattest.verify_tdx import TdxPolicy, verify_tdreport, verify_tdx_quote
from tests.attestation.vectors import (
    SNP_NAMES,
    TDX_QUOTE_NAMES,
    VERIFIED_ON,
    SnpVector,
    snp_vector,
    tdx_vector,
)

SNP_CHECKS = [
    "signature_algo",
    "signing_key",
    "leaf",
    "product",
    "ark",
    "ark_self_signed",
    "ask",
    "vcek",
    "validity",
    "crl",  # skipped: no CRL given
    "report_signature",
    "hwid",
    "tcb",
]


@pytest.mark.parametrize("name", SNP_NAMES)
def test_every_snp_report_verifies(attestation_testdata: Path, name: str) -> None:
    vector = snp_vector(attestation_testdata, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # AMD's serial-0 certificates must not warn
        result = verify_snp_report(parse_snp_report(vector.report), vector.certificates, at=vector.at)
    assert result.verified, result.summary()
    names = [check.name for check in result.checks]
    if vector.expected["signing_key"] == "VLEK":
        assert names == [n.replace("ask", "asvk").replace("vcek", "vlek") for n in SNP_CHECKS]
        assert result.check("hwid").status is CheckStatus.SKIPPED
    else:
        assert names == SNP_CHECKS
        assert all(check.passed for check in result.checks if check.name != "crl")


def test_report_verifies_with_only_the_vcek_given(attestation_testdata: Path) -> None:
    """The ASK comes from the package when the user gives only the VCEK."""
    vector = snp_vector(attestation_testdata, "snp/turin_v5_msft_report.bin")
    leaves, _, _ = classify_amd_certificates(vector.certificates)
    result = verify_snp_report(parse_snp_report(vector.report), leaves, at=vector.at)
    assert result.verified, result.summary()


def test_expired_vlek_is_rejected_at_a_later_time(attestation_testdata: Path) -> None:
    vector = snp_vector(attestation_testdata, "snp/milan_v3_vlek_aws_report.bin")
    result = verify_snp_report(parse_snp_report(vector.report), vector.certificates, at=VERIFIED_ON)
    assert not result.verified
    assert [c.name for c in result.failures] == ["validity"]
    assert "SEV-VLEK expired 2025-12-10T22:14:21+00:00" in result.failures[0].detail


def test_missing_leaf_is_named(attestation_testdata: Path) -> None:
    vector = snp_vector(attestation_testdata, "snp/milan_v3_vlek_aws_report.bin")
    _, chain, _ = classify_amd_certificates(vector.certificates)
    result = verify_snp_report(parse_snp_report(vector.report), chain, at=vector.at)
    assert result.summary().startswith(
        "rejected: leaf: the report is signed by a VLEK but no VLEK certificate"
    )


OTHER_GENERATION = {
    "snp/milan_v2_gosevguest_report.bin": "snp/genoa_v3_msft_report.bin",
    "snp/milan_v2_virtee_report.hex": "snp/turin_v5_msft_report.bin",
    "snp/milan_v3_msft_report.bin": "snp/genoa_v3_msft_report.bin",
    "snp/genoa_v3_msft_report.bin": "snp/milan_v3_msft_report.bin",
    "snp/turin_v5_msft_report.bin": "snp/genoa_v3_msft_report.bin",
    "snp/milan_v3_vlek_aws_report.bin": "snp/turin_v5_msft_report.bin",
}


@pytest.mark.parametrize("name", SNP_NAMES)
def test_report_against_another_generations_chain_is_rejected(attestation_testdata: Path, name: str) -> None:
    vector = snp_vector(attestation_testdata, name)
    other = snp_vector(attestation_testdata, OTHER_GENERATION[name])
    report = parse_snp_report(vector.report)
    result = verify_snp_report(report, other.certificates, at=VERIFIED_ON)
    assert not result.verified
    failed = {check.name for check in result.failures}
    if report.version >= 3 and vector.expected["signing_key"] == "VCEK":
        assert "product" in failed  # the report's CPUID names another generation
    elif report.version == 2:
        # a v2 report takes its generation from the certificate: a Turin one is impossible for
        # v2, and for Genoa the signature must fail
        assert "product" in failed or {"report_signature", "hwid", "tcb"} <= failed
    else:
        assert "leaf" in failed  # a VLEK-signed report given a VCEK


def test_same_generation_other_chip_vcek_is_rejected(attestation_testdata: Path) -> None:
    a = snp_vector(attestation_testdata, "snp/milan_v2_gosevguest_report.bin")
    b = snp_vector(attestation_testdata, "snp/milan_v3_msft_report.bin")
    result = verify_snp_report(parse_snp_report(a.report), b.certificates, at=VERIFIED_ON)
    assert {c.name for c in result.failures} == {"report_signature", "hwid", "tcb"}


def test_supplied_foreign_ark_is_rejected(attestation_testdata: Path) -> None:
    vector = snp_vector(attestation_testdata, "snp/milan_v3_msft_report.bin")
    genoa = load_certificates((attestation_testdata / "snp/ask_ark_genoa.pem").read_bytes())
    result = verify_snp_report(
        parse_snp_report(vector.report), [vector.certificates[0], genoa[1]], at=vector.at
    )
    assert [c.name for c in result.failures] == ["ark"]
    assert "ARK-Genoa is not AMD's pinned ARK-Milan" in result.failures[0].detail


def test_snp_policy_checks(attestation_testdata: Path) -> None:
    vector = snp_vector(attestation_testdata, "snp/milan_v2_gosevguest_report.bin")
    report = parse_snp_report(vector.report)
    nonce = bytes([1, 2, 3, 4, 5]) + bytes(59)
    good = SnpPolicy(
        minimum_tcb={"bootloader": 2, "snp": 5, "microcode": 68},
        allowed_measurements=frozenset({report.measurement}),
        report_data=nonce,
    )
    assert verify_snp_report(report, vector.certificates, at=vector.at, policy=good).verified
    bad = SnpPolicy(
        minimum_tcb={"snp": 6, "fmc": 1},
        allowed_measurements=frozenset({bytes(48)}),
        forbid_debug=True,
        report_data=bytes(64),
    )
    result = verify_snp_report(report, vector.certificates, at=vector.at, policy=bad)
    assert [c.name for c in result.failures] == ["debug", "minimum_tcb", "measurement", "report_data"]
    assert result.check("minimum_tcb").detail == (
        "reported_tcb below the minimum: snp 5 < 6; fmc: not part of the pre-turin TCB layout"
    )


# -- tampering ---------------------------------------------------------------------------


def _snp_rejects(vector: SnpVector, data: bytes) -> bool:
    try:
        report = parse_snp_report(data)
    except MalformedEvidence:
        return True
    return not verify_snp_report(report, vector.certificates, at=vector.at).verified


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _sample_bits(region_end: int, seed: int, count: int, start: int = 0) -> list[int]:
    """Every byte's top bit in [start, region_end) plus ``count`` random bits (fixed seed)."""
    top_bits = [byte * 8 + 7 for byte in range(start, region_end)]
    rng = random.Random(seed)
    return top_bits + [rng.randrange(start * 8, region_end * 8) for _ in range(count)]


@pytest.mark.parametrize("name", SNP_NAMES)
def test_snp_bit_flips_in_signed_region_are_rejected(attestation_testdata: Path, name: str) -> None:
    vector = snp_vector(attestation_testdata, name)
    for bit in _sample_bits(SIGNED_REGION_END, seed=0x5EF, count=300):
        assert _snp_rejects(vector, _flip(vector.report, bit)), f"bit {bit} (byte {bit // 8:#x})"


@pytest.mark.slow
@pytest.mark.parametrize("name", SNP_NAMES)
def test_snp_every_bit_flip_in_signed_region_is_rejected(attestation_testdata: Path, name: str) -> None:
    vector = snp_vector(attestation_testdata, name)
    for bit in range(SIGNED_REGION_END * 8):
        assert _snp_rejects(vector, _flip(vector.report, bit)), f"bit {bit} (byte {bit // 8:#x})"


@pytest.mark.parametrize("name", SNP_NAMES)
def test_snp_signature_flips_are_rejected(attestation_testdata: Path, name: str) -> None:
    vector = snp_vector(attestation_testdata, name)
    for bit in _sample_bits(0x2A0 + 144, seed=7, count=100, start=0x2A0):
        assert _snp_rejects(vector, _flip(vector.report, bit)), f"bit {bit}"


def _tdx_rejects(data: bytes) -> bool:
    try:
        quote = parse_tdx_quote(data)
    except MalformedEvidence:
        return True
    return not verify_tdx_quote(quote, at=VERIFIED_ON).verified


def _tdx_signed_regions(quote_bytes: bytes) -> list[tuple[int, int]]:
    """Header+body (quote signature), signature+key, QE report (PCK signature), auth data."""
    quote = parse_tdx_quote(quote_bytes)
    signed_end = len(quote.signed_bytes)
    sig_data = signed_end + 4
    qe_report = sig_data + 128 + 6
    auth = qe_report + QE_REPORT_SIZE + 64 + 2
    return [
        (0, signed_end),
        (sig_data, sig_data + 128),
        (qe_report, qe_report + QE_REPORT_SIZE + 64),
        (auth, auth + 32),
    ]


@pytest.mark.parametrize("name", TDX_QUOTE_NAMES)
def test_every_tdx_quote_verifies(attestation_testdata: Path, name: str) -> None:
    quote = parse_tdx_quote(tdx_vector(attestation_testdata, name).quote)
    result = verify_tdx_quote(quote, at=VERIFIED_ON)
    assert result.verified, result.summary()
    assert [c.name for c in result.checks] == [
        "pck_chain",
        "root",
        "pck_ca",
        "pck",
        "validity",
        "qe_report_signature",
        "qe_identity",
        "qe_report_data",
        "quote_signature",
        "tcb_status",  # skipped: no collateral
    ]


@pytest.mark.parametrize("name", TDX_QUOTE_NAMES)
def test_tdx_bit_flips_in_signed_regions_are_rejected(attestation_testdata: Path, name: str) -> None:
    data = tdx_vector(attestation_testdata, name).quote
    for index, (start, end) in enumerate(_tdx_signed_regions(data)):
        for bit in _sample_bits(end, seed=index, count=150, start=start):
            assert _tdx_rejects(_flip(data, bit)), f"bit {bit} (byte {bit // 8:#x})"


@pytest.mark.slow
@pytest.mark.parametrize("name", TDX_QUOTE_NAMES)
def test_tdx_every_bit_flip_in_header_and_body_is_rejected(attestation_testdata: Path, name: str) -> None:
    data = tdx_vector(attestation_testdata, name).quote
    start, end = _tdx_signed_regions(data)[0]
    for bit in range(start * 8, end * 8):
        assert _tdx_rejects(_flip(data, bit)), f"bit {bit} (byte {bit // 8:#x})"


def test_tdx_quote_with_a_v4_chain_swapped_in_is_rejected(attestation_testdata: Path) -> None:
    v5 = parse_tdx_quote(tdx_vector(attestation_testdata, "tdx/quote_v5_tdx15_gotdxguest.dat").quote)
    other = load_certificates((attestation_testdata / "tdx/quote_v4_trustee.pck_chain.pem").read_bytes())
    result = verify_tdx_quote(v5, at=VERIFIED_ON, pck_chain=other)
    assert [c.name for c in result.failures] == ["qe_report_signature"]


def test_tdx_chain_ending_at_another_root_is_rejected(attestation_testdata: Path) -> None:
    quote = parse_tdx_quote(tdx_vector(attestation_testdata, "tdx/quote_v4_trustee.dat").quote)
    chain = load_certificates(quote.pck_chain_pem)
    ark = load_certificates((attestation_testdata / "snp/ask_ark_milan.pem").read_bytes())[1]
    result = verify_tdx_quote(quote, at=VERIFIED_ON, pck_chain=[chain[0], chain[1], ark])
    assert result.check("root").detail == "the chain's root is not the pinned Intel SGX Root CA"


def test_tdx_policy(attestation_testdata: Path) -> None:
    quote = parse_tdx_quote(tdx_vector(attestation_testdata, "tdx/quote_v4_spr_e4_gotdxguest.dat").quote)
    body = quote.body
    ok = TdxPolicy(forbid_debug=True, allowed_mr_td=frozenset({body.mr_td}), report_data=body.report_data)
    assert verify_tdx_quote(quote, at=VERIFIED_ON, policy=ok).verified
    debug_td = parse_tdx_quote(tdx_vector(attestation_testdata, "tdx/quote_v4_trustee.dat").quote)
    assert debug_td.body.debug  # TD_ATTRIBUTES 01...: a debuggable TD
    bad = TdxPolicy(forbid_debug=True, allowed_mr_td=frozenset({bytes(48)}), report_data=bytes(64))
    result = verify_tdx_quote(debug_td, at=VERIFIED_ON, policy=bad)
    assert [c.name for c in result.failures] == ["debug", "mr_td", "report_data"]


def test_tdx_quote_before_pck_validity_is_rejected(attestation_testdata: Path) -> None:
    from datetime import UTC, datetime

    quote = parse_tdx_quote(tdx_vector(attestation_testdata, "tdx/quote_v5_tdx15_gotdxguest.dat").quote)
    result = verify_tdx_quote(quote, at=datetime(2025, 1, 1, tzinfo=UTC))
    assert [c.name for c in result.failures] == ["validity"]
    assert "not valid before 2026-01-27" in result.failures[0].detail


def test_tdreport_hashes_pass_and_mac_is_named(attestation_testdata: Path) -> None:
    data = (attestation_testdata / "tdx/tdreport_guestcomponents.bin").read_bytes()
    result = verify_tdreport(parse_tdreport(data), at=VERIFIED_ON)
    assert [(c.name, c.status) for c in result.checks] == [
        ("tee_tcb_info_hash", CheckStatus.PASSED),
        ("tee_info_hash", CheckStatus.PASSED),
        ("mac", CheckStatus.FAILED),
    ]
    tampered = _flip(data, 600 * 8)
    assert verify_tdreport(parse_tdreport(tampered), at=VERIFIED_ON).check("tee_info_hash").status is (
        CheckStatus.FAILED
    )


def test_amd_serial_zero_certificates_load_without_warnings(attestation_testdata: Path) -> None:
    """AMD's VCEK/VLEK have serial 0: cvmctl silences exactly that deprecation warning."""
    from cvmattest.certs import load_certificate

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vcek = load_certificate((attestation_testdata / "snp/milan_v2_gosevguest_vcek.der").read_bytes())
        vlek = load_certificate((attestation_testdata / "snp/milan_v3_vlek_aws_vlek.der").read_bytes())
        report = parse_snp_report((attestation_testdata / "snp/milan_v2_gosevguest_report.bin").read_bytes())
        assert verify_snp_report(report, [vcek], at=VERIFIED_ON).verified
    assert vlek.not_valid_after_utc.year == 2025
    # other warnings still reach the caller: the filter is scoped to the load
    with pytest.warns(UserWarning, match="still here"):
        warnings.warn("still here", UserWarning, stacklevel=1)


def test_pck_signed_by_the_wrong_ca_names_both(attestation_testdata: Path) -> None:
    quote = parse_tdx_quote(tdx_vector(attestation_testdata, "tdx/quote_v4_trustee.dat").quote)
    pck, _platform_ca, root = load_certificates(quote.pck_chain_pem)
    result = verify_tdx_quote(quote, at=VERIFIED_ON, pck_chain=[pck, root, root])
    assert result.check("pck").detail.startswith(
        "Intel SGX PCK Certificate is not issued by Intel SGX Root CA"
    )


def test_unknown_cpu_model_certified_as_turin_uses_the_turin_layout(attestation_testdata: Path) -> None:
    vector = snp_vector(attestation_testdata, "snp/turin_v5_msft_report.bin")
    data = bytearray(vector.report)
    data[0x188] = 0x1B  # a CPU family this code does not know: the report names no product
    report = parse_snp_report(bytes(data))
    assert report.product is None
    result = verify_snp_report(report, vector.certificates, at=vector.at)
    assert result.check("product").detail == "Turin (from the certificate)"
    assert result.check("tcb").passed  # read with the Turin layout, so fmc=1 etc. match
    assert [c.name for c in result.failures] == ["report_signature"]  # the CPUID byte is signed
