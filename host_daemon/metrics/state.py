"""What the host exporter keeps per VM: the view it follows and the last readings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from prometheus_client.metrics_core import Metric

from host_daemon.metrics.parse import (
    KvmStats,
    StatSchema,
)
from host_daemon.metrics.procfs import ProcReading, ThreadNames
from host_daemon.qmp import QMPClient

MAX_VCPU_SERIES: Final = 64
COLLECTORS: Final = ("procfs", "qmp", "agent")


@dataclass(frozen=True, eq=False)
class VMView:
    """What the exporter needs to know about one VM whose QEMU runs."""

    name: str
    tee: str = "none"
    machine: str = ""
    qemu_version: str = ""
    pid: int = 0
    vcpu_tids: tuple[int, ...] = ()
    qmp: QMPClient | None = None
    agent_address: str = ""
    boot_phases: Mapping[str, float] = field(default_factory=dict)
    boot_unmeasured: Mapping[str, str] = field(default_factory=dict)  # phase -> why it has no figure

    def same_process(self, other: VMView) -> bool:
        """Whether ``other`` describes the same QEMU process (cached state stays valid)."""
        return self.pid == other.pid and self.qmp is other.qmp and self.agent_address == other.agent_address


@dataclass(frozen=True)
class PartResult:
    """How one part (procfs, kvm, agent) of one VM's last refresh went."""

    success: bool
    duration_seconds: float
    error: str = ""
    timed_out: bool = False


@dataclass
class GuestReading:
    """The agent's last exposition for one VM and the host-side rendering of it (cached)."""

    up: bool
    text: bytes = b""
    error: str = ""
    rendered: list[Metric] | None = None


@dataclass
class VMState:
    """Everything the collector keeps per VM; replaced when the VM's QEMU changes."""

    view: VMView
    names: ThreadNames = field(default_factory=ThreadNames)
    schemas: dict[str, dict[str, StatSchema]] | None = None
    stats_request: dict[str, Any] = field(default_factory=dict)  # query-stats arguments, from the schema
    qmp_unanswered_mark: int | None = None  # dropped_replies when our last command timed out
    proc: ProcReading | None = None
    kvm: KvmStats | None = None
    parts: dict[str, PartResult] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COLLECTORS, 0))
    guest: GuestReading | None = None
    agent_scope: trio.CancelScope | None = None

    @property
    def kvm_available(self) -> bool | None:
        """None until the schema is known; then whether QEMU has a ``kvm`` stats provider."""
        if self.schemas is None:
            return None
        return bool(self.schemas.get("vcpu"))
