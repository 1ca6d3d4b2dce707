"""Assemble the agent's metrics: a private registry, the collectors, and their trio refresher.

Usage (the agent's main)::

    stats = AgentStats()
    registry, refresher = build_registry(Roots(), stats, tee=detect_tee().tee.value)
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)        # first snapshot is taken before this returns
        ...                                       # serve HTTP /metrics and GetMetrics
        body = render_text(registry)              # for the GetMetrics RPC

The registry is a private :class:`CollectorRegistry`, never client_python's global one, so
that nothing else in the process (or in tests) leaks series into the agent's output.

The refresher reads every source concurrently, each in a worker thread with its own
deadline (``read_deadline``); a source that misses it exports nothing and
``cvm_scrape_collector_success`` 0 until a later refresh succeeds. A read that is stuck in
the kernel cannot be cancelled: its thread is abandoned, and the source is skipped (still
failing) until that thread returns, so a hung sysfs file costs one thread, not one per
refresh.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from guest_agent.collectors.agent import AgentStats, AgentStatsCollector
from guest_agent.collectors.base import (
    CollectorUnavailable,
    Reading,
    SlotState,
    SnapshotExporter,
    SnapshotSource,
)
from guest_agent.collectors.cpuidle import CpuidleCollector
from guest_agent.collectors.haltpoll import HaltpollCollector
from guest_agent.collectors.info import GuestInfoCollector
from guest_agent.collectors.meminfo import MeminfoCollector
from guest_agent.collectors.procstat import ProcStatCollector
from guest_agent.collectors.psi import PressureCollector
from guest_agent.collectors.swiotlb import MountFunction, SwiotlbCollector

T = TypeVar("T")

ReadRunner = Callable[[Callable[[], Any]], Awaitable[Any]]
"""Runs a blocking read and returns its result (a worker thread in production)."""


@dataclass(frozen=True)
class Roots:
    """Where the kernel's file systems are. Defaults are the real ones."""

    sysfs: Path = Path("/")
    """The directory that holds ``sys/`` (so ``sysfs / "sys/devices/..."``)."""
    procfs: Path = Path("/proc")
    debugfs: Path = Path("/sys/kernel/debug")

    @classmethod
    def under(cls, tree: Path) -> Roots:
        """Roots inside a recorded tree (``tree/sys``, ``tree/proc``, ``tree/sys/kernel/debug``)."""
        return cls(sysfs=tree, procfs=tree / "proc", debugfs=tree / "sys/kernel/debug")


async def _in_worker_thread(limiter: trio.CapacityLimiter, function: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(function, abandon_on_cancel=True, limiter=limiter)


class Refresher:
    """Refreshes every source's snapshot every ``interval`` seconds (a trio task)."""

    def __init__(
        self,
        slots: Sequence[SlotState],
        *,
        interval: float,
        read_deadline: float,
        run_read: ReadRunner | None = None,
    ) -> None:
        self.slots = tuple(slots)
        self.interval = interval
        self.read_deadline = read_deadline
        if run_read is None:
            limiter = trio.CapacityLimiter(max(len(self.slots), 1))
            run_read = functools.partial(_in_worker_thread, limiter)
        self._run_read: ReadRunner = run_read
        self.refreshes = 0

    async def _refresh_slot(self, slot: SlotState) -> None:
        started = trio.current_time()
        if slot.in_flight:
            slot.reading = Reading(None, False, 0.0, "previous read still running")
            return

        def read() -> object:
            try:
                return slot.source.read()
            finally:
                slot.in_flight = False

        slot.in_flight = True
        snapshot: object | None = None
        error = ""
        with trio.move_on_after(self.read_deadline) as scope:
            try:
                snapshot = await self._run_read(read)
            except CollectorUnavailable as exc:
                error = str(exc)
            except Exception as exc:
                # Unparseable kernel output or a bug in one collector must cost that
                # collector's series, not the agent: the error is kept for logs.
                error = f"{type(exc).__name__}: {exc}"
        if scope.cancelled_caught:
            error = f"read missed its {self.read_deadline:g} s deadline"
        elapsed = trio.current_time() - started
        slot.reading = Reading(snapshot if not error else None, not error, elapsed, error)

    async def refresh_once(self) -> None:
        """Refresh every source concurrently; returns when all finished or missed their deadline."""
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(self._refresh_slot, slot)
        self.refreshes += 1

    def errors(self) -> dict[str, str]:
        """The last error per failing source (for logs and GetInfo-style diagnostics)."""
        return {
            slot.source.name: slot.reading.error
            for slot in self.slots
            if slot.reading is not None and not slot.reading.success
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take a first snapshot, report started, then refresh every ``interval`` until cancelled."""
        await self.refresh_once()
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.refresh_once()


def read_kernel_release(procfs: Path) -> str:
    try:
        return (procfs / "sys/kernel/osrelease").read_text().strip()
    except OSError:
        return os.uname().release


def build_registry(
    roots: Roots,
    stats: AgentStats,
    *,
    tee: str = "none",
    kernel_release: str | None = None,
    mount_debugfs: MountFunction | None = None,
    refresh_interval: float = 5.0,
    read_deadline: float = 2.0,
    run_read: ReadRunner | None = None,
    process_metrics: bool = True,
) -> tuple[CollectorRegistry, Refresher]:
    """A private registry with every guest collector, and the refresher that feeds them.

    ``tee`` is the verdict of :func:`guest_agent.tee.detect_tee` (``"sev-snp"``, ``"tdx"``,
    ``"none"``). ``mount_debugfs`` (e.g. :func:`.swiotlb.mount_debugfs_readonly`) allows the
    swiotlb collector to mount debugfs read-only when it is absent. ``process_metrics`` adds
    client_python's ``cvm_guest_agent_process_*`` (RSS, CPU seconds, fds) of the agent itself.
    """
    sources: list[SnapshotSource[Any]] = [
        CpuidleCollector(roots.sysfs),
        HaltpollCollector(roots.sysfs),
        SwiotlbCollector(roots.debugfs, mount=mount_debugfs),
        ProcStatCollector(roots.procfs),
        PressureCollector(roots.procfs),
        MeminfoCollector(roots.procfs),
    ]
    slots = [SlotState(source) for source in sources]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GuestInfoCollector(tee, kernel_release or read_kernel_release(roots.procfs)))
    registry.register(SnapshotExporter(slots))
    registry.register(AgentStatsCollector(stats))
    if process_metrics:
        ProcessCollector(namespace="cvm_guest_agent", registry=registry)
    refresher = Refresher(slots, interval=refresh_interval, read_deadline=read_deadline, run_read=run_read)
    return registry, refresher
