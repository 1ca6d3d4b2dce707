"""Glue between the agent's gRPC server and relays and its Prometheus metrics.

The server reports every finished RPC and the vsock relay every connection and byte to
:class:`~guest_agent.collectors.agent.AgentStats`, which the agent's private registry
exports as ``cvm_guest_agent_*``.
"""

from __future__ import annotations

from typing import Literal

from cvmcore.grpc_bridge import RpcObserver
from cvmcore.relay import RelayStats
from guest_agent.collectors.agent import AgentStats


class MeteredRelayStats(RelayStats):
    """Relay counters that also feed the agent's metrics under the relay name ``relay``."""

    def __init__(self, stats: AgentStats, relay: str = "vsock") -> None:
        super().__init__()
        self._stats = stats
        self._relay = relay

    def opened(self) -> None:
        super().opened()
        self._stats.relay_opened(self._relay)

    def closed(self) -> None:
        super().closed()
        self._stats.relay_closed(self._relay)

    def refused(self) -> None:
        super().refused()
        self._stats.relay_refused(self._relay)

    def transferred(self, direction: Literal["in", "out"], nbytes: int) -> None:
        super().transferred(direction, nbytes)
        self._stats.relay_transferred(self._relay, direction, nbytes)


def rpc_observer(stats: AgentStats) -> RpcObserver:
    """An observer for :class:`cvmcore.serve.ServerOptions`: counts RPCs by short method name."""

    def observe(method: str, code: str, seconds: float) -> None:
        stats.record_rpc(method.rsplit("/", 1)[-1], code, seconds)

    return observe
