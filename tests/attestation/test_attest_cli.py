"""``cvmctl attest show|verify``: exit 0 verified, 1 rejected (naming the check), 2 unusable input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvmattest.certs import load_certificates
from cvmattest.snp import build_cert_table
from cvmctl.cli.main import main
from tests.attestation.vectors import SNP_NAMES, TDX_QUOTE_NAMES, expected_json

AT = "2026-11-26T00:00:00Z"


def _snp_args(root: Path, name: str) -> list[str]:
    sources = expected_json(root)["snp"][name]["verifies_with"]
    at = "2025-06-01T00:00:00Z" if "vlek" in name else AT
    return ["attest", "verify", str(root / name), "--certs", str(root / sources["leaf"]), "--at", at]


@pytest.mark.parametrize("name", SNP_NAMES)
def test_verify_snp_exit_0(attestation_testdata: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_snp_args(attestation_testdata, name)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "sev-snp-report: verified (13 checks)"  # crl: skipped, said


@pytest.mark.parametrize("name", TDX_QUOTE_NAMES)
def test_verify_tdx_exit_0_json(
    attestation_testdata: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["attest", "verify", str(attestation_testdata / name), "--at", AT, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verified"] is True
    assert data["tee"] == "tdx"
    statuses = {check["name"]: check["status"] for check in data["checks"]}
    assert statuses.pop("tcb_status") == "skipped"  # no collateral given: said, not silently dropped
    assert set(statuses.values()) == {"passed"}


def test_verify_rejected_exit_1_names_the_check(
    attestation_testdata: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _snp_args(attestation_testdata, "snp/milan_v3_vlek_aws_report.bin")
    args[args.index("--at") + 1] = AT  # after the VLEK expired
    assert main(args) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "sev-snp-report: rejected: validity: SEV-VLEK expired 2025-12-10T22:14:21+00:00"


def test_verify_with_nonce_and_policy(attestation_testdata: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _snp_args(attestation_testdata, "snp/milan_v2_gosevguest_report.bin")
    assert main([*args, "--nonce", "0102030405", "--min-tcb", "snp=5"]) == 0
    assert main([*args, "--nonce", "0102030406"]) == 1
    assert "rejected: report_data" in capsys.readouterr().out
    assert main([*args, "--forbid-debug"]) == 1
    assert "rejected: debug: the guest policy allows debugging" in capsys.readouterr().out


def test_verify_another_generations_chain_exit_1(
    attestation_testdata: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = attestation_testdata
    args = ["attest", "verify", str(root / "snp/genoa_v3_msft_report.bin"), "--at", AT]
    args += [
        "--certs",
        str(root / "snp/milan_v3_msft_vcek.pem"),
        "--certs",
        str(root / "snp/ask_ark_milan.pem"),
    ]
    assert main(args) == 1
    assert "rejected: product: the report comes from Genoa (CPUID) but the certificate is for Milan" in (
        capsys.readouterr().out
    )


def test_verify_certificate_table_as_certs(
    attestation_testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    root = attestation_testdata
    vcek = (root / "snp/genoa_v3_msft_vcek.pem").read_bytes()
    ask, ark = load_certificates((root / "snp/ask_ark_genoa.pem").read_bytes())
    table = build_cert_table(
        {
            "VCEK": load_certificates(vcek)[0].public_bytes(Encoding.DER),
            "ASK": ask.public_bytes(Encoding.DER),
            "ARK": ark.public_bytes(Encoding.DER),
        }
    )
    (tmp_path / "auxblob").write_bytes(table + bytes(512))
    args = ["attest", "verify", str(root / "snp/genoa_v3_msft_report.bin"), "--at", AT]
    assert main([*args, "--certs", str(tmp_path / "auxblob")]) == 0


def test_unusable_input_exit_2(
    attestation_testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = (attestation_testdata / "snp/turin_v5_msft_report.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(report[:500])
    vcek = str(attestation_testdata / "snp/turin_v5_msft_vcek.pem")
    assert main(["attest", "verify", str(tmp_path / "cut.bin"), "--certs", vcek]) == 2
    assert capsys.readouterr().err.strip() == (
        "cvmctl: error: SNP report: field 'launch_tcb' at offset 0x1f0 (8 bytes) is truncated: "
        "the input ends at 0x1f4"
    )
    assert main(["attest", "verify", str(attestation_testdata / "snp/turin_v5_msft_report.bin")]) == 2
    assert "pass --certs" in capsys.readouterr().err
    assert main(["attest", "show", str(tmp_path / "missing.bin")]) == 2
    assert "cannot read evidence" in capsys.readouterr().err
    (tmp_path / "junk").write_bytes(b"\xff" * 64)
    assert main(["attest", "show", str(tmp_path / "junk")]) == 2
    assert (
        "starts ffffffffffffffff, which is not an SNP report, TDX quote or TDREPORT"
        in capsys.readouterr().err
    )
    assert (
        main(["attest", "verify", str(attestation_testdata / TDX_QUOTE_NAMES[0]), "--at", "yesterday"]) == 2
    )
    (tmp_path / "notcert").write_bytes(b"hello")
    assert main(["attest", "verify", str(tmp_path / "cut.bin"), "--certs", str(tmp_path / "notcert")]) == 2


def test_tdreport_cannot_be_verified_off_platform(
    attestation_testdata: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["attest", "verify", str(attestation_testdata / "tdx/tdreport_guestcomponents.bin")]) == 1
    assert "rejected: mac: a TDREPORT's MAC is keyed to the CPU" in capsys.readouterr().out


def test_show_detects_each_kind(attestation_testdata: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kinds = {
        "snp/milan_v2_virtee_report.hex": "sev-snp-report",
        "tdx/quote_v4_spr_e4_gotdxguest.dat": "tdx-quote",
        "tdx/tdreport_guestcomponents.bin": "tdx-tdreport",
    }
    for name, kind in kinds.items():
        assert main(["attest", "show", str(attestation_testdata / name), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["type"] == kind
    assert main(["attest", "show", str(attestation_testdata / "snp/turin_v5_msft_report.bin")]) == 0
    out = capsys.readouterr().out
    assert "reported_tcb.fmc" in out
    assert "product                   Turin" in out


def test_verify_fetches_the_vcek_from_kds(
    attestation_testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--kds --kds-url URL: the VCEK and chain come from a KDS-layout server (on loopback), then the cache."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from cryptography.hazmat.primitives.serialization import Encoding

    from cvmattest.kds import vcek_path
    from cvmattest.snp import Product, parse_snp_report

    root = attestation_testdata
    report = parse_snp_report((root / "snp/genoa_v3_msft_report.bin").read_bytes())
    site = tmp_path / "site"
    vcek_file = site / vcek_path(Product.GENOA, report.chip_id, report.reported_tcb).lstrip("/").split("?")[0]
    vcek_file.parent.mkdir(parents=True)
    vcek_file.write_bytes(
        load_certificates((root / "snp/genoa_v3_msft_vcek.pem").read_bytes())[0].public_bytes(Encoding.DER)
    )
    (site / "vcek/v1/Genoa/cert_chain").write_bytes((root / "snp/ask_ark_genoa.pem").read_bytes())

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        args = ["attest", "verify", str(root / "snp/genoa_v3_msft_report.bin"), "--at", AT]
        cache = ["--kds-cache", str(tmp_path / "cache")]
        assert main([*args, "--kds", "--kds-url", url, *cache]) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert main([*args, "--kds", "--kds-url", url, *cache]) == 0  # the server is gone: the cache answers
    assert capsys.readouterr().out.splitlines()[-1] == "sev-snp-report: verified (13 checks)"


def test_show_tdx_quote_includes_pck_platform(
    attestation_testdata: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["attest", "show", str(attestation_testdata / "tdx/quote_v5_tdx15_gotdxguest.dat"), "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["pck"]["fmspc"] == "90c06f000000"
    assert data["pck_chain"] == [
        "Intel SGX PCK Certificate",
        "Intel SGX PCK Platform CA",
        "Intel SGX Root CA",
    ]
    assert data["body"]["mr_servicetd"] == "00" * 48


def test_flags_before_the_file_do_not_swallow_it(
    attestation_testdata: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--certs PATH FILE` and `--kds FILE`: FILE stays the evidence (one value per flag)."""
    root = attestation_testdata
    report = str(root / "snp/genoa_v3_msft_report.bin")
    vcek = str(root / "snp/genoa_v3_msft_vcek.pem")
    assert main(["attest", "verify", "--at", AT, "--certs", vcek, report]) == 0
    capsys.readouterr()
    # --kds is a switch: the report is still the positional FILE (the VCEK in --certs wins)
    assert main(["attest", "verify", "--at", AT, "--certs", vcek, "--kds", report]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("sev-snp-report: verified")
