"""``cvmctl attest``: decode and verify attestation evidence offline.

``show FILE`` prints every decoded field of an SNP report, TDX quote or TDREPORT (the kind
is told from the bytes; ASCII-hex files are accepted). ``verify FILE`` runs every check
and exits 0 when the evidence verified, 1 when it was rejected (the first failed check is
named on the last line) and 2 when the input is unusable (unreadable, malformed, or
missing what verification needs, such as the VCEK).

Revocation and TCB status: ``--crl FILE`` (or ``--kds``) checks AMD's CRL for an SNP
report; ``--collateral FILE`` (or ``--pcs``) evaluates a TDX quote's platform against
Intel's TCB Info, QE identity and CRLs and prints ``TCB status: ...; advisory IDs: ...``.
``--at`` fixes the verification time, which collateral and CRLs are checked against.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from cvmattest.binary import MalformedEvidence
from cvmattest.certs import (
    CertificateError,
    classify_amd_certificates,
    common_name,
    load_certificate,
    load_certificate_file,
    load_certificates,
    load_crl,
    read_amd_key_certificate,
)
from cvmattest.detect import TEES, ParsedEvidence, parse_evidence
from cvmattest.intel_tcb import TCB_STATUSES, Collateral, parse_collateral
from cvmattest.kds import DEFAULT_KDS_URL, KdsClient
from cvmattest.pcs import DEFAULT_PCS_URL, PCK_CA_NAMES, PcsClient
from cvmattest.result import CheckStatus, VerificationResult
from cvmattest.sgx_pck import read_pck_platform
from cvmattest.snp import Product, SnpReport
from cvmattest.tdx import TdxQuote
from cvmattest.verify import verify_evidence
from cvmattest.verify_tdx import DEFAULT_ACCEPTED_TCB
from cvmcore.defaults import cache_dir
from cvmcore.durable import write_durably
from cvmcore.errors import ConnectError, RemoteError, UsageError
from cvmctl.cli.args import add_connection_arguments, parse_time
from cvmctl.cli.output import print_table

STATUS_MARKS = {CheckStatus.PASSED: "ok", CheckStatus.FAILED: "FAILED", CheckStatus.SKIPPED: "skipped"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "attest",
        help="decode and verify SEV-SNP / TDX attestation evidence",
        description="Decode and verify attestation evidence (SEV-SNP reports, TDX quotes, TDREPORTs).",
    )
    commands = parser.add_subparsers(title="attest commands", metavar="COMMAND", required=True)

    show = commands.add_parser(
        "show",
        help="print the decoded fields of a report or quote",
        description="Print every field of an SNP report, TDX quote or TDREPORT (the kind is detected).",
    )
    show.add_argument("file", type=Path, metavar="FILE", help="the evidence: binary, or ASCII hex")
    show.add_argument("--tee", choices=TEES, help="the TEE, if detection should not decide")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=run_show)

    fetch = commands.add_parser(
        "fetch",
        help="ask a guest agent for evidence bound to your nonce",
        description=(
            "Ask the agent in a confidential VM for an SNP report or TDX quote whose report data is "
            "NONCE (64 bytes, as 128 hex digits; shorter values are zero-padded). Writes the evidence "
            "to -o and, for SNP, the host's certificate table to --certs-out when the host supplies one. "
            "Verify the result with: cvmctl attest verify FILE --nonce HEX [--certs CERTS]"
        ),
    )
    add_connection_arguments(fetch, timeout=30.0)
    fetch.add_argument("--nonce", required=True, metavar="HEX", help="up to 64 bytes in hex")
    fetch.add_argument(
        "-o", "--output", required=True, type=Path, metavar="FILE", help="where the evidence goes"
    )
    fetch.add_argument("--certs-out", type=Path, metavar="FILE", help="where the certificate table goes")
    fetch.add_argument(
        "--vmpl", type=int, choices=range(4), metavar="0-3", help="SEV-SNP: the VMPL to ask at"
    )
    fetch.add_argument(
        "--interface",
        choices=("auto", "configfs-tsm", "sev-guest", "tdx-guest"),
        default="auto",
        help="the guest kernel interface (default: auto)",
    )
    fetch.add_argument("--json", action="store_true", help="print what was fetched as JSON")
    fetch.set_defaults(func=run_fetch)

    verify = commands.add_parser(
        "verify",
        help="verify a report or quote; exit 0 verified, 1 rejected, 2 unusable input",
        description=(
            "Verify evidence against AMD's / Intel's roots pinned in cvmctl. SEV-SNP needs the VCEK or VLEK "
            "(--certs; ASK/ASVK come from cvmctl if not given). TDX quotes carry their PCK chain. "
            "Exit status: 0 verified, 1 rejected (the failed check is named), 2 unusable input."
        ),
    )
    verify.add_argument("file", type=Path, metavar="FILE", help="the evidence: binary, or ASCII hex")
    verify.add_argument("--tee", choices=TEES, help="the TEE, if detection should not decide")
    # One value per flag (repeat the flag for more): a flag taking several values, or an
    # optional one, would swallow the FILE that follows it (`--certs a.pem report.bin`).
    verify.add_argument(
        "--certs",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="certificates: a PEM bundle, a DER file or an SNP certificate table (auxblob); repeatable",
    )
    verify.add_argument(
        "--kds",
        action="store_true",
        help="SNP: fetch the VCEK and its chain from AMD's KDS when --certs has no VCEK",
    )
    verify.add_argument(
        "--kds-url",
        default=DEFAULT_KDS_URL,
        metavar="URL",
        help="the KDS to ask with --kds (default: %(default)s)",
    )
    verify.add_argument(
        "--kds-cache",
        type=Path,
        metavar="DIR",
        help="where fetched certificates are kept (default: $XDG_CACHE_HOME/cvmctl/kds)",
    )
    verify.add_argument(
        "--product",
        choices=[p.value for p in Product],
        help="SNP: the product of a version-2 report, for --kds (v3+ reports name it themselves)",
    )
    verify.add_argument(
        "--at",
        metavar="ISO-8601",
        help="verify as of this time (default: now; a time without zone is UTC), e.g. 2025-06-01T00:00:00Z",
    )
    verify.add_argument(
        "--nonce", metavar="HEX", help="require report data equal to this (zero-padded to 64 bytes)"
    )
    verify.add_argument(
        "--measurement",
        metavar="HEX",
        action="append",
        help="allowed launch measurement (SNP) or MRTD (TDX); repeat for several",
    )
    verify.add_argument(
        "--min-tcb",
        metavar="NAME=SPL",
        action="append",
        help="SNP: minimum SPL of a reported_tcb component (bootloader, tee, snp, microcode, fmc)",
    )
    verify.add_argument(
        "--crl",
        type=Path,
        metavar="FILE",
        help="SNP: AMD's CRL for the product (DER or PEM, as KDS serves it at /vcek/v1/PRODUCT/crl), "
        "to check offline that the ASK/ASVK is not revoked; --kds fetches it (cached) otherwise",
    )
    verify.add_argument(
        "--collateral",
        type=Path,
        metavar="FILE",
        help="TDX: Intel's collateral (TCB Info, QE identity, PCK and Root CA CRLs) as one JSON file in "
        "dcap-qvl's QuoteCollateralV3 layout, to evaluate the platform's TCB status offline",
    )
    verify.add_argument(
        "--pcs",
        action="store_true",
        help="TDX: fetch the collateral from Intel PCS (cached until it expires) and evaluate the TCB status",
    )
    verify.add_argument(
        "--pcs-url",
        default=DEFAULT_PCS_URL,
        metavar="URL",
        help="the PCS to ask with --pcs (default: %(default)s)",
    )
    verify.add_argument(
        "--pcs-cache",
        type=Path,
        metavar="DIR",
        help="where fetched collateral is kept (default: $XDG_CACHE_HOME/cvmctl/pcs)",
    )
    verify.add_argument(
        "--accept-tcb",
        action="append",
        choices=[status for status in TCB_STATUSES if status not in ("UpToDate", "Revoked")],
        metavar="STATUS",
        help="TDX: also accept this TCB status (UpToDate always passes, Revoked never); repeatable. One of "
        + ", ".join(status for status in TCB_STATUSES if status not in ("UpToDate", "Revoked")),
    )
    verify.add_argument("--forbid-debug", action="store_true", help="reject evidence from a debuggable guest")
    verify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verify.set_defaults(func=run_verify)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def load_evidence(path: Path, tee: str | None) -> ParsedEvidence:
    return parse_evidence(_read(path, "evidence"), tee)


def parse_hex(text: str, option: str) -> bytes:
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError as exc:
        raise UsageError(f"{option} {text!r} is not hex") from exc


def parse_min_tcb(items: list[str] | None) -> dict[str, int]:
    minimum: dict[str, int] = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if not value.isdigit() or name not in ("bootloader", "tee", "snp", "microcode", "fmc"):
            raise UsageError(
                f"--min-tcb {item!r}: expected NAME=SPL with NAME bootloader, tee, snp, microcode or fmc"
            )
        minimum[name] = int(value)
    return minimum


def _evidence_rows(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.extend(_evidence_rows(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            rows.append((prefix + key, ", ".join(map(str, value)) or "-"))
        else:
            rows.append((prefix + key, "-" if value is None else str(value)))
    return rows


def run_show(args: argparse.Namespace) -> int:
    evidence = load_evidence(args.file, args.tee)
    data = evidence.to_dict()
    if isinstance(evidence, TdxQuote):
        # The chain is the quote's last part and nothing the quote's signature covers: a chain
        # that does not parse is shown as such, with every field of the quote still printed.
        try:
            chain = load_certificates(evidence.pck_chain_pem, "the quote's PCK chain")
            data["pck_chain"] = [common_name(cert) for cert in chain]
            if chain:
                data["pck"] = read_pck_platform(chain[0]).to_dict()
        except (CertificateError, MalformedEvidence) as exc:
            data["pck_chain"] = f"unparseable: {exc}"
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_table(_evidence_rows(data))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    if not args.kds:
        # Options that only mean something with --kds must not be silently dropped.
        given = [
            flag for flag, value in (("--kds-cache", args.kds_cache), ("--product", args.product)) if value
        ]
        if args.kds_url != DEFAULT_KDS_URL:
            given.insert(0, "--kds-url")
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(f"{', '.join(given)} {verb} only with --kds (fetch the VCEK from AMD's KDS)")
    if not args.pcs and (args.pcs_cache or args.pcs_url != DEFAULT_PCS_URL):
        raise UsageError(
            "--pcs-url and --pcs-cache apply only with --pcs (fetch the collateral from Intel PCS)"
        )
    if args.pcs and args.collateral:
        raise UsageError("give the collateral as a file (--collateral) or fetch it (--pcs), not both")
    evidence = load_evidence(args.file, args.tee)
    certificates: list[x509.Certificate] = []
    for path in args.certs:
        certificates += load_certificate_file(_read(path, "certificate file"), str(path))
    if isinstance(evidence, SnpReport):
        certificates += [
            load_certificate(entry.data, f"{args.file} ({entry.kind} entry of its certificate table)")
            for entry in evidence.certificate_table
            if entry.kind != "unknown"
        ]
    if isinstance(evidence, SnpReport) and args.kds and not classify_amd_certificates(certificates)[0]:
        certificates += fetch_from_kds(evidence, args)
    if isinstance(evidence, SnpReport) and not certificates:
        raise UsageError(
            "an SNP report is verified with its VCEK or VLEK: pass --certs FILE "
            "(from the extended report or the host) or fetch it with --kds"
        )
    at = parse_time(args.at)
    crl, crl_unavailable = None, None
    if args.crl is not None:
        crl = load_crl(_read(args.crl, "CRL"), str(args.crl))
    elif isinstance(evidence, SnpReport) and args.kds:
        crl, crl_unavailable = fetch_crl_from_kds(evidence, certificates, args, at)
    collateral = None
    if args.collateral is not None:
        collateral = parse_collateral(_read(args.collateral, "collateral"))
    elif args.pcs:
        collateral = fetch_from_pcs(evidence, args, at)
    result = verify_evidence(
        evidence,
        certificates,
        at=at,
        nonce=None if args.nonce is None else parse_hex(args.nonce, "--nonce"),
        allowed_measurements=(
            None
            if not args.measurement
            else frozenset(parse_hex(m, "--measurement") for m in args.measurement)
        ),
        forbid_debug=args.forbid_debug,
        minimum_tcb=parse_min_tcb(args.min_tcb),
        collateral=collateral,
        accepted_tcb=DEFAULT_ACCEPTED_TCB | frozenset(args.accept_tcb or ()),
        crl=crl,
        crl_unavailable=crl_unavailable,
    )
    print_result(result, as_json=args.json)
    return 0 if result.verified else 1


def default_kds_cache() -> Path:
    return cache_dir("kds")


def fetch_from_kds(report: SnpReport, args: argparse.Namespace) -> list[x509.Certificate]:
    """The VCEK and its chain for ``report`` from KDS (or the cache)."""
    product = report.product or (Product(args.product) if args.product else None)
    client = KdsClient(base_url=args.kds_url, cache_dir=args.kds_cache or default_kds_cache())
    vcek = client.vcek_for_report(report, product)
    assert product is not None  # vcek_for_report refuses a report without one
    chain = client.cert_chain(product)
    return load_certificates(vcek, "VCEK from KDS") + load_certificates(chain, "cert_chain from KDS")


def fetch_crl_from_kds(
    report: SnpReport, certificates: list[x509.Certificate], args: argparse.Namespace, at: datetime
) -> tuple[x509.CertificateRevocationList | None, str | None]:
    """AMD's CRL for the report's product from KDS (or the cache); if KDS cannot give it, why not."""
    leaves = classify_amd_certificates(certificates)[0]
    product = report.product or (Product(args.product) if args.product else None)
    if product is None and leaves:
        product = read_amd_key_certificate(leaves[0]).product
    if product is None:
        return None, "the product is unknown (a version-2 report): say --product to fetch its CRL"
    client = KdsClient(base_url=args.kds_url, cache_dir=args.kds_cache or default_kds_cache())
    try:
        der = client.crl(product, at)
    except (RemoteError, ConnectError) as exc:
        return None, f"AMD's CRL could not be fetched, so revocation was not checked: {exc}"
    return load_crl(der, "CRL from KDS"), None


def fetch_from_pcs(evidence: ParsedEvidence, args: argparse.Namespace, at: datetime) -> Collateral:
    """The collateral for a TDX quote's platform type and PCK CA, from PCS or the cache."""
    if not isinstance(evidence, TdxQuote):
        raise UsageError("--pcs applies to TDX quotes only")
    chain = load_certificates(evidence.pck_chain_pem, "the quote's PCK chain")
    if len(chain) < 2:
        raise UsageError("the quote's PCK chain has no CA certificate: the PCK CRL to fetch is unknown")
    ca = PCK_CA_NAMES.get(common_name(chain[1]))
    if ca is None:
        raise UsageError(f"the PCK was issued by {common_name(chain[1])!r}, which PCS publishes no CRL for")
    client = PcsClient(base_url=args.pcs_url, cache_dir=args.pcs_cache or cache_dir("pcs"))
    return parse_collateral(client.collateral(read_pck_platform(chain[0]).fmspc, ca, at))


def print_result(result: VerificationResult, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print_table([(check.name, f"{STATUS_MARKS[check.status]:<7}  {check.detail}") for check in result.checks])
    tcb = result.details.get("tcb")
    if tcb is not None:
        advisories = ", ".join(tcb["advisory_ids"]) or "none"
        print(f"TCB status: {tcb['status'] or 'not supported'}; advisory IDs: {advisories}")
    print(f"{result.evidence_type}: {result.summary()}")


def nonce_from_hex(text: str) -> bytes:
    """64 bytes of report data from hex; shorter values are zero-padded as verify compares them."""
    cleaned = text.strip().removeprefix("0x")
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raise UsageError(f"--nonce {text[:20]!r}... is not hexadecimal") from None
    if len(raw) > 64:
        raise UsageError(f"--nonce is {len(raw)} bytes; the report data holds 64 (hash longer values)")
    return raw.ljust(64, b"\0")


def run_fetch(args: argparse.Namespace) -> int:
    import trio

    from cvm.v1 import agent_pb2, agent_pb2_grpc
    from cvmcore.address import parse_address
    from cvmcore.client import connect

    address = parse_address(args.connect)
    request = agent_pb2.GetAttestationReportRequest(
        report_data=nonce_from_hex(args.nonce), interface=args.interface
    )
    if args.vmpl is not None:
        request.vmpl = args.vmpl

    async def ask() -> agent_pb2.GetAttestationReportResponse:
        async with connect(address, timeout=args.timeout) as client:
            stub = agent_pb2_grpc.GuestAgentStub(client.channel)
            response: agent_pb2.GetAttestationReportResponse = await client.call(
                stub.GetAttestationReport, request
            )
            return response

    response = trio.run(ask)
    _write_atomically(args.output, response.evidence)
    written = [str(args.output)]
    if response.certificates and args.certs_out is not None:
        _write_atomically(args.certs_out, response.certificates)
        written.append(str(args.certs_out))
    steps = {step.name: step.seconds for step in response.steps}
    if args.json:
        print(
            json.dumps(
                {
                    "interface": response.interface,
                    "evidence_kind": response.evidence_kind,
                    "evidence_bytes": len(response.evidence),
                    "certificate_bytes": len(response.certificates),
                    "files": written,
                    "steps_seconds": steps,
                },
                indent=2,
                sort_keys=True,
            )
        )
    else:
        rows = [
            (
                "evidence",
                f"{response.evidence_kind} via {response.interface}, {len(response.evidence)} bytes",
            ),
            ("written", ", ".join(written)),
        ]
        if response.certificates and args.certs_out is None:
            rows.append(("certificates", f"{len(response.certificates)} bytes not saved (use --certs-out)"))
        rows += [(f"step {name}", f"{seconds * 1e3:.3f} ms") for name, seconds in steps.items()]
        print_table(rows)
    return 0


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        write_durably(path, data, mode=0o644, make_parents=False)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
