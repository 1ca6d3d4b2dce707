"""The agent's own health: RPCs by method and status code, their durations, relay traffic.

:class:`AgentStats` is a plain thread-safe tally that the gRPC server (which runs handlers
on a thread pool) and the vsock relays increment; :class:`AgentStatsCollector` turns a copy
of it into metric families at scrape time. It holds no snapshot: reading it is a dict copy.

Labels stay bounded: ``method`` is a gRPC method name (a fixed set, capped at
:data:`MAX_METHODS` with the rest counted as ``other``), ``code`` a gRPC status code name,
``relay`` a name the agent chooses, ``direction`` is ``in`` or ``out``, ``outcome`` one of
:class:`guest_agent.idle_polling.RecoveryOutcome`.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cvmcore.grpc_bridge import UndecodableRequests

RPC_DURATION_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
MAX_METHODS = 64
OTHER = "other"


@dataclass
class _Histogram:
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(RPC_DURATION_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(RPC_DURATION_BUCKETS, value)
        if index < len(self.bucket_counts):
            self.bucket_counts[index] += 1
        self.count += 1
        self.total += value


class AgentStats:
    """Counters the server and relays increment (thread-safe; cheap: one lock, dict updates)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rpcs: dict[tuple[str, str], int] = {}
        self._durations: dict[str, _Histogram] = {}
        self._relay_connections: dict[str, int] = {}
        self._relay_active: dict[str, int] = {}
        self._relay_bytes: dict[tuple[str, str], int] = {}
        self._relay_refused: dict[str, int] = {}
        self._recovery: tuple[str, int] | None = None
        #: requests the gRPC server could not decode (the bridge counts them)
        self.undecodable = UndecodableRequests("cvm_guest_agent_rpc_undecodable")

    def _method(self, method: str) -> str:
        if method in self._durations or len(self._durations) < MAX_METHODS:
            return method
        return OTHER

    def record_rpc(self, method: str, code: str, duration_seconds: float) -> None:
        """One finished RPC: ``method`` e.g. ``GetInfo``, ``code`` e.g. ``OK`` (grpc.StatusCode name)."""
        with self._lock:
            method = self._method(method)
            self._rpcs[(method, code)] = self._rpcs.get((method, code), 0) + 1
            self._durations.setdefault(method, _Histogram()).observe(max(duration_seconds, 0.0))

    def relay_opened(self, relay: str) -> None:
        with self._lock:
            self._relay_connections[relay] = self._relay_connections.get(relay, 0) + 1
            self._relay_active[relay] = self._relay_active.get(relay, 0) + 1

    def relay_closed(self, relay: str) -> None:
        with self._lock:
            self._relay_active[relay] = max(self._relay_active.get(relay, 0) - 1, 0)

    def relay_transferred(self, relay: str, direction: Literal["in", "out"], nbytes: int) -> None:
        with self._lock:
            key = (relay, direction)
            self._relay_bytes[key] = self._relay_bytes.get(key, 0) + nbytes

    def relay_refused(self, relay: str) -> None:
        with self._lock:
            self._relay_refused[relay] = self._relay_refused.get(relay, 0) + 1

    def recovered(self, outcome: str, discarded: int) -> None:
        """What start-up recovery of the state directory did, and how many entries it dropped."""
        with self._lock:
            self._recovery = (outcome, discarded)

    def copy(self) -> AgentStatsView:
        with self._lock:
            return AgentStatsView(
                rpcs=dict(self._rpcs),
                durations={m: (list(h.bucket_counts), h.count, h.total) for m, h in self._durations.items()},
                relay_connections=dict(self._relay_connections),
                relay_active=dict(self._relay_active),
                relay_bytes=dict(self._relay_bytes),
                relay_refused=dict(self._relay_refused),
                recovery=self._recovery,
            )


@dataclass(frozen=True)
class AgentStatsView:
    rpcs: dict[tuple[str, str], int]
    durations: dict[str, tuple[list[int], int, float]]
    relay_connections: dict[str, int]
    relay_active: dict[str, int]
    relay_bytes: dict[tuple[str, str], int]
    relay_refused: dict[str, int] = field(default_factory=dict)
    recovery: tuple[str, int] | None = None


class AgentStatsCollector(Collector):
    def __init__(self, stats: AgentStats) -> None:
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        view = self.stats.copy()
        rpcs = CounterMetricFamily(
            "cvm_guest_agent_rpcs",
            "RPCs the agent finished, by method and gRPC status code.",
            labels=["method", "code"],
        )
        for (method, code), count in sorted(view.rpcs.items()):
            rpcs.add_metric([method, code], float(count))
        yield rpcs

        durations = HistogramMetricFamily(
            "cvm_guest_agent_rpc_duration_seconds", "Time the agent took to answer RPCs.", labels=["method"]
        )
        for method, (bucket_counts, count, total) in sorted(view.durations.items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, in_bucket in zip(RPC_DURATION_BUCKETS, bucket_counts, strict=True):
                cumulative += in_bucket
                buckets.append((repr(bound), float(cumulative)))
            buckets.append(("+Inf", float(count)))
            durations.add_metric([method], buckets, total)
        yield durations

        connections = CounterMetricFamily(
            "cvm_guest_agent_relay_connections", "Connections the agent's relays accepted.", labels=["relay"]
        )
        for relay, count in sorted(view.relay_connections.items()):
            connections.add_metric([relay], float(count))
        yield connections

        active = GaugeMetricFamily(
            "cvm_guest_agent_relay_active_connections",
            "Connections the agent's relays hold open.",
            labels=["relay"],
        )
        for relay, count in sorted(view.relay_active.items()):
            active.add_metric([relay], float(count))
        yield active

        transferred = CounterMetricFamily(
            "cvm_guest_agent_relay_bytes",
            "Bytes the agent's relays forwarded, by direction.",
            labels=["relay", "direction"],
        )
        for (relay, direction), count in sorted(view.relay_bytes.items()):
            transferred.add_metric([relay, direction], float(count))
        yield transferred

        refused = CounterMetricFamily(
            "cvm_guest_agent_relay_refused_connections",
            "Connections the agent's relays closed unserved: a peer not allowed, the connection "
            "limit reached, or no bytes before the first-byte deadline.",
            labels=["relay"],
        )
        for relay, count in sorted(view.relay_refused.items()):
            refused.add_metric([relay], float(count))
        yield refused

        if view.recovery is not None:
            outcome, discarded = view.recovery
            recovery = GaugeMetricFamily(
                "cvm_guest_agent_state_recovery",
                "What the agent did at start with the idle-polling record a previous agent left "
                "(1 for the outcome: nothing-to-recover, restored, kept, discarded, restore-failed, "
                "previous-boot).",
                labels=["outcome"],
            )
            recovery.add_metric([outcome], 1.0)
            yield recovery
            yield GaugeMetricFamily(
                "cvm_guest_agent_state_discarded_entries",
                "Recorded files the start-up recovery could not restore because they no longer "
                "exist, or whose record it set aside (unparsable) or dropped (an earlier boot).",
                value=float(discarded),
            )
        yield from self.stats.undecodable.collect()
