"""Attested results: a stored run bound to the confidential guest that measured it.

At the end of a run (``cvmctl bench`` or ``cvmctl study``) :func:`attest_run` rebuilds the
run's canonical record from the store (:mod:`workloads.record`), takes its SHA-512 - exactly
the 64 bytes of REPORT_DATA - and asks each arm's guest for evidence over it:

- a VM target asks its agent (``GetAttestationReport``, :func:`agent_evidence`);
- the ``local`` target, when cvmctl itself runs inside a confidential guest, asks the
  kernel here (:func:`local_evidence`, the agent's own fetch code, with an injectable root
  so that tests can hand it a fake guest device tree).

The answer is stored in the run's ``metadata["attestation"]``::

    {"algorithm": "sha512", "digest": "<hex>", "arms": {"B": {"status": "attested",
     "tee": "sev-snp", "kind": "sev-snp-report", "interface": "configfs-tsm",
     "evidence": "<hex>", "certificates": "<hex or null>"}, "A": {"status": "not attested",
     "reason": "the guest is not confidential (tee none)"}}}

A normal VM's run is stored as ``not attested`` with the reason - never with made-up
evidence - and so is a run whose guest could not produce evidence (the reason says why).

:func:`verify_run` is ``cvmctl results verify``: it rebuilds the digest from what is stored
*now*, and verifies each arm's evidence with :func:`cvmattest.verify.verify_evidence`, the
digest as the nonce. One altered sample changes the digest, the report_data check fails,
and the run is ``rejected``. Its verdict: ``verified`` (every arm with evidence verifies),
``rejected`` (one does not), ``not attested`` (no arm has evidence).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import trio

from cvmcore.errors import CvmError, UsageError
from workloads.record import record_digest
from workloads.runner import LocalTarget, Target
from workloads.store import Store

if TYPE_CHECKING:
    from cryptography import x509

    from cvmattest.result import VerificationResult
    from cvmattest.snp import Product
    from cvmcore.client import RpcClient
    from guest_agent.attestation.configfs_tsm import ConfigfsOps

ALGORITHM = "sha512"
ATTESTED = "attested"
NOT_ATTESTED = "not attested"
Verdict = Literal["verified", "rejected", "not attested"]

#: report_data (64 bytes) -> the arm's attestation entry (see the module docstring)
EvidenceSource = Callable[[bytes], Awaitable[dict[str, Any]]]


def not_attested(reason: str) -> dict[str, Any]:
    return {"status": NOT_ATTESTED, "reason": reason}


def evidence_entry(
    tee: str, kind: str, interface: str, evidence: bytes, certificates: bytes | None
) -> dict[str, Any]:
    return {
        "status": ATTESTED,
        "tee": tee,
        "kind": kind,
        "interface": interface,
        "evidence": evidence.hex(),
        "certificates": certificates.hex() if certificates else None,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


async def local_evidence(
    report_data: bytes, *, root: Path = Path("/"), configfs: ConfigfsOps | None = None
) -> dict[str, Any]:
    """Evidence from the kernel under ``root`` (cvmctl inside a confidential guest)."""
    from guest_agent.attestation.guest import fetch_evidence
    from guest_agent.attestation.steps import InterfaceUnavailable

    try:
        evidence = await trio.to_thread.run_sync(
            lambda: fetch_evidence(report_data, root=root, configfs=configfs)
        )
    except InterfaceUnavailable as exc:
        return not_attested(f"this machine is not a confidential guest: {exc}")
    except CvmError as exc:
        return not_attested(f"the evidence could not be fetched: {exc}")
    return evidence_entry(
        evidence.tee, evidence.kind.value, evidence.interface, evidence.data, evidence.certificates
    )


async def agent_evidence(agent: RpcClient, tee: str, report_data: bytes) -> dict[str, Any]:
    """Evidence from a guest's agent; ``tee`` is what the agent said of its guest (GetInfo)."""
    from cvm.v1 import agent_pb2, agent_pb2_grpc

    if tee in ("none", ""):
        return not_attested(f"the guest is not confidential (tee {tee or 'unknown'})")
    stub = agent_pb2_grpc.GuestAgentStub(agent.channel)
    try:
        response = await agent.call(
            stub.GetAttestationReport,
            agent_pb2.GetAttestationReportRequest(report_data=report_data),
            timeout=120,
        )
    except CvmError as exc:
        return not_attested(f"the agent could not fetch evidence: {exc}")
    return evidence_entry(
        tee,
        response.evidence_kind,
        response.interface,
        bytes(response.evidence),
        bytes(response.certificates),
    )


def default_source(target: Target) -> EvidenceSource | None:
    """How ``target`` fetches evidence: a VM target's agent, or this machine's kernel."""
    source = getattr(target, "run_evidence", None)
    if source is not None:
        return source  # type: ignore[no-any-return]
    if isinstance(target, LocalTarget):
        return local_evidence
    return None


async def attest_run(
    store: Store,
    run_id: int,
    targets: Mapping[str, Target],
    sources: Mapping[str, EvidenceSource] | None = None,
) -> dict[str, Any]:
    """Fetch and store evidence over the run's record digest, per arm; the stored entry.

    ``sources`` replaces an arm's :func:`default_source` (tests: a fake device tree).
    """
    digest = record_digest(store.run(run_id), store.samples(run_id))
    arms: dict[str, Any] = {}
    for arm, target in targets.items():
        source = (sources or {}).get(arm) or default_source(target)
        if source is None:
            arms[arm] = not_attested(f"target {target.name} cannot fetch evidence")
            continue
        arms[arm] = await source(digest)
    entry = {"algorithm": ALGORITHM, "digest": digest.hex(), "arms": arms}
    store.set_attestation(run_id, entry)
    return entry


# -- verification -----------------------------------------------------------------------


@dataclass
class ArmVerdict:
    arm: str
    verdict: Verdict
    detail: str
    result: VerificationResult | None = None


@dataclass
class RunVerdict:
    run_id: int
    verdict: Verdict
    digest_matches: bool | None  # the stored digest against the one rebuilt now
    arms: list[ArmVerdict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "verdict": self.verdict,
            "digest_matches": self.digest_matches,
            "arms": [
                {
                    "arm": a.arm,
                    "verdict": a.verdict,
                    "detail": a.detail,
                    "checks": None if a.result is None else a.result.to_dict()["checks"],
                }
                for a in self.arms
            ],
        }


def verify_run(
    store: Store,
    run_id: int,
    *,
    at: datetime,
    extra_certificates: Sequence[x509.Certificate] = (),
    arks: Sequence[x509.Certificate] | None = None,
) -> RunVerdict:
    """Rebuild the run's digest and verify each arm's evidence over it (module docstring).

    ``arks`` replaces AMD's pinned roots (a test chain; the caller says so to its user).
    """
    from cvmattest.certs import load_certificates
    from cvmattest.detect import parse_evidence
    from cvmattest.snp import parse_cert_table
    from cvmattest.verify import verify_evidence

    run = store.run(run_id)
    digest = record_digest(run, store.samples(run_id))
    stored = run.metadata.get("attestation")
    if not isinstance(stored, dict):
        why = "the run carries no evidence (it was measured before attested results, or not completed)"
        return RunVerdict(run_id, "not attested", None, [ArmVerdict("", "not attested", why)])
    matches = stored.get("digest") == digest.hex()
    roots = None
    if arks is not None:
        roots = {_ark_product(cert): cert for cert in arks}
    verdicts = []
    for arm, entry in sorted((stored.get("arms") or {}).items()):
        if entry.get("status") != ATTESTED:
            verdicts.append(ArmVerdict(arm, "not attested", str(entry.get("reason") or "no evidence")))
            continue
        evidence = parse_evidence(bytes.fromhex(entry["evidence"]), entry.get("tee"))
        certificates = list(extra_certificates)
        if entry.get("certificates"):
            for cert in parse_cert_table(bytes.fromhex(entry["certificates"])):
                certificates += load_certificates(cert.data, f"{cert.kind} from the evidence")
        result = verify_evidence(evidence, certificates, at=at, nonce=digest, arks=roots)
        if result.verified:
            verdicts.append(ArmVerdict(arm, "verified", result.summary(), result))
        else:
            detail = result.summary()
            if not matches:
                detail += " (the stored record changed since the evidence was fetched)"
            verdicts.append(ArmVerdict(arm, "rejected", detail, result))
    kinds = {v.verdict for v in verdicts}
    verdict: Verdict = (
        "rejected" if "rejected" in kinds else "verified" if "verified" in kinds else "not attested"
    )
    return RunVerdict(run_id, verdict, matches, verdicts)


def _ark_product(cert: x509.Certificate) -> Product:
    from cvmattest.certs import common_name
    from cvmattest.snp import Product

    name = common_name(cert)
    try:
        return Product(name.removeprefix("ARK-"))
    except ValueError:
        products = ", ".join(f"ARK-{p.value}" for p in Product)
        raise UsageError(f"roots: {name!r} is not an ARK (common name one of {products})") from None
