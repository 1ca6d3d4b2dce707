"""Benchmark: parse + verify time of every SNP report and TDX quote in the test fixtures (median of N runs).

Each timed run starts from bytes - the evidence file and the certificate files as read from
disk - and ends with a :class:`~cvmattest.result.VerificationResult`: parsing the
report or quote, loading the VCEK/VLEK (SNP) or the embedded PCK chain (TDX), every
signature in the chain and the evidence signature. The pinned roots are loaded once per
process (as in any long-running verifier). Goals: SNP <= 5 ms, TDX <= 10 ms (median).

    .venv/bin/python benchmarks/attest.py [--repeat 100] [--testdata DIR] [--json]

Exits 1 if a median misses its goal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cvmattest.certs import load_certificates
from cvmattest.detect import parse_evidence
from cvmattest.verify import verify_evidence

GOALS_MS = {"sev-snp": 5.0, "tdx": 10.0}
VERIFIED_ON = datetime(2026, 11, 26, tzinfo=UTC)
VLEK_VALID_AT = datetime(2025, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Case:
    name: str
    tee: str
    run: Callable[[], bool]


@dataclass(frozen=True)
class Measurement:
    name: str
    tee: str
    median_ms: float
    p95_ms: float
    min_ms: float
    goal_ms: float

    @property
    def meets_goal(self) -> bool:
        return self.median_ms <= self.goal_ms


def default_testdata() -> Path:
    return Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "attestation"


def cases(root: Path) -> list[Case]:
    expected = json.loads((root / "expected.json").read_text())
    found: list[Case] = []
    for name, info in expected["snp"].items():
        evidence = (root / name).read_bytes()
        leaf = (root / info["verifies_with"]["leaf"]).read_bytes()
        chain = (root / info["verifies_with"]["ask_or_asvk_and_ark"]).read_bytes()
        at = VLEK_VALID_AT if info["signing_key"] == "VLEK" else VERIFIED_ON

        def run_snp(
            evidence: bytes = evidence, leaf: bytes = leaf, chain: bytes = chain, at: datetime = at
        ) -> bool:
            certificates = load_certificates(leaf) + load_certificates(chain)
            return verify_evidence(parse_evidence(evidence), certificates, at=at).verified

        found.append(Case(name, "sev-snp", run_snp))
    for name in expected["tdx"]:
        if "quote" not in name:
            continue
        quote = (root / name).read_bytes()

        def run_tdx(quote: bytes = quote) -> bool:
            return verify_evidence(parse_evidence(quote), at=VERIFIED_ON).verified

        found.append(Case(name, "tdx", run_tdx))
    return found


def measure(case: Case, repeat: int) -> Measurement:
    if not case.run():
        raise SystemExit(f"{case.name} does not verify: nothing to benchmark")
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        case.run()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return Measurement(
        name=case.name,
        tee=case.tee,
        median_ms=statistics.median(samples),
        p95_ms=samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))],
        min_ms=samples[0],
        goal_ms=GOALS_MS[case.tee],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=100, help="timed runs per case (default: 100)")
    parser.add_argument("--testdata", type=Path, default=default_testdata(), help="the attestation test data")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not (args.testdata / "expected.json").is_file():
        print(f"no attestation test data at {args.testdata} (see --testdata)", file=sys.stderr)
        return 2
    results = [measure(case, args.repeat) for case in cases(args.testdata)]
    if args.json:
        print(json.dumps([m.__dict__ | {"meets_goal": m.meets_goal} for m in results], indent=2))
    else:
        width = max(len(m.name) for m in results)
        print(f"parse+verify, median of {args.repeat} runs (ms)")
        print(f"{'evidence':<{width}}  {'tee':<7}  {'median':>7}  {'p95':>7}  {'min':>7}  {'goal':>5}")
        for m in results:
            verdict = "ok" if m.meets_goal else "SLOW"
            print(
                f"{m.name:<{width}}  {m.tee:<7}  {m.median_ms:7.3f}  {m.p95_ms:7.3f}  {m.min_ms:7.3f}  "
                f"{m.goal_ms:5.1f}  {verdict}"
            )
    return 0 if all(m.meets_goal for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
