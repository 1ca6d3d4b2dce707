"""What the host exporter keeps per VM: the view it follows and the last readings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from prometheus_client.metrics_core import Metric

from host_daemon.metrics.libvirt import DomainReading
from host_daemon.metrics.parse import (
    DeviceCounters,
    KvmStats,
    StatSchema,
)
from host_daemon.metrics.procfs import ProcReading, ThreadNames
from host_daemon.qmp import QMPClient

MAX_VCPU_SERIES: Final = 64
COLLECTORS: Final = ("procfs", "qmp", "agent", "libvirt")
#: Every state ``cvm_vm_state`` reports (the daemon's own VM states, and libvirt's mapped onto
#: them by :func:`~.libvirt.domain_state`): one series each, 1 for the VM's current state.
VM_STATES: Final = ("defined", "starting", "running", "paused", "stopping", "stopped", "crashed", "other")
LIVE_STATES: Final = frozenset({"starting", "running", "paused", "stopping"})
SOURCES: Final = ("cvm-hostd", "libvirt")


@dataclass(frozen=True, eq=False)
class VMView:
    """What the exporter needs to know about one VM: every known VM, its QEMU running or not.

    ``state`` is one of :data:`VM_STATES`; only a live one (:data:`LIVE_STATES`) is refreshed
    (procfs, QMP, agent): a stopped VM keeps its inventory series and nothing else.
    ``source`` says who runs it: the daemon (``cvm-hostd``) or libvirt, whose reading of the
    domain (``domain``) replaces the QMP part of the refresh.
    """

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
    state: str = "running"
    vcpus: int = 0
    memory_bytes: float = 0.0
    started_at: float = 0.0  # Unix seconds the QEMU process started (0: unknown, or not running)
    source: str = "cvm-hostd"
    domain: DomainReading | None = None
    tap: str = ""  # the daemon's tap path: the tap's name in the namespace QEMU runs in

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def same_process(self, other: VMView) -> bool:
        """Whether ``other`` describes the same QEMU process (cached state stays valid)."""
        return (
            self.pid == other.pid
            and self.qmp is other.qmp
            and self.agent_address == other.agent_address
            and self.live == other.live
        )


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
    blocks: tuple[DeviceCounters, ...] | None = None  # the daemon's own VMs: query-blockstats
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
