"""Prometheus collectors for the guest: cpuidle, haltpoll, swiotlb, CPU time, pressure, the agent.

Each kernel-facing collector reads from an injectable root and serves a snapshot that a trio
task refreshes (see :mod:`.base` for why, :mod:`.registry` for how to wire it up). Metric
names follow the project's conventions (``cvm_guest_*``; base units; ``_total`` counters;
``_info`` metadata; bounded labels).
"""

from guest_agent.collectors.agent import AgentStats
from guest_agent.collectors.registry import (
    Refresher,
    Roots,
    build_registry,
)

__all__ = ["AgentStats", "Refresher", "Roots", "build_registry"]
