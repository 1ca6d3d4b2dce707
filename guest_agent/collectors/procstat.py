"""CPU time per mode from ``/proc/stat``, including steal (Documentation/filesystems/proc.rst).

Each ``cpuN`` line holds, in USER_HZ ticks (``sysconf(_SC_CLK_TCK)``, 100 on Linux):
user nice system idle iowait irq softirq steal guest guest_nice. ``guest`` and ``guest_nice``
are already included in ``user`` and ``nice``, so they are exported apart
(``cvm_guest_cpu_guest_seconds_total``) to keep ``sum by (cpu)`` of the mode counter equal to
the CPU's wall time. ``steal`` is time the vCPU was runnable but the host ran something else:
the noise figure every benchmark of a guest should record.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from guest_agent.collectors.base import CollectorUnavailable, SnapshotSource, read_kernel_file

MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
GUEST_MODES = ("user", "nice")


@dataclass(frozen=True)
class CpuTimes:
    cpu: int
    ticks: tuple[int, ...]  # MODES order
    guest_ticks: tuple[int, ...]  # GUEST_MODES order (zeros on old kernels)


@dataclass(frozen=True)
class ProcStatSnapshot:
    cpus: tuple[CpuTimes, ...]
    user_hz: int


def parse_proc_stat(text: str, user_hz: int) -> ProcStatSnapshot:
    """Per-CPU tick counters from ``/proc/stat`` text (the aggregate ``cpu`` line is skipped)."""
    cpus: list[CpuTimes] = []
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        values = [int(f) for f in fields] + [0] * (10 - len(fields))
        cpus.append(CpuTimes(cpu=int(name[3:]), ticks=tuple(values[:8]), guest_ticks=tuple(values[8:10])))
    return ProcStatSnapshot(cpus=tuple(cpus), user_hz=user_hz)


class ProcStatCollector(SnapshotSource[ProcStatSnapshot]):
    name = "procstat"

    def __init__(self, procfs_root: Path, user_hz: int | None = None) -> None:
        """``procfs_root`` is the procfs mount point (``/proc``)."""
        self.path = procfs_root / "stat"
        self.user_hz = user_hz or os.sysconf("SC_CLK_TCK")

    def read(self) -> ProcStatSnapshot:
        try:
            text = read_kernel_file(self.path)
        except OSError as exc:
            raise CollectorUnavailable(f"{self.path}: {exc}") from exc
        return parse_proc_stat(text, self.user_hz)

    def families(self, snapshot: ProcStatSnapshot) -> Iterable[Metric]:
        seconds = CounterMetricFamily(
            "cvm_guest_cpu_seconds",
            "Seconds each CPU spent in each mode (/proc/stat; steal = runnable while the host ran others).",
            labels=["cpu", "mode"],
        )
        guest = CounterMetricFamily(
            "cvm_guest_cpu_guest_seconds",
            "Seconds each CPU spent running nested guests (already included in user and nice).",
            labels=["cpu", "mode"],
        )
        for cpu in snapshot.cpus:
            for mode, ticks in zip(MODES, cpu.ticks, strict=True):
                seconds.add_metric([str(cpu.cpu), mode], ticks / snapshot.user_hz)
            for mode, ticks in zip(GUEST_MODES, cpu.guest_ticks, strict=True):
                guest.add_metric([str(cpu.cpu), mode], ticks / snapshot.user_hz)
        yield seconds
        yield guest
