"""The KDS client against a real HTTP server on 127.0.0.1 serving the KDS URL layout."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from cvmattest.certs import load_certificates
from cvmattest.kds import KdsClient, KdsError, retry_after_seconds, vcek_path
from cvmattest.snp import Product, parse_snp_report
from cvmattest.verify_snp import verify_snp_report
from cvmcore.errors import ConnectError, UsageError
from tests.attestation.local_http import QuietHandler, serving


@dataclass
class FakeKds:
    """What the server serves: path -> body, and per path a script of failures to give first."""

    documents: dict[str, bytes] = field(default_factory=dict)
    failures: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def kds() -> Iterator[FakeKds]:
    state = FakeKds()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            script = state.failures.get(self.path)
            if script:
                status, headers = script.pop(0)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = state.documents.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving(Handler) as url:
        state.url = url
        yield state


def _client(kds: FakeKds, tmp_path: Path, waits: list[float]) -> KdsClient:
    return KdsClient(base_url=kds.url, cache_dir=tmp_path / "cache", sleep=waits.append, max_attempts=4)


def _serve_turin(kds: FakeKds, root: Path) -> tuple[bytes, str]:
    report = parse_snp_report((root / "snp/turin_v5_msft_report.bin").read_bytes())
    vcek = load_certificates((root / "snp/turin_v5_msft_vcek.pem").read_bytes())[0].public_bytes(Encoding.DER)
    assert report.product is not None
    path = vcek_path(report.product, report.chip_id, report.reported_tcb)
    kds.documents[path] = vcek
    kds.documents["/vcek/v1/Turin/cert_chain"] = (root / "snp/ask_ark_turin.pem").read_bytes()
    return vcek, path


def test_vcek_url_layout(attestation_testdata: Path) -> None:
    turin = parse_snp_report((attestation_testdata / "snp/turin_v5_msft_report.bin").read_bytes())
    assert turin.product is not None
    assert vcek_path(turin.product, turin.chip_id, turin.reported_tcb) == (
        "/vcek/v1/Turin/59790fb1c39f35c1?blSPL=1&teeSPL=1&snpSPL=4&ucodeSPL=81&fmcSPL=1"
    )
    genoa = parse_snp_report((attestation_testdata / "snp/genoa_v3_msft_report.bin").read_bytes())
    assert genoa.product is not None
    assert vcek_path(genoa.product, genoa.chip_id, genoa.reported_tcb) == (
        f"/vcek/v1/Genoa/{genoa.chip_id.hex()}?blSPL=10&teeSPL=0&snpSPL=23&ucodeSPL=84"
    )


def test_fetch_verify_and_cache(attestation_testdata: Path, kds: FakeKds, tmp_path: Path) -> None:
    vcek, path = _serve_turin(kds, attestation_testdata)
    waits: list[float] = []
    client = _client(kds, tmp_path, waits)
    report = parse_snp_report((attestation_testdata / "snp/turin_v5_msft_report.bin").read_bytes())
    assert client.vcek_for_report(report) == vcek
    chain = client.cert_chain(report.product or pytest.fail("no product"))
    certificates = load_certificates(vcek) + load_certificates(chain)
    assert verify_snp_report(report, certificates, at=datetime(2026, 11, 26, tzinfo=UTC)).verified
    assert kds.requests == [path, "/vcek/v1/Turin/cert_chain"]

    # a second client with the same cache asks nothing
    again = _client(kds, tmp_path, waits)
    assert again.vcek_for_report(report) == vcek
    assert again.cert_chain(Product.TURIN) == chain
    assert again.requests_made == 0 and len(kds.requests) == 2
    cached = tmp_path / "cache/vcek/Turin/59790fb1c39f35c1/5100000004010101.der"
    assert cached.read_bytes() == vcek
    assert waits == []


def test_429_honours_retry_after_then_succeeds(
    attestation_testdata: Path, kds: FakeKds, tmp_path: Path
) -> None:
    vcek, path = _serve_turin(kds, attestation_testdata)
    kds.failures[path] = [(429, {"Retry-After": "7"}), (503, {}), (502, {"Retry-After": "2"})]
    waits: list[float] = []
    client = _client(kds, tmp_path, waits)
    report = parse_snp_report((attestation_testdata / "snp/turin_v5_msft_report.bin").read_bytes())
    assert client.vcek_for_report(report) == vcek
    # Retry-After 7 s; then no header: the backoff (doubled once, to 2 s); then Retry-After 2 s
    assert waits == [7.0, 2.0, 2.0]
    assert kds.requests == [path] * 4


def test_gives_up_after_max_attempts(attestation_testdata: Path, kds: FakeKds, tmp_path: Path) -> None:
    _, path = _serve_turin(kds, attestation_testdata)
    kds.failures[path] = [(500, {})] * 10
    waits: list[float] = []
    report = parse_snp_report((attestation_testdata / "snp/turin_v5_msft_report.bin").read_bytes())
    with pytest.raises(KdsError, match=r"answered 500 .* 4 times; giving up") as info:
        _client(kds, tmp_path, waits).vcek_for_report(report)
    assert info.value.status == 500
    assert waits == [1.0, 2.0, 4.0]
    assert not (tmp_path / "cache/vcek").exists()


def test_retry_after_too_long_fails_fast(attestation_testdata: Path, kds: FakeKds, tmp_path: Path) -> None:
    _, path = _serve_turin(kds, attestation_testdata)
    kds.failures[path] = [(429, {"Retry-After": "3600"})]
    waits: list[float] = []
    report = parse_snp_report((attestation_testdata / "snp/turin_v5_msft_report.bin").read_bytes())
    with pytest.raises(KdsError, match="retry after 3600 s"):
        _client(kds, tmp_path, waits).vcek_for_report(report)
    assert waits == []


def test_404_is_not_retried(attestation_testdata: Path, kds: FakeKds, tmp_path: Path) -> None:
    waits: list[float] = []
    report = parse_snp_report((attestation_testdata / "snp/genoa_v3_msft_report.bin").read_bytes())
    with pytest.raises(KdsError, match="answered 404"):
        _client(kds, tmp_path, waits).vcek_for_report(report)
    assert len(kds.requests) == 1 and waits == []


def test_real_sleep_with_retry_after_zero(attestation_testdata: Path, kds: FakeKds, tmp_path: Path) -> None:
    vcek, path = _serve_turin(kds, attestation_testdata)
    kds.failures[path] = [(429, {"Retry-After": "0"})]
    client = KdsClient(base_url=kds.url)  # real time.sleep, no cache
    report = parse_snp_report((attestation_testdata / "snp/turin_v5_msft_report.bin").read_bytes())
    assert client.vcek_for_report(report) == vcek
    assert client.requests_made == 2


def test_garbage_is_not_cached(attestation_testdata: Path, kds: FakeKds, tmp_path: Path) -> None:
    _, path = _serve_turin(kds, attestation_testdata)
    kds.documents[path] = b"<html>maintenance</html>"
    report = parse_snp_report((attestation_testdata / "snp/turin_v5_msft_report.bin").read_bytes())
    with pytest.raises(UsageError, match="VCEK from KDS: not a certificate"):
        _client(kds, tmp_path, []).vcek_for_report(report)
    assert not (tmp_path / "cache/vcek").exists()


def test_unreachable_kds_is_a_connect_error(tmp_path: Path, attestation_testdata: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    waits: list[float] = []
    client = KdsClient(base_url=f"http://127.0.0.1:{port}", sleep=waits.append, max_attempts=2)
    report = parse_snp_report((attestation_testdata / "snp/genoa_v3_msft_report.bin").read_bytes())
    with pytest.raises(ConnectError, match="cannot reach KDS"):
        client.vcek_for_report(report)
    assert waits == [1.0]


def test_masked_chip_id_and_v2_need_help(attestation_testdata: Path) -> None:
    client = KdsClient(base_url="http://127.0.0.1:9")
    vlek = parse_snp_report((attestation_testdata / "snp/milan_v3_vlek_aws_report.bin").read_bytes())
    with pytest.raises(UsageError, match="chip_id is masked"):
        client.vcek_for_report(vlek)
    v2 = parse_snp_report((attestation_testdata / "snp/milan_v2_gosevguest_report.bin").read_bytes())
    with pytest.raises(UsageError, match="does not name its product"):
        client.vcek_for_report(v2)


def test_retry_after_http_date() -> None:
    now = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("Thu, 26 Nov 2026 10:00:30 GMT", now) == 30.0
    assert retry_after_seconds("12", now) == 12.0
    assert retry_after_seconds("soon", now) is None
