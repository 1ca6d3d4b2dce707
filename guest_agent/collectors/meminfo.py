"""The guest's memory summary from ``/proc/meminfo`` (Documentation/filesystems/proc.rst, "meminfo").

Each line is ``Name:   <value> kB`` (kB meaning KiB) or a bare count (``HugePages_*``). The
summary keeps the fields an operator reads first, in bytes, as ``cvm_guest_memory_bytes{kind}``:

- ``total`` (MemTotal), ``free`` (MemFree), ``available`` (MemAvailable: the kernel's estimate of
  what can be allocated without swapping), ``buffers``, ``cached``, ``shmem``, ``anon`` (AnonPages);
- ``swap_total``, ``swap_free``;
- ``unaccepted`` (Unaccepted, Linux >= 6.5 with CONFIG_UNACCEPTED_MEMORY): memory a confidential
  guest has not yet accepted from the TEE (SNP PVALIDATE, TDX TDG.MEM.PAGE.ACCEPT); it is
  accepted lazily as the guest allocates, so it falls as the guest warms up.

A field the kernel does not print is absent, not zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from guest_agent.collectors.base import CollectorUnavailable, SnapshotSource, read_kernel_file

#: meminfo field -> the ``kind`` label.
FIELDS: Final[Mapping[str, str]] = {
    "MemTotal": "total",
    "MemFree": "free",
    "MemAvailable": "available",
    "Buffers": "buffers",
    "Cached": "cached",
    "Shmem": "shmem",
    "AnonPages": "anon",
    "SwapTotal": "swap_total",
    "SwapFree": "swap_free",
    "Unaccepted": "unaccepted",
}


def parse_meminfo(text: str) -> dict[str, int]:
    """``{kind: bytes}`` for the :data:`FIELDS` present in a ``/proc/meminfo`` text."""
    summary: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        kind = FIELDS.get(name.strip())
        if not sep or kind is None:
            continue
        fields = rest.split()
        if not fields or not fields[0].isdigit():
            continue
        unit = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
        summary[kind] = int(fields[0]) * unit
    return summary


class MeminfoCollector(SnapshotSource[dict[str, int]]):
    name = "meminfo"

    def __init__(self, procfs_root: Path) -> None:
        self.path = procfs_root / "meminfo"

    def read(self) -> dict[str, int]:
        try:
            summary = parse_meminfo(read_kernel_file(self.path))
        except OSError as exc:
            raise CollectorUnavailable(f"{self.path}: {exc.strerror}") from exc
        if "total" not in summary:
            raise CollectorUnavailable(f"{self.path} has no MemTotal")
        return summary

    def families(self, snapshot: dict[str, int]) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "cvm_guest_memory_bytes",
            "The guest's memory from /proc/meminfo by kind (total, free, available, buffers, cached, "
            "shmem, anon, swap_total, swap_free, unaccepted).",
            labels=["kind"],
        )
        for kind, value in sorted(snapshot.items()):
            family.add_metric([kind], float(value))
        yield family
