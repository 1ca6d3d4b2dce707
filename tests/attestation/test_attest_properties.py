"""Property-based tests: every evidence parser raises its documented error and nothing else.

Hostile input reaches these parsers from a host (an SNP report and its certificate table, a
TDX quote, a TDREPORT) or from the network (Intel's collateral, AMD's CRL). Each parser
promises one error type: :class:`MalformedEvidence` for evidence, :class:`CollateralError`
for collateral, :class:`CertificateError` for certificates and CRLs. Hypothesis feeds them
random bytes and, more usefully, real vectors with bytes flipped, cut, spliced and length
fields rewritten, and real collateral with values swapped for arbitrary JSON. The example
counts keep the whole file CI-sized (about 5 s of CPU); ``derandomize`` makes every run
use the same inputs, so a failure reproduces.
"""

from __future__ import annotations

import contextlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmattest.binary import MalformedEvidence
from cvmattest.certs import CertificateError, load_certificate_file, load_crl
from cvmattest.detect import parse_evidence
from cvmattest.intel_tcb import CollateralError, parse_collateral, parse_qe_identity, parse_tcb_info
from cvmattest.pcs import signed_member
from cvmattest.snp import build_cert_table, parse_cert_table, parse_snp_attestation, parse_snp_report
from cvmattest.tdx import parse_tdreport, parse_tdx_quote
from tests.conftest import ATTESTATION_FIXTURES

PROFILE = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # CI runs the same inputs every time; a failure reproduces
    database=None,  # nothing written into the tree
)


@cache
def _vector(name: str) -> bytes:
    data = (ATTESTATION_FIXTURES / name).read_bytes()
    return bytes.fromhex(data.decode().removeprefix("0x")) if name.endswith(".hex") else data


SNP = [
    "snp/milan_v3_msft_report.bin",
    "snp/milan_v2_gosevguest_report.bin",
    "snp/turin_v5_msft_report.bin",
    "snp/milan_v3_vlek_aws_report.bin",
]
TDX = [
    "tdx/quote_v4_trustee.dat",
    "tdx/quote_v5_tdx15_gotdxguest.dat",
    "tdx/quote_v4_dcapqvl_near.hex",
]


@st.composite
def mutated(draw: st.DrawFn, names: list[str]) -> bytes:
    """A real vector with a few bytes overwritten, then maybe cut short or extended."""
    data = bytearray(_vector(draw(st.sampled_from(names))))
    for _ in range(draw(st.integers(0, 8))):
        offset = draw(st.integers(0, len(data) - 1))
        width = draw(st.sampled_from([1, 2, 4]))
        data[offset : offset + width] = draw(st.binary(min_size=width, max_size=width))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=64))


@PROFILE
@given(st.one_of(st.binary(max_size=2048), mutated(SNP), mutated(TDX)))
def test_parse_evidence_raises_only_malformed_evidence(data: bytes) -> None:
    for tee in (None, "sev-snp", "tdx"):
        with contextlib.suppress(MalformedEvidence):
            parse_evidence(data, tee)


@PROFILE
@given(mutated(SNP))
def test_snp_parsers_raise_only_malformed_evidence(data: bytes) -> None:
    for parse in (parse_snp_report, parse_snp_attestation):
        try:
            report = parse(data)
        except MalformedEvidence:
            continue
        report.to_dict()  # a parsed report can always be shown


@PROFILE
@given(mutated(TDX))
def test_tdx_quote_parser_raises_only_malformed_evidence(data: bytes) -> None:
    try:
        quote = parse_tdx_quote(data)
    except MalformedEvidence:
        return
    quote.to_dict()


@PROFILE
@given(st.one_of(mutated(["tdx/tdreport_guestcomponents.bin"]), st.binary(min_size=1000, max_size=1100)))
def test_tdreport_parser_raises_only_malformed_evidence(data: bytes) -> None:
    with contextlib.suppress(MalformedEvidence):
        parse_tdreport(data).to_dict()


@st.composite
def cert_tables(draw: st.DrawFn) -> bytes:
    """Well-formed tables with fields then overwritten, and raw bytes."""
    entries = draw(
        st.dictionaries(st.sampled_from(["VCEK", "VLEK", "ASK", "ARK"]), st.binary(max_size=40), max_size=4)
    )
    table = bytearray(build_cert_table(entries))
    for _ in range(draw(st.integers(0, 6))):
        offset = draw(st.integers(0, len(table) - 1))
        table[offset : offset + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(table) + draw(st.binary(max_size=32))


@PROFILE
@given(st.one_of(cert_tables(), st.binary(max_size=512)))
def test_cert_table_parser_raises_only_malformed_evidence(data: bytes) -> None:
    try:
        entries = parse_cert_table(data)
    except MalformedEvidence:
        return
    assert all(entry.offset + len(entry.data) <= len(data) for entry in entries)


@PROFILE
@given(st.one_of(cert_tables(), st.binary(max_size=512)))
def test_certificate_files_raise_only_certificate_error(data: bytes) -> None:
    with contextlib.suppress(CertificateError):
        load_certificate_file(data, "fuzz")
    with contextlib.suppress(CertificateError):
        load_crl(data, "fuzz")


# -- collateral JSON ----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _collateral() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (ATTESTATION_FIXTURES / "tdx/collateral_fmspc_20a06f000000_dcapqvl.json").read_bytes()
    )
    return data


def _swap(document: Any, path: list[int], value: Any) -> Any:
    """``document`` with the element reached by ``path`` (indices into keys/items) replaced."""
    if not path or not isinstance(document, dict | list) or not document:
        return value
    keys = list(document) if isinstance(document, dict) else list(range(len(document)))
    key = keys[path[0] % len(keys)]
    copy: Any = dict(document) if isinstance(document, dict) else list(document)
    copy[key] = _swap(document[key], path[1:], value)
    return copy


@PROFILE
@given(st.sampled_from(["tcb_info", "qe_identity"]), st.lists(st.integers(0, 40), max_size=5), JSON_VALUES)
def test_signed_documents_raise_only_collateral_error(which: str, path: list[int], value: Any) -> None:
    document = json.loads(_collateral()[which])
    text = json.dumps(_swap(document, path, value)).encode()
    parse = parse_tcb_info if which == "tcb_info" else parse_qe_identity
    with contextlib.suppress(CollateralError):
        parse(text)


@PROFILE
@given(
    st.sampled_from(sorted(_collateral())),
    st.one_of(JSON_VALUES, st.text(alphabet="0123456789abcdef", max_size=200)),
)
def test_collateral_raises_only_collateral_error(key: str, value: Any) -> None:
    with contextlib.suppress(CollateralError):
        parse_collateral(json.dumps({**_collateral(), key: value}).encode())


@PROFILE
@given(st.one_of(st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_raw_collateral_and_pcs_bodies_raise_only_collateral_error(data: bytes) -> None:
    with contextlib.suppress(CollateralError):
        parse_collateral(data)
    for key in ("tcbInfo", "enclaveIdentity"):
        try:
            text, _signature = signed_member(data, key)
        except CollateralError:
            continue
        assert json.loads(text) == json.loads(data)[key]


def test_the_real_vectors_are_in_place() -> None:
    """The strategies build on these; a missing one would make the properties vacuous."""
    for name in [*SNP, *TDX]:
        assert Path(ATTESTATION_FIXTURES / name).is_file()
