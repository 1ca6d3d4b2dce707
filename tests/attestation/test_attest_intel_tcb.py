"""Intel collateral: a real TDX quote with its real TCB Info, QE identity and CRLs -> a TCB status.

The quote and collateral are dcap-qvl's (tests/fixtures/attestation/PROVENANCE.md); the
collateral was current from 2025-09-02 to 2025-10-02, so every check runs "as of" a fixed
time in that window.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cvmattest.certs import load_certificates
from cvmattest.detect import parse_evidence
from cvmattest.intel_tcb import (
    CollateralError,
    evaluate_tcb,
    parse_collateral,
    parse_qe_identity,
    parse_tcb_info,
    signature_problem,
)
from cvmattest.pcs import PcsClient, signed_member
from cvmattest.sgx_pck import read_pck_platform
from cvmattest.tdx import TdxQuote, parse_tdx_quote
from cvmattest.verify_tdx import verify_tdx_quote
from cvmctl.cli.main import main
from tests.attestation.local_http import QuietHandler, serving

QUOTE = "tdx/quote_v4_dcapqvl_near.hex"
COLLATERAL = "tdx/collateral_fmspc_20a06f000000_dcapqvl.json"
AS_OF = datetime(2025, 9, 15, tzinfo=UTC)
"""Inside every document's validity: TCB Info and QE identity 2025-09-02..10-02, PCK CRL the same."""
FIRST_REVOKED_SERIAL = 0x6FC34E5023E728923435D61AA4B83C618166AD35
"""The first entry of the real PCK CRL (Intel SGX PCK Platform CA, 2025-09-02), key compromise."""


def _quote(root: Path) -> TdxQuote:
    quote = parse_evidence((root / QUOTE).read_bytes())
    assert isinstance(quote, TdxQuote)
    return quote


def _collateral_bytes(root: Path) -> bytes:
    return (root / COLLATERAL).read_bytes()


def test_real_quote_with_real_collateral_is_up_to_date(attestation_testdata: Path) -> None:
    result = verify_tdx_quote(
        _quote(attestation_testdata),
        at=AS_OF,
        collateral=parse_collateral(_collateral_bytes(attestation_testdata)),
    )
    assert result.verified, result.summary()
    names = [check.name for check in result.checks]
    assert names[9:] == [
        "tcb_info",
        "qe_identity_collateral",
        "root_ca_crl",
        "pck_crl",
        "revocation",
        "fmspc",
        "qe_tcb",
        "tdx_module",
        "tcb_status",
    ]
    assert result.check("tcb_status").detail == "UpToDate (advisories: none)"
    assert result.check("pck_crl").detail.endswith("44 revoked")
    assert result.details["tcb"]["status"] == "UpToDate"
    assert result.details["tcb"]["tdx_module_status"] == "UpToDate"  # TDX_01, module SVN 6 >= 4


def test_cli_prints_the_tcb_status(attestation_testdata: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["attest", "verify", str(attestation_testdata / QUOTE), "--at", "2025-09-15T00:00:00Z"]
    assert main([*args, "--collateral", str(attestation_testdata / COLLATERAL)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == "TCB status: UpToDate; advisory IDs: none"
    assert lines[-1] == "tdx-quote-v4: verified (18 checks)"
    assert main([*args, "--collateral", str(attestation_testdata / COLLATERAL), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tcb"]["status"] == "UpToDate" and data["tcb"]["advisory_ids"] == []


def test_expired_collateral_is_rejected_naming_each_document(attestation_testdata: Path) -> None:
    result = verify_tdx_quote(
        _quote(attestation_testdata),
        at=datetime(2025, 10, 5, tzinfo=UTC),
        collateral=parse_collateral(_collateral_bytes(attestation_testdata)),
    )
    failed = {check.name: check.detail for check in result.failures}
    assert set(failed) == {"tcb_info", "qe_identity_collateral", "pck_crl"}
    assert (
        failed["tcb_info"] == "the TCB Info expired 2025-10-02T07:41:59+00:00 (its next update was due then)"
    )
    assert result.check("tcb_status").detail.startswith("the TCB Info or QE identity did not verify")
    assert "tcb" not in result.details  # no status from an expired document


def test_tampered_tcb_info_fails_its_signature(attestation_testdata: Path) -> None:
    document = json.loads(_collateral_bytes(attestation_testdata))
    document["tcb_info"] = document["tcb_info"].replace(
        '"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18'
    )
    result = verify_tdx_quote(
        _quote(attestation_testdata), at=AS_OF, collateral=parse_collateral(json.dumps(document).encode())
    )
    assert result.failures[0].name == "tcb_info"
    assert result.failures[0].detail == "the ECDSA signature by Intel SGX TCB Signing does not verify"


def test_collateral_of_another_platform_type_fails_fmspc(attestation_testdata: Path) -> None:
    trustee = parse_tdx_quote((attestation_testdata / "tdx/quote_v4_trustee.dat").read_bytes())
    result = verify_tdx_quote(
        trustee, at=AS_OF, collateral=parse_collateral(_collateral_bytes(attestation_testdata))
    )
    assert result.check("fmspc").detail == "the PCK is for FMSPC 50806f000000, TCB Info for 20a06f000000"
    assert "tcb_status" not in [check.name for check in result.checks]


# -- revocation: the real PCK CRL ---------------------------------------------------------


def _test_only_pck(issuer: x509.Name, serial: int) -> x509.Certificate:
    """TEST ONLY: a certificate claiming the Platform CA as issuer, with a serial the real CRL lists.

    No real revoked PCK certificate is published; the CRL entry is real, the certificate is
    made here (self-signed, so its chain fails too - the revocation check is what is asserted).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime(2025, 1, 1, tzinfo=UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Intel SGX PCK Certificate")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )


def test_a_revoked_pck_is_rejected_naming_the_check(
    attestation_testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quote = _quote(attestation_testdata)
    _pck, ca, root = load_certificates(quote.pck_chain_pem)
    revoked = _test_only_pck(ca.subject, FIRST_REVOKED_SERIAL)
    collateral = parse_collateral(_collateral_bytes(attestation_testdata))
    result = verify_tdx_quote(quote, at=AS_OF, pck_chain=[revoked, ca, root], collateral=collateral)
    detail = result.check("revocation").detail
    assert not result.check("revocation").passed
    assert detail.startswith(
        "Intel SGX PCK Certificate serial 6fc34e5023e728923435d61aa4b83c618166ad35 is revoked since "
        "2025-09-02T07:03:51+00:00, reason keyCompromise"
    )
    # the same through the CLI: the chain given with --certs replaces the quote's
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (revoked, ca, root)))
    args = ["attest", "verify", str(attestation_testdata / QUOTE), "--at", "2025-09-15T00:00:00Z"]
    assert main([*args, "--certs", str(chain), "--collateral", str(attestation_testdata / COLLATERAL)]) == 1
    out = capsys.readouterr().out
    assert "revocation              FAILED   Intel SGX PCK Certificate serial 6fc34e50" in out


def test_the_real_chain_is_not_on_the_real_crls(attestation_testdata: Path) -> None:
    collateral = parse_collateral(_collateral_bytes(attestation_testdata))
    assert collateral.pck_crl is not None and collateral.root_ca_crl is not None
    pck, _ca, _root = load_certificates(_quote(attestation_testdata).pck_chain_pem)
    revoked = {entry.serial_number for entry in collateral.pck_crl}
    assert len(revoked) == 44 and FIRST_REVOKED_SERIAL in revoked
    assert pck.serial_number not in revoked
    assert list(collateral.root_ca_crl) == []  # Intel has revoked no CA


# -- the matching algorithm on real TCB Info documents --------------------------------------


def _gotdxguest_documents(root: Path) -> tuple[bytes, bytes]:
    """The 2023 TCB Info (FMSPC 50806f000000) and QE identity: the signed texts, cut from PCS bodies."""
    tcb_text, tcb_sig = signed_member(
        (root / "tdx/tcbinfo_fmspc_50806f000000_gotdxguest.json").read_bytes(), "tcbInfo"
    )
    qe_text, _ = signed_member(
        (root / "tdx/qe_identity_td_qe_gotdxguest.json").read_bytes(), "enclaveIdentity"
    )
    # the cut text is exactly what Intel signed: the TCB Signing key verifies it
    signing = load_certificates(json.loads(_collateral_bytes(root))["tcb_info_issuer_chain"].encode())[0]
    assert signature_problem(signing, bytes.fromhex(tcb_sig), tcb_text.encode()) is None
    return tcb_text.encode(), qe_text.encode()


def _with_tee_tcb_svn(quote: TdxQuote, svn: bytes) -> TdxQuote:
    body = dataclasses.replace(quote.body, fields={**quote.body.fields, "tee_tcb_svn": svn})
    return dataclasses.replace(quote, body=body)


def test_levels_and_advisories_from_a_real_tcb_info(attestation_testdata: Path) -> None:
    tcb_text, qe_text = _gotdxguest_documents(attestation_testdata)
    tcb_info, qe_identity = parse_tcb_info(tcb_text), parse_qe_identity(qe_text)
    trustee = parse_tdx_quote((attestation_testdata / "tdx/quote_v4_trustee.dat").read_bytes())
    platform = read_pck_platform(load_certificates(trustee.pck_chain_pem)[0])
    assert evaluate_tcb(tcb_info, qe_identity, platform, trustee).status == "UpToDate"
    # the same platform with an old PCE falls to the 2018 level and its advisories
    old_pce = dataclasses.replace(platform, pcesvn=5)
    evaluation = evaluate_tcb(tcb_info, qe_identity, old_pce, trustee)
    assert evaluation.status == "OutOfDate"
    assert evaluation.sgx_level is not None and evaluation.sgx_level.date == "2018-01-04T00:00:00Z"
    assert evaluation.advisory_ids[:3] == ("INTEL-SA-00106", "INTEL-SA-00115", "INTEL-SA-00135")
    assert len(evaluation.advisory_ids) == 13
    # TDX components below every level: not supported, said why
    low_tdx = evaluate_tcb(tcb_info, qe_identity, platform, _with_tee_tcb_svn(trustee, bytes(16)))
    assert low_tdx.status is None and low_tdx.problem is not None and "TEE_TCB_SVN" in low_tdx.problem
    # the SPR E4 platform's SGX components are below every level of this TCB Info
    spr = parse_tdx_quote((attestation_testdata / "tdx/quote_v4_spr_e4_gotdxguest.dat").read_bytes())
    spr_platform = read_pck_platform(load_certificates(spr.pck_chain_pem)[0])
    unmatched = evaluate_tcb(tcb_info, qe_identity, spr_platform, spr)
    assert unmatched.status is None
    assert unmatched.problem == (
        "no TCB level of FMSPC 50806f000000 has SGX components <= the PCK's "
        "[3, 3, 2, 2, 2, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0] with PCESVN <= 11"
    )


def test_module_and_qe_status_converge(attestation_testdata: Path) -> None:
    collateral = parse_collateral(_collateral_bytes(attestation_testdata))
    quote = _quote(attestation_testdata)
    platform = read_pck_platform(load_certificates(quote.pck_chain_pem)[0])
    # TDX_01 level isvsvn 2 is OutOfDate: a module SVN of 3 drags UpToDate down to OutOfDate
    old_module = _with_tee_tcb_svn(quote, bytes([3, 1, 4]) + bytes(13))
    evaluation = evaluate_tcb(collateral.tcb_info, collateral.qe_identity, platform, old_module)
    assert (evaluation.status, evaluation.module_status) == ("OutOfDate", "OutOfDate")
    # a module version the TCB Info has no identity for
    unknown = evaluate_tcb(
        collateral.tcb_info,
        collateral.qe_identity,
        platform,
        _with_tee_tcb_svn(quote, bytes([6, 2, 4]) + bytes(13)),
    )
    assert unknown.status is None and unknown.problem is not None and "TDX_02" in unknown.problem
    # a QE below every QE identity level
    old_qe = dataclasses.replace(quote, qe_report=dataclasses.replace(quote.qe_report, isv_svn=3))
    assert evaluate_tcb(collateral.tcb_info, collateral.qe_identity, platform, old_qe).status is None
    # a revoked QE level makes the whole Revoked
    revoked_levels = tuple(
        dataclasses.replace(level, status="Revoked") for level in collateral.qe_identity.levels
    )
    revoked_qe = dataclasses.replace(collateral.qe_identity, levels=revoked_levels)
    assert evaluate_tcb(collateral.tcb_info, revoked_qe, platform, quote).status == "Revoked"


def test_accept_tcb_lets_a_status_pass(attestation_testdata: Path) -> None:
    collateral = parse_collateral(_collateral_bytes(attestation_testdata))
    up = verify_tdx_quote(
        _quote(attestation_testdata), at=AS_OF, collateral=collateral, accepted_tcb=frozenset()
    )
    assert up.check("tcb_status").detail.startswith("UpToDate (advisories: none) is not accepted")


def test_malformed_collateral_is_a_collateral_error(attestation_testdata: Path) -> None:
    document = json.loads(_collateral_bytes(attestation_testdata))
    for key, value in [
        ("tcb_info", "{"),
        ("tcb_info_signature", "zz"),
        ("pck_crl", "3082"),
        ("qe_identity", json.dumps({"id": "TD_QE"})),
        ("tcb_info_issuer_chain", "not a pem"),
    ]:
        broken = {**document, key: value}
        with pytest.raises(CollateralError):
            parse_collateral(json.dumps(broken).encode())
    with pytest.raises(CollateralError, match="collateral: expected a JSON object"):
        parse_collateral(b"[]")


# -- PCS: the fetch path against a local server serving PCS's URL layout -----------------------


@pytest.fixture
def pcs(attestation_testdata: Path) -> Iterator[tuple[str, list[str]]]:
    """A server on 127.0.0.1 answering as PCS does, from the real collateral's pieces."""
    document: dict[str, str] = json.loads(_collateral_bytes(attestation_testdata))

    def body(member: str, key: str) -> bytes:
        return (
            '{"' + member + '": ' + document[key] + ', "signature": "' + document[key + "_signature"] + '"}'
        ).encode()

    routes = {
        "/tdx/certification/v4/tcb?fmspc=20a06f000000": (
            body("tcbInfo", "tcb_info"),
            {"TCB-Info-Issuer-Chain": urllib.parse.quote(document["tcb_info_issuer_chain"])},
        ),
        "/tdx/certification/v4/qe/identity": (
            body("enclaveIdentity", "qe_identity"),
            {"SGX-Enclave-Identity-Issuer-Chain": urllib.parse.quote(document["qe_identity_issuer_chain"])},
        ),
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der": (
            bytes.fromhex(document["pck_crl"]),
            {"SGX-PCK-CRL-Issuer-Chain": urllib.parse.quote(document["pck_crl_issuer_chain"])},
        ),
        "/IntelSGXRootCA.der": (bytes.fromhex(document["root_ca_crl"]), {}),
    }
    requests: list[str] = []

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            if self.path not in routes:
                self.send_error(404, "Not Found")
                return
            data, headers = routes[self.path]
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with serving(Handler) as url:
        yield url, requests


def test_pcs_fetch_caches_until_the_collateral_expires(
    attestation_testdata: Path, pcs: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, requests = pcs
    client = PcsClient(base_url=url, root_ca_crl_url=url + "/IntelSGXRootCA.der", cache_dir=tmp_path)
    fetched = parse_collateral(client.collateral(bytes.fromhex("20a06f000000"), "platform", AS_OF))
    assert (
        fetched.tcb_info.signed == parse_collateral(_collateral_bytes(attestation_testdata)).tcb_info.signed
    )
    assert len(requests) == 4
    again = PcsClient(base_url=url, root_ca_crl_url=url + "/IntelSGXRootCA.der", cache_dir=tmp_path)
    again.collateral(bytes.fromhex("20a06f000000"), "platform", AS_OF)
    assert again.requests_made == 0  # served from the cache
    again.collateral(bytes.fromhex("20a06f000000"), "platform", datetime(2025, 10, 3, tzinfo=UTC))
    assert again.requests_made == 4  # expired: fetched anew
    result = verify_tdx_quote(_quote(attestation_testdata), at=AS_OF, collateral=fetched)
    assert result.verified and result.check("tcb_status").detail.startswith("UpToDate")


def test_cli_pcs_option_rules(attestation_testdata: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quote = str(attestation_testdata / QUOTE)
    assert main(["attest", "verify", quote, "--pcs-cache", "/tmp/x"]) == 2
    assert "apply only with --pcs" in capsys.readouterr().err
    assert (
        main(["attest", "verify", quote, "--pcs", "--collateral", str(attestation_testdata / COLLATERAL)])
        == 2
    )
    snp = str(attestation_testdata / "snp/milan_v3_msft_report.bin")
    certs = str(attestation_testdata / "snp/milan_v3_msft_vcek.pem")
    assert (
        main(
            [
                "attest",
                "verify",
                snp,
                "--certs",
                certs,
                "--collateral",
                str(attestation_testdata / COLLATERAL),
            ]
        )
        == 2
    )
    assert "applies to TDX quotes only" in capsys.readouterr().err
