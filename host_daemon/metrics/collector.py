"""The host exporter: per-VM snapshots refreshed by trio, served by a client_python collector.

:class:`HostCollector` follows whatever VMs its *provider* (a plain ``Callable[[],
Iterable[VMView]]``) names at each refresh; :func:`host_daemon.metrics.wiring.manager_views`
builds one from the daemon's :class:`~host_daemon.vms.VMManager`. Every ``interval`` (1 s by
default) it refreshes every VM concurrently, within ``deadline`` (0.5 s by default):

``procfs``  QEMU's CPU seconds by mode and resident memory, each vCPU thread's run and
            run-queue wait time, the vhost workers' CPU (:mod:`.procfs`; every VM in one
            worker-thread call per refresh, see :meth:`HostCollector._refresh_procfs`);
``qmp``     KVM statistics through QMP ``query-stats`` summed over vCPUs (and exits per vCPU),
            names and units from ``query-stats-schemas`` (asked once per QEMU process).
            Without a ``kvm`` provider (TCG, QEMU < 7.1) the VM gets
            ``cvm_vm_kvm_stats_available 0`` and no KVM series (no invented zeros), and the
            refresh asks ``query-status`` instead: either way one QMP round trip per refresh
            tells whether QEMU's main loop answers.

and, in a task of its own per VM at ``guest_interval``, ``agent``: the guest agent's
``GetMetrics`` over its channel (``cvm_agent_up``), kept as text and re-exported with the
``vm`` label by :meth:`HostCollector.guest_families` (parsed only when scraped).

A scrape (:meth:`HostCollector.collect`, called by client_python on the HTTP thread) reads
only the stored snapshots, so it never waits for a VM. A VM whose QEMU is stuck (SIGSTOP, a
QMP monitor that never answers) costs its own refresh at most ``deadline`` seconds and shows
as ``cvm_vm_collector_success{vm,collector="qmp"} 0`` and a growing
``cvm_vm_collector_timeouts_total``; the other VMs' snapshots stay fresh. A QMP command that
missed its deadline is not followed by another until QEMU's late reply arrives (the QMP
client counts it in ``dropped_replies``), so a stopped QEMU never has more than one of our
commands queued on the monitor it shares with the VM lifecycle.

Self-monitoring follows node_exporter: ``cvm_scrape_collector_duration_seconds{collector}``
(the longest of the last refresh over the VMs) and ``cvm_scrape_collector_success{collector}``
(1 when every VM's part succeeded), for ``collector`` in ``procfs``, ``qmp``, ``agent`` and
``libvirt``.

With ``libvirt`` (a :class:`~.libvirt.LibvirtFollower`, ``cvm-hostd --libvirt URI``) each refresh
first polls every libvirt domain in one worker-thread call within ``deadline``; a libvirt
domain's QMP part is that poll (part ``libvirt``), its procfs part the same as the daemon's own
VMs. Every VM the providers know is followed, running or not; only live ones are refreshed.

Labels stay bounded: ``vm`` is a VM name (the daemon validates it), ``vcpu`` an index below
the VM's vCPU count (per-vCPU KVM series only up to :data:`MAX_VCPU_SERIES` vCPUs), ``worker``
the index of a vhost worker ordered by thread id, ``kind``/``result``/``mode``/``phase``/
``collector`` fixed sets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Final

import structlog
import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cvm.v1 import agent_pb2, agent_pb2_grpc
from cvmcore.address import parse_address
from cvmcore.client import connect
from cvmcore.errors import DeadlineExceeded
from host_daemon.metrics.families import (
    device_families,
    info_families,
    kvm_families,
    proc_families,
    status_families,
)
from host_daemon.metrics.libvirt import DomainReading, LibvirtFollower
from host_daemon.metrics.parse import (
    GuestTextRejected,
    parse_blockstats,
    parse_stats_schemas,
    parse_vcpu_stats,
    relabel_guest_families,
    vcpu_stats_request,
)
from host_daemon.metrics.procfs import ProcfsReader, ProcReading
from host_daemon.metrics.state import GuestReading, PartResult, VMState, VMView
from host_daemon.qmp import CommandNotFound, QMPDeadline, QMPError, Runstate

log = structlog.get_logger("host_daemon.metrics")

DEFAULT_INTERVAL: Final = 1.0
DEFAULT_DEADLINE: Final = 0.5
DEFAULT_GUEST_INTERVAL: Final = 5.0
DEFAULT_AGENT_TIMEOUT: Final = 2.0
PROCFS_THREADS: Final = 4
#: The daemon's own VMs' disk counters (QMP ``query-blockstats``) are asked every this many
#: refreshes: a second QMP round trip on every refresh would double the exporter's QMP cost.
BLOCKSTATS_EVERY: Final = 5


GuestFetch = Callable[[], Awaitable[bytes]]
AgentSession = Callable[[str, float], AbstractAsyncContextManager[GuestFetch]]
"""Opens a channel to an agent address with a timeout; yields a function that fetches its text."""


class HostCollector(Collector):
    """Per-VM host metrics. Run :meth:`run` in a nursery; register it in a private registry."""

    def __init__(
        self,
        provider: Callable[[], Iterable[VMView]],
        *,
        interval: float = DEFAULT_INTERVAL,
        deadline: float = DEFAULT_DEADLINE,
        guest_interval: float = DEFAULT_GUEST_INTERVAL,
        agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
        procfs: ProcfsReader | Path | None = None,
        agent_session: AgentSession | None = None,
        libvirt: LibvirtFollower | None = None,
    ) -> None:
        self.provider = provider
        self.interval = interval
        self.deadline = deadline
        self.guest_interval = guest_interval
        self.agent_timeout = agent_timeout
        self.procfs = procfs if isinstance(procfs, ProcfsReader) else ProcfsReader(procfs or Path("/proc"))
        self.vms: dict[str, VMState] = {}
        self.refreshes = 0
        self._nursery: trio.Nursery | None = None
        self._threads = trio.CapacityLimiter(PROCFS_THREADS)
        self._procfs_busy: set[str] = set()  # VMs whose procfs read runs in a thread right now
        self._agent_session: AgentSession = agent_session or open_agent_session
        self.libvirt = libvirt
        self._libvirt_views: list[VMView] = []
        self._libvirt_error = ""  # why the last poll of the whole connection failed
        self._libvirt_timed_out = False
        self._libvirt_busy = False  # a poll runs in a worker thread right now

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh once, report started, then every ``interval`` until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.refresh_once()
            task_status.started()
            due = trio.current_time()
            while True:
                # A fixed period, not interval + refresh time; after an overrun, refresh at once.
                due = max(due + self.interval, trio.current_time())
                await trio.sleep_until(due)
                await self.refresh_once()

    def sync(self, views: Iterable[VMView]) -> None:
        """Follow exactly ``views``: new VMs get state (and an agent task), gone ones lose it."""
        current: dict[str, VMView] = {view.name: view for view in views}
        for name, old in list(self.vms.items()):
            view = current.get(name)
            if view is None or not view.same_process(old.view):
                if old.agent_scope is not None:
                    old.agent_scope.cancel()
                del self.vms[name]
        for name, view in current.items():
            known = self.vms.get(name)
            if known is not None:
                known.view = view  # the same process: fresher boot phases, vCPU list, version
                continue
            state = self.vms[name] = VMState(view)
            if view.agent_address and view.live and self._nursery is not None:
                state.agent_scope = trio.CancelScope()
                self._nursery.start_soon(self._follow_agent, state)

    async def refresh_once(self) -> None:
        """Ask the providers, then refresh every live VM concurrently.

        The daemon's own VMs come from ``provider``; with ``libvirt``, its domains are read
        first (one poll in a worker thread, within ``deadline``), then each VM's procfs and QMP
        parts run within ``deadline``. A provider that fails (the daemon's database busy, a
        bug, libvirt gone) costs this refresh that provider's new VM list, not the exporter:
        the VMs of its last good answer are refreshed. A daemon VM and a libvirt domain of the
        same name: the daemon's VM is the one followed.
        """
        if self.libvirt is not None:
            await self._poll_libvirt()
        try:
            own = list(self.provider())
        except Exception:
            log.exception("metrics_provider_failed")
            own = [state.view for state in self.vms.values() if state.view.source != "libvirt"]
        names = {view.name for view in own}
        self.sync(own + [view for view in self._libvirt_views if view.name not in names])
        states = [state for state in self.vms.values() if state.view.live]
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresh_procfs, states)
            for state in states:
                if state.view.domain is not None:
                    self._take_domain(state, state.view.domain, started)
                else:
                    nursery.start_soon(self._refresh_qmp, state)
        self.refreshes += 1

    # -- libvirt -----------------------------------------------------------------------------

    async def _poll_libvirt(self) -> None:
        """One :meth:`LibvirtFollower.poll` in a worker thread, within ``deadline``.

        A poll that misses the deadline is abandoned (its thread finishes on its own) and no
        other starts until it has; meanwhile the domains keep their last views, their
        ``libvirt`` part marked timed out.
        """
        follower = self.libvirt
        assert follower is not None
        self._libvirt_timed_out = False
        if self._libvirt_busy:
            self._libvirt_error, self._libvirt_timed_out = "an earlier libvirt poll has not returned", True
            return

        def poll() -> list[DomainReading]:
            try:
                return follower.poll()
            finally:
                self._libvirt_busy = False

        self._libvirt_busy = True
        readings: list[DomainReading] | None = None
        with trio.move_on_after(self.deadline) as scope:
            try:
                readings = await trio.to_thread.run_sync(poll, abandon_on_cancel=True, limiter=self._threads)
            except Exception as exc:  # the connection failed: every domain keeps its last view
                if self._libvirt_error == "":
                    log.warning("libvirt_poll_failed", uri=follower.uri, error=str(exc))
                self._libvirt_error = f"{type(exc).__name__}: {exc}"
                return
        if scope.cancelled_caught or readings is None:
            self._libvirt_error = f"libvirt poll missed its {self.deadline:g} s deadline"
            self._libvirt_timed_out = True
            return
        if self._libvirt_error:
            log.info("libvirt_poll_recovered", uri=follower.uri)
        self._libvirt_error = ""
        self._libvirt_views = [libvirt_view(reading) for reading in readings]

    def _take_domain(self, state: VMState, domain: DomainReading, started: float) -> None:
        """A libvirt domain's QMP part is its poll: KVM statistics from the passthrough."""
        state.schemas = domain.schemas
        state.kvm = domain.kvm
        error = self._libvirt_error or domain.error
        timed_out = self._libvirt_timed_out
        self._finish(state, "libvirt", started, error, timed_out, duration=domain.duration_seconds)

    def _finish(
        self,
        state: VMState,
        part: str,
        started: float,
        error: str = "",
        timed_out: bool = False,
        *,
        duration: float | None = None,
    ) -> None:
        previous = state.parts.get(part)
        took = trio.current_time() - started if duration is None else duration
        state.parts[part] = PartResult(not error, took, error, timed_out)
        if previous is not None and previous.success != (not error):  # log changes, not every refresh
            if error:
                log.warning("vm_metrics_failing", vm=state.view.name, collector=part, error=error)
            else:
                log.info("vm_metrics_recovered", vm=state.view.name, collector=part)
        if timed_out:
            state.timeouts[part] += 1

    # -- procfs ----------------------------------------------------------------------------

    async def _refresh_procfs(self, states: list[VMState]) -> None:
        """Read every VM's procfs files in one worker thread, each VM's result kept as it comes.

        One thread call per refresh rather than one per VM: the hop to a worker thread costs
        more CPU than the reads themselves (``benchmarks/host_scale.py`` measures the total).
        Reading ``/proc/<pid>/stat``, ``schedstat`` and ``comm`` of another process does not
        wait on that process (a stopped or stuck QEMU answers at once). Should a read hang
        all the same, the batch misses the deadline: the VMs it had not reached are marked
        timed out, the thread stops after the hung read, and that VM alone is left out of
        later batches until its read returns (one abandoned thread per hung VM, at most
        :data:`PROCFS_THREADS`).
        """
        started = trio.current_time()
        pending: list[VMState] = []
        for state in states:
            if state.view.pid <= 0:
                state.proc = None
                if state.view.source != "libvirt" or (self.libvirt is not None and self.libvirt.local):
                    self._finish(state, "procfs", started, "no QEMU process")
            elif state.view.name in self._procfs_busy:
                state.proc = None
                self._finish(state, "procfs", started, "an earlier procfs read has not returned", True)
            else:
                pending.append(state)
        if not pending:
            return
        done: dict[str, tuple[ProcReading | None, str, float]] = {}
        abandoned = threading.Event()

        def read_all() -> None:
            for state in pending:
                if abandoned.is_set():
                    return
                view, began = state.view, time.monotonic()
                self._procfs_busy.add(view.name)
                try:
                    reading = self.procfs.read(view.pid, view.vcpu_tids, state.names, view.tap)
                    done[view.name] = (reading, "", time.monotonic() - began)
                except (OSError, ValueError) as exc:
                    done[view.name] = (None, f"{type(exc).__name__}: {exc}", time.monotonic() - began)
                finally:
                    self._procfs_busy.discard(view.name)

        with trio.move_on_after(self.deadline) as scope:
            await trio.to_thread.run_sync(read_all, abandon_on_cancel=True, limiter=self._threads)
        if scope.cancelled_caught:
            abandoned.set()
        for state in pending:
            result = done.get(state.view.name)
            if result is None:
                state.proc = None
                self._finish(
                    state, "procfs", started, f"procfs read missed its {self.deadline:g} s deadline", True
                )
            else:
                state.proc, error, seconds = result
                self._finish(state, "procfs", started, error, duration=seconds)

    # -- QMP: KVM statistics, or liveness -------------------------------------------------------------------

    async def _refresh_qmp(self, state: VMState) -> None:
        started = trio.current_time()
        qmp = state.view.qmp
        if qmp is None or qmp.runstate is not Runstate.RUNNING:
            state.kvm = None
            self._finish(state, "qmp", started, "no QMP connection")
            return
        if state.qmp_unanswered_mark is not None:
            if qmp.dropped_replies <= state.qmp_unanswered_mark:
                state.kvm = None
                self._finish(state, "qmp", started, "QEMU has not answered our previous QMP command", True)
                return
            state.qmp_unanswered_mark = None  # the late reply came: QEMU is responsive again
        try:
            if state.schemas is None:
                try:
                    reply = await qmp.execute("query-stats-schemas", deadline=self.deadline)
                except CommandNotFound:
                    reply = []  # QEMU < 7.1: no statistics at all
                state.schemas = parse_stats_schemas(reply)
                state.stats_request = vcpu_stats_request(state.schemas)
            remaining = max(self.deadline - (trio.current_time() - started), 0.01)
            if not state.kvm_available:
                state.kvm = None
                await qmp.execute("query-status", deadline=remaining)  # is QEMU's main loop alive?
            else:
                reply = await qmp.execute("query-stats", state.stats_request, deadline=remaining)
                state.kvm = parse_vcpu_stats(reply, state.schemas)
            if state.blocks is None or self.refreshes % BLOCKSTATS_EVERY == 0:
                remaining = max(self.deadline - (trio.current_time() - started), 0.01)
                try:
                    state.blocks = parse_blockstats(await qmp.execute("query-blockstats", deadline=remaining))
                except CommandNotFound:
                    state.blocks = ()
        except QMPDeadline as exc:
            state.kvm = None
            state.qmp_unanswered_mark = qmp.dropped_replies
            self._finish(state, "qmp", started, str(exc), True)
            return
        except (QMPError, ValueError, KeyError, TypeError) as exc:
            state.kvm = None
            self._finish(state, "qmp", started, f"{type(exc).__name__}: {exc}")
            return
        self._finish(state, "qmp", started)

    # -- the guest agent ---------------------------------------------------------------------

    async def _follow_agent(self, state: VMState) -> None:
        """Keep a channel to the VM's agent and fetch its metrics every ``guest_interval``."""
        assert state.agent_scope is not None
        with state.agent_scope:
            while True:
                started = trio.current_time()
                if state.view.state == "starting":
                    # The boot task dials the agent once the guest's vsock device has started; a
                    # dial before that can wedge vhost-device-vsock (host_daemon.vsock_backend).
                    await trio.sleep_until(started + self.guest_interval)
                    continue
                try:
                    async with self._agent_session(state.view.agent_address, self.agent_timeout) as fetch:
                        while True:
                            started = trio.current_time()
                            text = await fetch()
                            state.guest = GuestReading(up=True, text=text)
                            self._finish(state, "agent", started)
                            await trio.sleep_until(started + self.guest_interval)
                except Exception as exc:  # whatever a guest (or its channel) does stays with this VM
                    timed_out = isinstance(exc, DeadlineExceeded | trio.TooSlowError)
                    state.guest = GuestReading(up=False, error=f"{type(exc).__name__}: {exc}")
                    self._finish(state, "agent", started, state.guest.error, timed_out)
                await trio.sleep_until(started + self.guest_interval)

    def guest_families(self, name: str, host: str = "") -> list[Metric] | None:
        """The VM's guest series with ``vm=<name>``, ``tee`` and ``host`` (None: no such VM).

        Parses at most once per reading; ``host`` is the daemon's one host label.
        """
        state = self.vms.get(name)
        if state is None:
            return None
        reading = state.guest
        if reading is None or not reading.up:
            return []
        if reading.rendered is None:
            try:
                target = {"tee": state.view.tee, **({"host": host} if host else {})}
                reading.rendered = relabel_guest_families(
                    reading.text.decode("utf-8", "replace"), name, target=target
                )
            except (GuestTextRejected, ValueError) as exc:
                reading.error = f"guest exposition rejected: {exc}"
                reading.rendered = []
        return reading.rendered

    # -- exposition --------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return []  # registration must not run collect() (client_python rule)

    def collect(self) -> Iterable[Metric]:
        states = sorted(self.vms.values(), key=lambda s: s.view.name)
        yield from info_families(states)
        yield from kvm_families(states)
        yield from proc_families(states)
        yield from device_families(states)
        yield from status_families(states)


def libvirt_view(reading: DomainReading) -> VMView:
    """The exporter's view of one libvirt domain (its QEMU pid only while it runs)."""
    config = reading.config
    return VMView(
        name=config.name,
        tee=config.tee,
        machine=config.machine,
        qemu_version=reading.qemu_version,
        pid=reading.pid if reading.live else 0,
        state=reading.state,
        vcpus=config.vcpus,
        memory_bytes=config.memory_bytes,
        started_at=reading.started_at if reading.live else 0.0,
        source="libvirt",
        domain=reading,
    )


# --------------------------------------------------------------------------------------------
# The agent call (I/O at the edge)


@asynccontextmanager
async def open_agent_session(agent_address: str, timeout: float) -> AsyncIterator[GuestFetch]:
    """A channel to the agent at ``agent_address``; yields a function calling ``GetMetrics``.

    The channel (and, for vsock, its relay) stays open across fetches: a new gRPC connection
    per fetch would cost more CPU than the fetch. Each call is bounded by ``timeout``.
    """
    async with connect(parse_address(agent_address), timeout=timeout) as client:
        stub = agent_pb2_grpc.GuestAgentStub(client.channel)

        async def fetch() -> bytes:
            response = await client.call(stub.GetMetrics, agent_pb2.GetMetricsRequest())
            return bytes(response.text)

        yield fetch
