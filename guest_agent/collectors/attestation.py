"""Attestation requests the agent served: counts, durations, the last success.

The study timed each attestation step; the agent times every request it serves
(:class:`guest_agent.attestation.guest.Evidence` carries the per-step timings) and exports:

* ``cvm_guest_attestation_requests_total{tee,interface,result}``: ``result`` is
  ``success`` or a bounded failure class (``unavailable``, ``bad_request``, ``failed``);
* ``cvm_guest_attestation_duration_seconds{tee,interface}``: histogram of whole requests;
* ``cvm_guest_attestation_step_seconds{interface,step}``: the steps of the last request;
* ``cvm_guest_attestation_last_success_timestamp_seconds``.

Labels stay bounded: ``interface`` and ``step`` come from the agent's own fixed sets.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Report requests take milliseconds (configfs-tsm) to seconds (a quote through the host's QGS).
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RESULTS = ("success", "unavailable", "bad_request", "failed")


class AttestationStats:
    """Thread-safe tallies the agent's GetAttestationReport updates."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = {}
        self._histograms: dict[tuple[str, str], tuple[list[int], int, float]] = {}
        self._last_steps: dict[tuple[str, str], float] = {}
        self._last_success: float | None = None

    def record(
        self,
        tee: str,
        interface: str,
        result: str,
        seconds: float | None,
        steps: Sequence[tuple[str, float]] = (),
    ) -> None:
        result = result if result in RESULTS else "failed"
        with self._lock:
            key = (tee, interface, result)
            self._requests[key] = self._requests.get(key, 0) + 1
            if result == "success" and seconds is not None:
                buckets, count, total = self._histograms.get((tee, interface), ([0] * len(BUCKETS), 0, 0.0))
                index = bisect.bisect_left(BUCKETS, seconds)
                if index < len(buckets):
                    buckets[index] += 1
                self._histograms[(tee, interface)] = (buckets, count + 1, total + seconds)
                self._last_steps = {(interface, step): value for step, value in steps}
                self._last_success = time.time()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            requests = dict(self._requests)
            histograms = {k: (list(v[0]), v[1], v[2]) for k, v in self._histograms.items()}
            steps = dict(self._last_steps)
            last_success = self._last_success
        counter = CounterMetricFamily(
            "cvm_guest_attestation_requests",
            "Attestation requests the agent served, by TEE, interface and result.",
            labels=["tee", "interface", "result"],
        )
        for (tee, interface, result), count in sorted(requests.items()):
            counter.add_metric([tee, interface, result], float(count))
        yield counter
        histogram = HistogramMetricFamily(
            "cvm_guest_attestation_duration_seconds",
            "Time to fetch attestation evidence, whole request.",
            labels=["tee", "interface"],
        )
        for (tee, interface), (buckets, count, total) in sorted(histograms.items()):
            cumulative, points = 0, []
            for bound, in_bucket in zip(BUCKETS, buckets, strict=True):
                cumulative += in_bucket
                points.append((repr(bound), float(cumulative)))
            points.append(("+Inf", float(count)))
            histogram.add_metric([tee, interface], points, sum_value=total)
        yield histogram
        step_gauge = GaugeMetricFamily(
            "cvm_guest_attestation_step_seconds",
            "Duration of each step of the last successful attestation request.",
            labels=["interface", "step"],
        )
        for (interface, step), seconds in sorted(steps.items()):
            step_gauge.add_metric([interface, step], seconds)
        yield step_gauge
        if last_success is not None:
            yield GaugeMetricFamily(
                "cvm_guest_attestation_last_success_timestamp_seconds",
                "Unix time of the last successful attestation request.",
                value=last_success,
            )


class AttestationCollector(Collector):
    def __init__(self, stats: AttestationStats) -> None:
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return self.stats.collect()
