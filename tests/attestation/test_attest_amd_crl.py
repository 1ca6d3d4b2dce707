"""AMD's CRL: signed by the ARK with RSASSA-PSS/SHA-384, current, and the ASK/ASVK not on it.

No real AMD CRL could be found in the public repositories searched, and no real revoked AMD
certificate exists, so the revoked case uses a TEST-ONLY ARK, ASK and CRL made here. The real
chain is checked against a CRL that is not its ARK's, which must fail the ``crl`` check.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cvmattest.certs import amd_crl_problem, common_name, load_crl, revoked_by
from cvmattest.kds import KdsClient, crl_path
from cvmattest.result import VerificationResult
from cvmattest.snp import Product, parse_snp_report
from cvmattest.verify_snp import check_crl, verify_snp_report
from cvmctl.cli.main import main
from tests.attestation.local_http import QuietHandler, serving
from tests.attestation.vectors import VERIFIED_ON, snp_vector

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
ISSUED = datetime(2026, 11, 1, tzinfo=UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


class FakeAmdPki:
    """TEST ONLY: an ARK, an ASK it signs and the ARK's CRL, all RSASSA-PSS like AMD's."""

    def __init__(self, ark_name: x509.Name | None = None) -> None:
        self.ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ark_name = ark_name or _name("ARK-Milan (TEST ONLY)")
        self.ark = self._cert(self.ark_name, self.ark_name, self.ark_key, serial=1)
        self.ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ask = self._cert(_name("SEV-Milan (TEST ONLY)"), self.ark_name, self.ask_key, serial=0x1234)

    def _cert(
        self, subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey, serial: int
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(ISSUED - timedelta(days=365))
            .not_valid_after(ISSUED + timedelta(days=3650))
            .sign(self.ark_key, hashes.SHA384(), rsa_padding=PSS)
        )

    def crl(self, revoked: list[int], next_update: datetime | None = None) -> x509.CertificateRevocationList:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ark_name)
            .last_update(ISSUED)
            .next_update(next_update or ISSUED + timedelta(days=30))
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(ISSUED).build()
            )
        return builder.sign(self.ark_key, hashes.SHA384(), rsa_padding=PSS)


AT = ISSUED + timedelta(days=3)


def test_a_revoked_ask_is_rejected_naming_the_check() -> None:
    pki = FakeAmdPki()
    crl = pki.crl([0x1234])
    assert amd_crl_problem(crl, pki.ark, AT) is None
    result = VerificationResult(tee="sev-snp", evidence_type="test", at=AT)
    check_crl(crl, None, pki.ark, [pki.ark, pki.ask], AT, result)
    assert result.check("crl").passed
    assert not result.check("revocation").passed
    assert result.summary() == (
        "rejected: revocation: SEV-Milan (TEST ONLY) (serial 1234) was revoked 2026-11-01T00:00:00+00:00"
    )
    # not listed: passes, naming what was looked up
    clean = VerificationResult(tee="sev-snp", evidence_type="test", at=AT)
    check_crl(pki.crl([0x9999]), None, pki.ark, [pki.ark, pki.ask], AT, clean)
    assert clean.verified and clean.check("revocation").detail == (
        "not on the CRL: ARK-Milan (TEST ONLY), SEV-Milan (TEST ONLY)"
    )


def test_crl_signature_issuer_and_dates() -> None:
    pki, other = FakeAmdPki(), FakeAmdPki()
    assert amd_crl_problem(other.crl([]), pki.ark, AT) == (
        "the CRL's RSASSA-PSS signature does not verify with ARK-Milan (TEST ONLY)"
    )
    assert amd_crl_problem(pki.crl([]), pki.ask, AT) is not None  # not the ARK's
    expired = pki.crl([], next_update=ISSUED + timedelta(days=1))
    assert (
        amd_crl_problem(expired, pki.ark, AT)
        == "the CRL expired 2026-11-02T00:00:00+00:00: get a current one"
    )
    assert "issued 2026-11-01" in (amd_crl_problem(pki.crl([]), pki.ark, ISSUED - timedelta(days=1)) or "")
    assert revoked_by(pki.crl([0x1234]), [pki.ask])[0].startswith("SEV-Milan (TEST ONLY) (serial 1234)")


def test_the_real_chain_refuses_a_crl_its_ark_did_not_sign(attestation_testdata: Path) -> None:
    vector = snp_vector(attestation_testdata, "snp/milan_v3_msft_report.bin")
    ark = next(c for c in vector.certificates if common_name(c) == "ARK-Milan")
    forged = FakeAmdPki(ark_name=ark.subject)  # claims to be ARK-Milan, signed by another key
    report = parse_snp_report(vector.report)
    result = verify_snp_report(report, vector.certificates, at=VERIFIED_ON, crl=forged.crl([]))
    assert result.summary() == "rejected: crl: the CRL's RSASSA-PSS signature does not verify with ARK-Milan"
    unavailable = verify_snp_report(report, vector.certificates, at=VERIFIED_ON, crl_unavailable="KDS down")
    assert unavailable.verified and unavailable.check("crl").detail == "KDS down"


def test_cli_crl_file(attestation_testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ark = x509.load_pem_x509_certificates((attestation_testdata / "snp/ask_ark_milan.pem").read_bytes())[1]
    path = tmp_path / "milan.crl"
    path.write_bytes(FakeAmdPki(ark_name=ark.subject).crl([]).public_bytes(serialization.Encoding.DER))
    report = attestation_testdata / "snp/milan_v3_msft_report.bin"
    certs = attestation_testdata / "snp/milan_v3_msft_vcek.pem"
    args = ["attest", "verify", str(report), "--certs", str(certs), "--at", "2026-11-26T00:00:00Z"]
    assert main([*args, "--crl", str(path)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "sev-snp-report: rejected: crl: the CRL's RSASSA-PSS signature does not verify with ARK-Milan"
    )
    path.write_bytes(b"not a crl")
    assert main([*args, "--crl", str(path)]) == 2


def test_kds_crl_is_cached_while_current(tmp_path: Path) -> None:
    pki = FakeAmdPki()
    der = pki.crl([]).public_bytes(serialization.Encoding.DER)
    requests: list[str] = []

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200 if self.path == crl_path(Product.MILAN) else 404)
            self.send_header("Content-Length", str(len(der)))
            self.end_headers()
            self.wfile.write(der)

    with serving(Handler) as url:
        client = KdsClient(base_url=url, cache_dir=tmp_path, sleep=lambda _: None)
        assert load_crl(client.crl(Product.MILAN, AT)).issuer == pki.ark_name
        assert load_crl(client.crl(Product.MILAN, AT + timedelta(days=1))) is not None
        assert requests == ["/vcek/v1/Milan/crl"]  # the second came from the cache
        client.crl(Product.MILAN, AT + timedelta(days=60))  # past nextUpdate: fetched again
        assert len(requests) == 2
