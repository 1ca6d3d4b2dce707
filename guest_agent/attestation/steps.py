"""Timing each step of an evidence request, and the error a failed request raises.

The study this project reproduces timed attestation step by step (open the device, the
firmware round trip, reading certificates), because the total hides where the time goes:
an SNP report is a PSP round trip of a few milliseconds, a TDX quote a trip through the
host's quoting enclave that can take far longer. :class:`StepTimer` records each named
step with a monotonic clock; the fetch result carries the list.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from cvmcore.errors import CvmError


class EvidenceFetchError(CvmError):
    """The kernel, the host or the firmware refused or failed an evidence request."""

    exit_code = 1


class InterfaceUnavailable(EvidenceFetchError):
    """No attestation interface of the kind asked for exists in this guest."""


@dataclass(frozen=True, slots=True)
class StepTiming:
    """How long one named step of a request took, in seconds."""

    step: str
    seconds: float


@dataclass
class StepTimer:
    """Collects :class:`StepTiming` entries; ``clock`` is injectable for tests."""

    clock: Callable[[], float] = time.perf_counter
    steps: list[StepTiming] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as step ``name`` (recorded even when the block raises)."""
        start = self.clock()
        try:
            yield
        finally:
            self.steps.append(StepTiming(name, self.clock() - start))

    @property
    def total_seconds(self) -> float:
        return sum(step.seconds for step in self.steps)
