"""A test-only AMD-shaped chain (ARK -> ASK -> VCEK) and an SNP "firmware" that signs with it.

Real hardware signs reports we cannot make: to test evidence over a digest of our choosing
end to end, this module plays AMD's part with keys made in the test. The chain has the
shape the verifier checks (RSASSA-PSS SHA-384 salt 48 on every link, the VCEK's AMD
extensions: productName, hwID, TCB SPLs) and the report is a real Milan v3 report from the
fixtures with its REPORT_DATA replaced and re-signed with the test VCEK's P-384 key.

The verifier trusts this chain only when the test passes its ARK as roots
(``verify_evidence(..., arks=...)``, ``cvmctl results verify --roots``); against AMD's pinned
ARK it is rejected, which a test checks too.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from cvmattest.certs import AMD_TCB_OIDS, OID_HWID, OID_PRODUCT_NAME
from cvmattest.snp import SIGNED_REGION_END, build_cert_table, parse_snp_report

TEMPLATE = "snp/milan_v3_msft_report.bin"
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _builder(subject: str, issuer: str, key: object) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
    )


@dataclass(frozen=True)
class FakeAmdChain:
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    template: bytes

    def cert_table(self) -> bytes:
        """The extended report's certificate table (what configfs-tsm's auxblob holds)."""
        return build_cert_table(
            {kind: c.public_bytes(Encoding.DER) for kind, c in (("VCEK", self.vcek), ("ASK", self.ask))}
        )

    def report(self, report_data: bytes, vmpl: int = 0) -> bytes:
        """The template report with ``report_data`` and ``vmpl``, signed by the test VCEK."""
        report = bytearray(self.template)
        report[0x30:0x34] = vmpl.to_bytes(4, "little")
        report[0x50:0x90] = report_data
        der = self.vcek_key.sign(bytes(report[:SIGNED_REGION_END]), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        report[0x2A0:0x2E8] = r.to_bytes(72, "little")
        report[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(report)

    def outblob(self) -> Callable[[bytes, int], bytes]:
        """The firmware of a fake configfs-tsm: a signed report per request."""
        return self.report

    def ark_pem(self) -> bytes:
        return self.ark.public_bytes(Encoding.PEM)


def make_chain(fixtures: Path) -> FakeAmdChain:
    template = (fixtures / TEMPLATE).read_bytes()
    parsed = parse_snp_report(template)
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark = _builder("ARK-Milan", "ARK-Milan", ark_key.public_key()).sign(
        ark_key, hashes.SHA384(), rsa_padding=PSS
    )
    ask = _builder("SEV-Milan", "ARK-Milan", ask_key.public_key()).sign(
        ark_key, hashes.SHA384(), rsa_padding=PSS
    )
    vcek_builder = _builder("SEV-VCEK", "SEV-Milan", vcek_key.public_key()).add_extension(
        x509.UnrecognizedExtension(OID_PRODUCT_NAME, b"\x16\x08Milan-B0"), critical=False
    )
    vcek_builder = vcek_builder.add_extension(
        x509.UnrecognizedExtension(OID_HWID, parsed.chip_id), critical=False
    )
    for name, value in parsed.reported_tcb.components.items():
        vcek_builder = vcek_builder.add_extension(
            x509.UnrecognizedExtension(AMD_TCB_OIDS[name], _der_integer(value)), critical=False
        )
    vcek = vcek_builder.sign(ask_key, hashes.SHA384(), rsa_padding=PSS)
    return FakeAmdChain(ark, ask, vcek, vcek_key, template)
