"""``cvm_guest_info{tee,kernel}``: the guest's identity as a constant-1 metric; and
``cvm_guest_agent_build_info{version,python_version}``: which agent answers.

Join it onto other series (``* on() group_left(tee) cvm_guest_info``) to split dashboards by
TEE. Both labels are fixed for the life of the agent, so they are computed once.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cvmcore.build_info import build_info


class GuestInfoCollector(Collector):
    def __init__(self, tee: str, kernel_release: str) -> None:
        self.tee = tee
        self.kernel_release = kernel_release

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "cvm_guest_info",
            "The guest's TEE (sev-snp, tdx, none) and kernel release (value 1).",
            labels=["tee", "kernel"],
        )
        info.add_metric([self.tee, self.kernel_release], 1.0)
        yield info
        yield build_info("cvm_guest_agent_build_info", "The cvm-agent's version and Python (value 1).")
