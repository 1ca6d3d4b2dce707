"""Parsing: every decoded field equals expected.json; bad input gives a precise error."""

from __future__ import annotations

import contextlib
import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from cvmattest.binary import MalformedEvidence
from cvmattest.certs import load_certificates, read_amd_key_certificate
from cvmattest.snp import (
    SNP_REPORT_SIZE,
    Product,
    TcbLayout,
    TcbVersion,
    build_cert_table,
    parse_cert_table,
    parse_snp_report,
)
from cvmattest.tdx import parse_tdreport, parse_tdx_quote
from cvmcore.errors import UsageError
from tests.attestation.vectors import SNP_NAMES, TDX_QUOTE_NAMES, read_evidence, snp_vector, tdx_vector

TCB_KEYS = ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb")


def _tcb_dict(tcb: TcbVersion) -> dict[str, Any]:
    return {"raw": f"{tcb.raw:#018x}", **tcb.components}


@pytest.mark.parametrize("name", SNP_NAMES)
def test_snp_every_expected_field_matches(attestation_testdata: Path, name: str) -> None:
    vector = snp_vector(attestation_testdata, name)
    report = parse_snp_report(vector.report)
    exp = dict(vector.expected)
    checked = {"verifies_with", "verified"}

    leaf = read_amd_key_certificate(vector.certificates[0])
    product = report.product or leaf.product
    assert product is not None and product.value == exp["product"]
    if report.version == 2:
        assert report.product is None  # a v2 report does not name its generation
    actual: dict[str, Any] = {
        "product": product.value,
        "size": len(vector.report),
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": f"{report.policy.raw:#x}",
        "vmpl": report.vmpl,
        "signature_algo": report.signature_algo,
        "platform_info": f"{report.platform_info:#x}",
        "key_info": f"{report.key_info.raw:#x}",
        "signing_key": report.key_info.signing_key.name if report.key_info.signing_key else None,
        **{key: _tcb_dict(getattr(report, key)) for key in TCB_KEYS},
        "report_data": report.report_data.hex(),
        "measurement": report.measurement.hex(),
        "host_data": report.host_data.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "report_id": report.report_id.hex(),
        "chip_id": report.chip_id.hex(),
        "current_fw": str(report.current_fw),
        "committed_fw": str(report.committed_fw),
        "signature_r_le": report.signature_r.to_bytes(72, "little").hex(),
        "signature_s_le": report.signature_s.to_bytes(72, "little").hex(),
    }
    if report.cpuid is not None:
        actual["cpuid_fam_mod_step"] = [report.cpuid.family, report.cpuid.model, report.cpuid.stepping]
    if report.launch_mit_vector is not None:
        actual["launch_mit_vector"] = f"{report.launch_mit_vector:#x}"
        actual["current_mit_vector"] = f"{report.current_mit_vector:#x}"
    for key, value in exp.items():
        if key in checked:
            continue
        assert key in actual, f"expected.json field {key} is not decoded"
        assert actual[key] == value, key
    assert set(actual) - set(exp) == set()


def test_turin_tcb_layout_and_short_chip_id(attestation_testdata: Path) -> None:
    report = parse_snp_report(read_evidence(attestation_testdata / "snp/turin_v5_msft_report.bin"))
    assert report.product is Product.TURIN
    assert report.reported_tcb.layout is TcbLayout.TURIN
    assert report.reported_tcb.fmc == 1
    assert report.chip_id_for(Product.TURIN) == bytes.fromhex("59790fb1c39f35c1")
    assert report.to_dict()["reported_tcb"] == {
        "raw": "0x5100000004010101",
        "fmc": 1,
        "bootloader": 1,
        "tee": 1,
        "snp": 4,
        "microcode": 81,
    }


def test_policy_and_platform_bits_by_name(attestation_testdata: Path) -> None:
    debug = parse_snp_report(read_evidence(attestation_testdata / "snp/milan_v2_gosevguest_report.bin"))
    assert debug.policy.flags == ("SMT", "RESERVED_MUST_BE_ONE", "DEBUG")
    assert debug.policy.debug_allowed
    genoa = parse_snp_report(read_evidence(attestation_testdata / "snp/genoa_v3_msft_report.bin"))
    assert (genoa.policy.abi_major, genoa.policy.abi_minor) == (0, 0x1F)
    assert genoa.platform_info_flags == ("SMT_EN", "TSME_EN", "ECC_EN", "ALIAS_CHECK_COMPLETE")
    vlek = parse_snp_report(read_evidence(attestation_testdata / "snp/milan_v3_vlek_aws_report.bin"))
    assert vlek.to_dict()["key_info"]["signing_key"] == "VLEK"


def test_v2_report_cannot_claim_turin() -> None:
    data = bytearray(SNP_REPORT_SIZE)
    data[0] = 2
    with pytest.raises(MalformedEvidence, match=r"version.*Turin"):
        parse_snp_report(bytes(data), product=Product.TURIN)


def test_snp_product_contradicting_cpuid_is_an_error(attestation_testdata: Path) -> None:
    data = read_evidence(attestation_testdata / "snp/genoa_v3_msft_report.bin")
    with pytest.raises(MalformedEvidence, match=r"cpuid_fam_id' at offset 0x188 names Genoa"):
        parse_snp_report(data, product=Product.MILAN)


@pytest.mark.parametrize("name", TDX_QUOTE_NAMES)
def test_tdx_every_expected_field_matches(attestation_testdata: Path, name: str) -> None:
    vector = tdx_vector(attestation_testdata, name)
    quote = parse_tdx_quote(vector.quote)
    exp = vector.expected
    actual: dict[str, Any] = {
        "size": len(vector.quote),
        "version": quote.version,
        "attestation_key_type": quote.attestation_key_type,
        "tee_type": f"{quote.tee_type:#x}",
        "qe_vendor_id": quote.qe_vendor_id.hex(),
        "body": quote.body.to_dict(),
        "signed_bytes": f"0..{len(quote.signed_bytes):#x}",
        "signature_data_len": quote.used_bytes - len(quote.signed_bytes) - 4,
        "used_bytes": quote.used_bytes,
    }
    if quote.trailing_bytes:
        actual["trailing_bytes"] = quote.trailing_bytes
    if quote.version == 5:
        actual["body_type"] = quote.body.body_type
        actual["body_size"] = quote.body_size
    for key, value in exp.items():
        if key in ("verifies_with", "verified"):
            continue
        assert key in actual, f"expected.json field {key} is not decoded"
        assert actual[key] == value, key
    assert set(actual) - set(exp) == set()
    # the embedded chain is the one PROVENANCE.md says was cut out of the quote
    chain_file = attestation_testdata / exp["verifies_with"]["pck_chain"]
    assert load_certificates(quote.pck_chain_pem) == load_certificates(chain_file.read_bytes())


def test_tdreport_fields_match(attestation_testdata: Path) -> None:
    name = "tdx/tdreport_guestcomponents.bin"
    exp = {k: v for k, v in _expected_tdx(attestation_testdata)[name].items() if k != "verified"}
    data = (attestation_testdata / name).read_bytes()
    report = parse_tdreport(data)
    actual = {"size": len(data), **{k: report.fields[k].hex() for k in exp if k != "size"}}
    assert actual == exp


def _expected_tdx(root: Path) -> dict[str, Any]:
    from tests.attestation.vectors import expected_json

    tdx: dict[str, Any] = expected_json(root)["tdx"]
    return tdx


# -- malformed input ---------------------------------------------------------------------


def test_truncated_snp_report_names_field_and_offset(attestation_testdata: Path) -> None:
    data = read_evidence(attestation_testdata / "snp/milan_v3_msft_report.bin")
    with pytest.raises(MalformedEvidence) as info:
        parse_snp_report(data[:0x2AA])
    assert str(info.value) == (
        "SNP report: field 'signature.r' at offset 0x2a0 (72 bytes) is truncated: the input ends at 0x2aa"
    )
    assert isinstance(info.value, UsageError)
    with pytest.raises(MalformedEvidence, match=r"'measurement' at offset 0x90 \(48 bytes\)"):
        parse_snp_report(data[:0xA0])
    with pytest.raises(MalformedEvidence, match=r"'version' at offset 0x0"):
        parse_snp_report(data[:3])


@pytest.mark.parametrize("name", SNP_NAMES)
def test_every_snp_truncation_is_a_precise_error(attestation_testdata: Path, name: str) -> None:
    data = snp_vector(attestation_testdata, name).report
    for length in range(SNP_REPORT_SIZE):
        with pytest.raises(MalformedEvidence, match=r"at offset 0x[0-9a-f]+ \(\d+ bytes\) is truncated"):
            parse_snp_report(data[:length])


def test_truncated_tdx_quote_names_field(attestation_testdata: Path) -> None:
    data = (attestation_testdata / "tdx/quote_v4_trustee.dat").read_bytes()
    with pytest.raises(MalformedEvidence) as info:
        parse_tdx_quote(data[:700])
    assert str(info.value) == (
        "TDX quote: field 'signature_data' at offset 0x27c (4300 bytes) is truncated: the input ends at 0x2bc"
    )
    with pytest.raises(MalformedEvidence, match=r"'body.rtmr1' at offset 0x1a8"):
        parse_tdx_quote(data[:0x1C0])


@pytest.mark.parametrize("name", TDX_QUOTE_NAMES)
def test_every_tdx_truncation_is_a_precise_error(attestation_testdata: Path, name: str) -> None:
    quote = tdx_vector(attestation_testdata, name).quote
    used = parse_tdx_quote(quote).used_bytes
    for length in range(used):
        with pytest.raises(MalformedEvidence, match="is truncated"):
            parse_tdx_quote(quote[:length])


def test_corrupt_tdx_length_fields_never_escape_as_index_errors(attestation_testdata: Path) -> None:
    quote = (attestation_testdata / "tdx/quote_v5_tdx15_gotdxguest.dat").read_bytes()
    rng = random.Random(5)
    # signature_data_len, certification data size, auth data size, PCK data size: random values
    length_fields = [(0x2BE, 4), (0x2C2 + 130, 4), (0x2C2 + 134 + 384 + 64, 2)]
    for offset, size in length_fields:
        for _ in range(200):
            corrupt = bytearray(quote)
            corrupt[offset : offset + size] = rng.getrandbits(8 * size).to_bytes(size, "little")
            with contextlib.suppress(MalformedEvidence):  # anything else escapes and fails
                parse_tdx_quote(bytes(corrupt))


def test_wrong_magic_is_named() -> None:
    quote = bytearray(1000)
    quote[0:2] = (4).to_bytes(2, "little")
    quote[2:4] = (2).to_bytes(2, "little")
    quote[4:8] = (0x00).to_bytes(4, "little")
    with pytest.raises(MalformedEvidence, match=r"'tee_type' at offset 0x4 is 0x0, not 0x81"):
        parse_tdx_quote(bytes(quote))
    report = bytearray(SNP_REPORT_SIZE)
    report[0] = 9
    with pytest.raises(MalformedEvidence, match=r"'version' at offset 0x0 is 9"):
        parse_snp_report(bytes(report))


def test_tdreport_truncated_and_too_long(attestation_testdata: Path) -> None:
    data = (attestation_testdata / "tdx/tdreport_guestcomponents.bin").read_bytes()
    with pytest.raises(MalformedEvidence, match=r"TDREPORT: field 'rtmr2' at offset 0x330"):
        parse_tdreport(data[:0x340])
    with pytest.raises(MalformedEvidence, match="8 bytes after the report"):
        parse_tdreport(data + bytes(8))


# -- certificate table -------------------------------------------------------------------


def test_cert_table_round_trip_by_guid() -> None:
    table = build_cert_table({"VCEK": b"vcek-der", "ASK": b"ask", "ARK": b"ark-der!"})
    entries = parse_cert_table(table + bytes(100))  # the kernel hands over whole pages
    assert [(e.kind, e.data) for e in entries] == [
        ("VCEK", b"vcek-der"),
        ("ASK", b"ask"),
        ("ARK", b"ark-der!"),
    ]
    assert entries[0].guid == uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
    # the GUID is stored in the mixed-endian byte order: first field little-endian
    assert table[:4] == bytes.fromhex("8d75da63")
    assert parse_cert_table(bytes(4096)) == ()


def test_cert_table_entry_past_the_end() -> None:
    table = build_cert_table({"VLEK": b"x" * 50})
    with pytest.raises(MalformedEvidence, match=r"'entry\[0\].certificate' at offset 0x30 \(50 bytes\)"):
        parse_cert_table(table[:60])
    with pytest.raises(MalformedEvidence, match=r"'entry\[0\].guid' at offset 0x0"):
        parse_cert_table(b"\x01\x02")


@pytest.mark.parametrize(
    ("name", "fmspc"),
    [
        ("tdx/quote_v4_spr_e4_gotdxguest.dat", "50806f000000"),
        ("tdx/quote_v4_trustee.dat", "50806f000000"),
        ("tdx/quote_v5_tdx15_gotdxguest.dat", "90c06f000000"),
    ],
)
def test_pck_platform_fmspc(attestation_testdata: Path, name: str, fmspc: str) -> None:
    from cvmattest.sgx_pck import read_pck_platform

    quote = parse_tdx_quote((attestation_testdata / name).read_bytes())
    platform = read_pck_platform(load_certificates(quote.pck_chain_pem)[0])
    assert platform.fmspc.hex() == fmspc
    assert platform.pce_id == bytes(2)
    assert len(platform.cpusvn) == 16 and list(platform.cpusvn) == list(platform.sgx_tcb_components)


def test_pck_platform_of_a_non_pck_certificate(attestation_testdata: Path) -> None:
    from cvmattest.sgx_pck import read_pck_platform

    ark = load_certificates((attestation_testdata / "snp/ask_ark_milan.pem").read_bytes())[1]
    with pytest.raises(MalformedEvidence, match="is missing: not a PCK certificate"):
        read_pck_platform(ark)


def test_pck_der_walker_rejects_truncation_precisely() -> None:
    from cvmattest.sgx_pck import _der_elements

    assert list(_der_elements(bytes.fromhex("0403aabbcc0500"))) == [
        (0x04, b"\xaa\xbb\xcc", 2),
        (0x05, b"", 7),
    ]
    assert list(_der_elements(bytes.fromhex("0481020102"))) == [(0x04, b"\x01\x02", 3)]
    with pytest.raises(MalformedEvidence, match=r"'element tag 0x4' at offset 0x0 runs past its parent"):
        list(_der_elements(bytes.fromhex("0405aabb")))
    with pytest.raises(MalformedEvidence, match=r"'length' at offset 0x1 is not a usable DER length"):
        list(_der_elements(bytes.fromhex("0480")))
