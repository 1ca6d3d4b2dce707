"""The answer a verification gives: every check, whether it passed, and why.

A verifier never stops at the first failure: it runs every check it can and records each
as a :class:`Check`, so a user sees at once that, say, the chain is fine and the TCB is
what is stale. Checks that could not run because an earlier one failed (no key to check
a signature with) are recorded as ``skipped`` with the reason. The evidence is
:attr:`VerificationResult.verified` only when no check failed and every check that must
run did run.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class CheckStatus(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Check:
    """One verification step: a short stable ``name``, its status, and a one-line ``detail``."""

    name: str
    status: CheckStatus
    detail: str

    @property
    def passed(self) -> bool:
        return self.status is CheckStatus.PASSED


@dataclass(slots=True)
class VerificationResult:
    """Every check a verifier ran over one piece of evidence, in the order it ran them."""

    tee: str
    evidence_type: str
    at: datetime
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    """Facts a verifier found beyond pass/fail (the TDX TCB status and its advisories)."""

    def passed(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, CheckStatus.PASSED, detail))

    def failed(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, CheckStatus.FAILED, detail))

    def skipped(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, CheckStatus.SKIPPED, detail))

    def record(self, name: str, problem: str | None, ok_detail: str) -> bool:
        """Record ``name`` as failed with ``problem``, or passed with ``ok_detail`` if there is none."""
        if problem is None:
            self.passed(name, ok_detail)
            return True
        self.failed(name, problem)
        return False

    def require_allowed(self, name: str, what: str, value: bytes, allowed: frozenset[bytes]) -> bool:
        """Record whether ``value`` (a measurement called ``what``) is in an allow-list."""
        problem = None if value in allowed else f"{what} {value.hex()} is not in the allow-list"
        return self.record(name, problem, f"{what} is allowed")

    def require_nonce(self, report_data: bytes, nonce: bytes) -> bool:
        """Record check ``report_data``: the evidence carries exactly the verifier's nonce."""
        problem = None
        if report_data != nonce:
            problem = (
                f"report_data {report_data.hex()[:32]}... is not the expected nonce {nonce.hex()[:32]}..."
            )
        return self.record("report_data", problem, "report_data equals the nonce")

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.status is CheckStatus.FAILED]

    @property
    def verified(self) -> bool:
        """True when checks ran and none failed (skipped checks are those the evidence does not need)."""
        return bool(self.checks) and not self.failures

    def check(self, name: str) -> Check:
        """The check called ``name`` (``KeyError`` if it was not run)."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tee": self.tee,
            "evidence_type": self.evidence_type,
            "at": self.at.isoformat(),
            "verified": self.verified,
            "checks": [
                {"name": check.name, "status": check.status.value, "detail": check.detail}
                for check in self.checks
            ],
            **self.details,
        }

    def summary(self) -> str:
        """One line: ``verified`` or ``rejected: <first failed check>: <why>``."""
        if self.verified:
            return f"verified ({len(self.checks)} checks)"
        first = self.failures[0]
        return f"rejected: {first.name}: {first.detail}"
