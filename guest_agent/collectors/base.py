"""The snapshot pattern: read kernel files off the scrape path, serve the last reading.

client_python calls ``collect()`` synchronously on the HTTP server's thread for every scrape.
A sysfs read that blocks (a busy device, a locked driver, ``scaling_cur_freq`` taking ~20 ms
per CPU) would stall every scrape behind it. So each :class:`SnapshotSource` only *reads*
(blocking, in a worker thread driven by the trio refresher in :mod:`.registry`) into an
immutable snapshot, and turns a snapshot into metric families (pure, fast). The exporter
serves whatever snapshot was last stored; replacing a reference is atomic under the GIL,
so no lock is needed between the refresher and the HTTP thread.

A source that cannot read (file missing, debugfs not mounted, permission) raises
:class:`CollectorUnavailable`; its families are then absent and
``cvm_scrape_collector_success{collector}`` is 0, as node_exporter does for its collectors.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

SnapshotT = TypeVar("SnapshotT")


def read_kernel_bytes(path: Path | str) -> bytes:
    """The whole content of a sysfs/procfs/debugfs file, with plain syscalls.

    ``os.open`` + ``os.read`` until EOF costs a fraction of ``Path.read_text`` (no buffered
    text wrapper), which matters when a refresh reads hundreds of cpuidle attributes, and
    on GetInfo's path. Raises ``OSError`` like ``open``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_kernel_file(path: Path | str) -> str:
    """:func:`read_kernel_bytes` decoded as latin-1, which never fails."""
    return read_kernel_bytes(path).decode("latin-1")


def read_sysfs_attribute(path: Path | str) -> str:
    """A sysfs attribute in one ``read``: the kernel formats it whole (at most one page).

    Documentation/filesystems/sysfs.rst: an attribute's ``show()`` fills one PAGE_SIZE buffer
    at the first read, so a single read of a page returns all of it. Half the syscalls of
    :func:`read_kernel_file`, for the hundreds of cpuidle attributes of a large guest.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 8192).decode("latin-1")
    finally:
        os.close(fd)


class CollectorUnavailable(Exception):
    """The data this collector exports does not exist here (or cannot be read)."""


class SnapshotSource(abc.ABC, Generic[SnapshotT]):
    """One collector: a blocking ``read()`` and a pure ``families()``."""

    #: The ``collector`` label of the scrape self-metrics.
    name: str

    @abc.abstractmethod
    def read(self) -> SnapshotT:
        """Read the kernel files (blocking). Raise :class:`CollectorUnavailable` if absent."""

    @abc.abstractmethod
    def families(self, snapshot: SnapshotT) -> Iterable[Metric]:
        """Turn a snapshot into metric families (pure, fast)."""


@dataclass(frozen=True)
class Reading:
    """The outcome of one refresh of one source."""

    snapshot: object | None
    success: bool
    duration_seconds: float
    error: str = ""


class SlotState:
    """The latest :class:`Reading` of one source, plus whether a read is still in flight."""

    def __init__(self, source: SnapshotSource[Any]) -> None:
        self.source = source
        self.reading: Reading | None = None
        self.in_flight = False


class SnapshotExporter(Collector):
    """The client_python collector that serves the stored snapshots of every source."""

    def __init__(self, slots: Sequence[SlotState]) -> None:
        self.slots = tuple(slots)

    def describe(self) -> Iterable[Metric]:
        # Returning nothing keeps registration from calling collect() (client_python rule).
        return []

    def collect(self) -> Iterable[Metric]:
        duration = GaugeMetricFamily(
            "cvm_scrape_collector_duration_seconds",
            "Seconds the collector's last refresh took to read the kernel.",
            labels=["collector"],
        )
        success = GaugeMetricFamily(
            "cvm_scrape_collector_success",
            "1 if the collector's last refresh read its data, 0 if it failed or the data is absent.",
            labels=["collector"],
        )
        for slot in self.slots:
            reading = slot.reading
            if reading is None:
                continue
            duration.add_metric([slot.source.name], reading.duration_seconds)
            success.add_metric([slot.source.name], 1.0 if reading.success else 0.0)
            if reading.success and reading.snapshot is not None:
                yield from slot.source.families(reading.snapshot)
        yield duration
        yield success
