"""Workloads whose samples come from elsewhere: boot phases and attestation steps.

Nothing is run for them here. The host daemon times a VM's boot phases (the study's
phases: QEMU, firmware, Linux, init, which the daemon records as daemon / spawn /
firmware / kernel / userspace; docs/study.md, "Boot time") and the agent times
the steps of an attestation request. A VM target (:class:`cvmctl.vm_target.VMTarget`)
measures them per repetition (a fresh boot; a report bound to a fresh nonce) and turns the
``{name: seconds}`` mappings into samples with :meth:`samples_from`; the runner stores and
summarises them like any other run. The figures draw ``boot`` as stacked phases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

from cvmcore.errors import UsageError
from workloads.capabilities import VM
from workloads.model import Param, Sample, Workload


def seconds_samples(values: Mapping[str, float], source: str, total: bool) -> list[Sample]:
    """One ``lower is better`` sample per name, in seconds, plus the sum as ``total``."""
    samples = []
    for name, seconds in values.items():
        if not name or not math.isfinite(seconds) or seconds < 0:
            raise UsageError(f"{source}: {name!r} = {seconds!r} is not a duration in seconds")
        samples.append(Sample(name, float(seconds), "s", "lower", {"source": source}))
    if total and samples:
        samples.append(Sample("total", sum(s.value for s in samples), "s", "lower", {"source": source}))
    return samples


class Boot(Workload):
    """Boot phases of a VM (from the host daemon): QEMU, firmware, Linux, init, and the total."""

    name = "boot"
    summary = "boot time by phase (QEMU, firmware, Linux, init), measured by the host daemon"
    kind = "external"
    needs = frozenset({VM})
    PHASES: ClassVar[tuple[str, ...]] = ("qemu", "firmware", "linux", "init")
    params = (
        Param(
            "repeat_policy",
            "str",
            "median-total",
            "which repetition stands for the run (the study: the one with the median total of 10)",
            choices=("median-total", "all"),
        ),
    )

    def samples_from(self, values: Mapping[str, float]) -> list[Sample]:
        """``{"qemu": 3.28, "firmware": 3.5, ...}`` -> one sample per phase, then ``total``."""
        return seconds_samples(values, "host-daemon boot phases", total=True)


class Attestation(Workload):
    """Attestation step timings (from the agent): report, quote, certificates, verification."""

    name = "attestation"
    summary = "attestation time by step (get report / quote, fetch certificates, verify), from the agent"
    kind = "external"
    needs = frozenset({VM})
    params = ()

    def samples_from(self, values: Mapping[str, float]) -> list[Sample]:
        """``{"get_report": 0.004, "verify": 0.02, ...}`` -> one sample per step, then ``total``."""
        return seconds_samples(values, "agent attestation steps", total=True)
