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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

SnapshotT = TypeVar("SnapshotT")


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
