"""Pressure stall information (Documentation/accounting/psi.rst).

``/proc/pressure/{cpu,memory,io}`` each hold a ``some`` line and (memory, io, and cpu since
Linux 5.13) a ``full`` line: ``some avg10=0.00 avg60=0.00 avg300=0.00 total=<us>``. ``total``
is the cumulative stall time in microseconds: "some" = at least one task stalled on the
resource, "full" = all non-idle tasks stalled at once. Only totals are exported; the averages
are ``rate()`` of them. PSI is absent on kernels without CONFIG_PSI or booted with ``psi=0``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from guest_agent.collectors.base import CollectorUnavailable, SnapshotSource, read_kernel_file

RESOURCES = ("cpu", "memory", "io")


@dataclass(frozen=True)
class PressureTotal:
    resource: str
    kind: str  # "some" or "full"
    total_us: int


def parse_pressure(resource: str, text: str) -> list[PressureTotal]:
    totals: list[PressureTotal] = []
    for line in text.splitlines():
        kind, *fields = line.split()
        for field in fields:
            key, _, value = field.partition("=")
            if key == "total":
                totals.append(PressureTotal(resource, kind, int(value)))
    return totals


class PressureCollector(SnapshotSource[tuple[PressureTotal, ...]]):
    name = "pressure"

    def __init__(self, procfs_root: Path) -> None:
        self.directory = procfs_root / "pressure"

    def read(self) -> tuple[PressureTotal, ...]:
        totals: list[PressureTotal] = []
        for resource in RESOURCES:
            try:
                text = read_kernel_file(self.directory / resource)
            except OSError:
                continue  # e.g. EOPNOTSUPP when booted with psi=0
            totals.extend(parse_pressure(resource, text))
        if not totals:
            raise CollectorUnavailable(f"{self.directory} is absent or unreadable (CONFIG_PSI, psi=0)")
        return tuple(totals)

    def families(self, snapshot: tuple[PressureTotal, ...]) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "cvm_guest_pressure_stalled_seconds",
            "Seconds tasks stalled on the resource: some = at least one task, full = all non-idle tasks.",
            labels=["resource", "kind"],
        )
        for total in snapshot:
            family.add_metric([total.resource, total.kind], total.total_us / 1e6)
        yield family
