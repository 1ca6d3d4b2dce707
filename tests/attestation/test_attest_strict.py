"""Strict evidence: hex with a 0x prefix, nothing unsigned after a report, reserved bytes zero.

The reserved ranges and the trailing-data rule are go-sev-guest's (``abi.ReportToProto`` and
the ``check`` tool's report-then-certificate-table reading); docs/attestation.md lists them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from cvmattest.binary import MalformedEvidence
from cvmattest.certs import load_certificate
from cvmattest.detect import parse_evidence
from cvmattest.snp import SNP_REPORT_SIZE, build_cert_table, parse_snp_report
from cvmattest.tdx import parse_tdx_quote
from cvmctl.cli.main import main
from tests.attestation.vectors import SNP_NAMES, read_evidence, snp_vector

AT = "2026-11-26T00:00:00Z"
MILAN_V3 = "snp/milan_v3_msft_report.bin"


def _report(root: Path, name: str = MILAN_V3) -> bytes:
    return read_evidence(root / name)


# -- hex text ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["0x", "0X", ""])
def test_hex_text_with_or_without_0x_and_line_breaks(attestation_testdata: Path, prefix: str) -> None:
    binary = _report(attestation_testdata)
    text = binary.hex()
    wrapped = prefix + "\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + "\r\n"
    assert parse_evidence(wrapped.encode()) == parse_snp_report(binary)
    assert parse_evidence(f"  {prefix}{text.upper()}\n".encode()) == parse_snp_report(binary)


def test_hex_text_of_odd_length_or_with_other_characters_is_not_decoded(attestation_testdata: Path) -> None:
    text = _report(attestation_testdata).hex()
    for bad in ("0x" + text[:-1], "0x" + text[:-2] + "zz", "x0" + text):
        with pytest.raises(MalformedEvidence, match="evidence: field 'header'"):
            parse_evidence(bad.encode())


# -- bytes after the report ----------------------------------------------------------------


def test_unsigned_bytes_after_a_report_are_refused(attestation_testdata: Path) -> None:
    report = _report(attestation_testdata)
    junk = b"\nextra bytes the signature does not cover\n"
    with pytest.raises(MalformedEvidence) as info:
        parse_evidence(report + junk)
    assert info.value.offset == SNP_REPORT_SIZE
    assert f"followed by {len(junk)} bytes that its signature does not cover" in str(info.value)
    with pytest.raises(MalformedEvidence, match=r"'end' at offset 0x4a0 has 3 bytes after the report"):
        parse_snp_report(report + b"abc")


def test_a_report_followed_by_its_certificate_table_carries_it(
    attestation_testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vector = snp_vector(attestation_testdata, MILAN_V3)
    vcek = load_certificate((attestation_testdata / "snp/milan_v3_msft_vcek.pem").read_bytes())
    der = vcek.public_bytes(Encoding.DER)
    extended = vector.report + build_cert_table({"VCEK": der}) + bytes(64)  # page padding
    parsed = parse_evidence(extended)
    assert [entry.kind for entry in parsed.certificate_table] == ["VCEK"]  # type: ignore[union-attr]
    assert parse_evidence(vector.report + bytes(4096)) == parse_snp_report(vector.report)  # empty table
    path = tmp_path / "extended.bin"
    path.write_bytes(extended)
    assert main(["attest", "verify", str(path), "--at", AT]) == 0  # the VCEK comes from the table
    assert capsys.readouterr().out.splitlines()[-1].startswith("sev-snp-report: verified")


def test_cli_refuses_junk_after_a_report(attestation_testdata: Path, tmp_path: Path) -> None:
    path = tmp_path / "report.bin"
    path.write_bytes(_report(attestation_testdata) + b"\x01" * 30)
    certs = str(attestation_testdata / "snp/milan_v3_msft_vcek.pem")
    assert main(["attest", "verify", str(path), "--certs", certs, "--at", AT]) == 2
    assert main(["attest", "show", str(path)]) == 2


# -- reserved fields -----------------------------------------------------------------------

RESERVED_BYTES = {  # a byte in each must-be-zero range, by report version
    3: [0x04C, 0x04F, 0x18B, 0x19F, 0x1EB, 0x1EF, 0x1F8, 0x207, 0x208, 0x29F, 0x330, 0x49F],
    2: [0x188, 0x18A, 0x1F8, 0x330],
    5: [0x208, 0x250, 0x330],
}


@pytest.mark.parametrize(
    ("name", "version"),
    [(MILAN_V3, 3), ("snp/milan_v2_gosevguest_report.bin", 2), ("snp/turin_v5_msft_report.bin", 5)],
)
def test_non_zero_reserved_bytes_are_refused_naming_the_offset(
    attestation_testdata: Path, name: str, version: int
) -> None:
    report = _report(attestation_testdata, name)
    assert parse_snp_report(report).version == version
    for offset in RESERVED_BYTES[version]:
        data = bytearray(report)
        data[offset] = 0x01
        with pytest.raises(MalformedEvidence, match="reserved bytes must be zero") as info:
            parse_snp_report(bytes(data))
        assert info.value.offset == offset


def test_version_decides_which_bytes_are_reserved(attestation_testdata: Path) -> None:
    """v5 fills the mitigation vectors at 0x1F8-0x207 and v3+ the CPUID at 0x188-0x18A."""
    turin = parse_snp_report(_report(attestation_testdata, "snp/turin_v5_msft_report.bin"))
    assert turin.launch_mit_vector == 0x3F
    milan = parse_snp_report(_report(attestation_testdata))
    assert milan.cpuid is not None and milan.cpuid.family == 0x19


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0x008, 0, "bit 17 is reserved and must be 1"),  # policy with bit 17 cleared
        (0x00B, 0x04, "bits 63:26 are reserved"),  # policy bit 26
        (0x048, 0x20, "bits 31:5 are reserved"),  # key_info bit 5
        (0x048, 0x0C, "names signing key 3; 2-6 are reserved"),
    ],
)
def test_reserved_policy_and_key_info_bits(
    attestation_testdata: Path, offset: int, value: int, message: str
) -> None:
    data = bytearray(_report(attestation_testdata))
    if offset == 0x008:
        data[0x00A] &= ~0x02  # clear bit 17
    else:
        data[offset] = value
    with pytest.raises(MalformedEvidence, match=message):
        parse_snp_report(bytes(data))


@pytest.mark.parametrize("name", SNP_NAMES)
def test_every_real_report_has_clean_reserved_fields(attestation_testdata: Path, name: str) -> None:
    parse_snp_report(snp_vector(attestation_testdata, name).report)


# -- a quote whose PCK chain does not parse ------------------------------------------------


def _quote_with_broken_chain(root: Path) -> bytes:
    quote = (root / "tdx/quote_v4_trustee.dat").read_bytes()
    begin = quote.index(b"-----BEGIN CERTIFICATE-----\n") + len(b"-----BEGIN CERTIFICATE-----\n")
    broken = bytearray(quote)
    broken[begin : begin + 4] = b"!!!!"  # same length: every length field still holds
    return bytes(broken)


def test_show_prints_a_quote_whose_pck_chain_does_not_parse(
    attestation_testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "quote.dat"
    path.write_bytes(_quote_with_broken_chain(attestation_testdata))
    assert main(["attest", "show", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pck_chain"].startswith("unparseable: the quote's PCK chain (certificate #1): not a")
    assert data["body"]["mr_td"] == parse_tdx_quote(path.read_bytes()).body.mr_td.hex()
    assert main(["attest", "show", str(path)]) == 0
    assert "unparseable" in capsys.readouterr().out


def test_verify_names_an_unparseable_pck_chain(
    attestation_testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "quote.dat"
    path.write_bytes(_quote_with_broken_chain(attestation_testdata))
    assert main(["attest", "verify", str(path), "--at", AT]) == 1
    assert "rejected: pck_chain: the quote's PCK chain does not parse" in capsys.readouterr().out


def test_a_real_0x_prefixed_hex_quote(attestation_testdata: Path) -> None:
    """dcap-qvl's sample quote is written as 0x-prefixed hex: it is read and its signatures verify."""
    from datetime import UTC, datetime

    from cvmattest.tdx import TdxQuote
    from cvmattest.verify_tdx import verify_tdx_quote

    text = (attestation_testdata / "tdx/quote_v4_dcapqvl_sample.hex").read_bytes()
    assert text.startswith(b"0x")
    quote = parse_evidence(text)
    assert isinstance(quote, TdxQuote) and quote.trailing_bytes == 70
    result = verify_tdx_quote(quote, at=datetime(2026, 10, 20, tzinfo=UTC))
    assert [c.name for c in result.failures] == []
    assert result.check("pck").detail == "PCK (FMSPC b0c06f000000) signed by Intel SGX PCK Platform CA"
