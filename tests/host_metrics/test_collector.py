"""HostCollector: KVM statistics over (fake) QMP, procfs, deadlines per VM, the agent re-export."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from host_daemon.metrics.collector import HostCollector
from host_daemon.metrics.procfs import ProcfsReader, ProcReading, ThreadNames
from host_daemon.metrics.state import VMView
from tests.host_metrics.conftest import QEMU_PID, VCPU_TIDS, ProcTree, fake_qmp_client, make_proc_tree
from tests.host_metrics.fake_qmp import FakeQemu


def samples(collector: HostCollector | Iterable[Metric]) -> dict[str, list[Sample]]:
    families = collector.collect() if isinstance(collector, HostCollector) else collector
    found: dict[str, list[Sample]] = {}
    for family in families:
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def value(found: dict[str, list[Sample]], name: str, **labels: str) -> float:
    matching = [s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, f"{name}{labels}: {found.get(name)}"
    return matching[0]


def views(*items: VMView) -> list[VMView]:
    return list(items)


async def test_kvm_statistics_through_query_stats(tmp_path: Path, proc_tree: ProcTree) -> None:
    fake = FakeQemu(kvm=True)
    async with fake_qmp_client(tmp_path, fake) as qmp:
        view = VMView("vm0", tee="sev-snp", machine="q35", qemu_version="10.0.2", pid=QEMU_PID, qmp=qmp)
        collector = HostCollector(lambda: [view], procfs=ProcfsReader(proc_tree.root))
        await collector.refresh_once()
        await collector.refresh_once()
    found = samples(collector)
    # the schema is asked once; the disks on the first refresh and every BLOCKSTATS_EVERY-th
    assert fake.calls == {"query-stats-schemas": 1, "query-stats": 2, "query-blockstats": 1}
    [request] = fake.last_stats_arguments["providers"]
    assert request["provider"] == "kvm" and "halt_poll_success_ns" in request["names"]
    assert "halt_wait_hist" not in request["names"]  # only what is exported is asked for
    assert value(found, "cvm_vm_kvm_stats_available", vm="vm0") == 1
    # recorded values, advanced by 17 per call on each of two vCPUs
    assert value(found, "cvm_vm_kvm_exits_total", vm="vm0") == 183452 + 184452 + 4 * 17
    assert value(found, "cvm_vm_kvm_exits_by_kind_total", vm="vm0", kind="halt") == 61234 + 61334 + 4 * 17
    assert value(found, "cvm_vm_kvm_vcpu_exits_total", vm="vm0", vcpu="1") == 184452 + 2 * 17
    assert value(found, "cvm_vm_kvm_halt_poll_seconds_total", vm="vm0", result="fail") == pytest.approx(
        2 * (2.5 + 0.002)
    )
    assert value(found, "cvm_vm_kvm_halt_wait_seconds_total", vm="vm0") == pytest.approx(2 * (75 + 0.002))
    assert value(found, "cvm_vm_collector_success", vm="vm0", collector="qmp") == 1
    assert value(found, "cvm_vm_info", vm="vm0", tee="sev-snp", machine="q35", qemu_version="10.0.2") == 1


async def test_tcg_says_unavailable_instead_of_zeros(tmp_path: Path, proc_tree: ProcTree) -> None:
    fake = FakeQemu(kvm=False)
    async with fake_qmp_client(tmp_path, fake) as qmp:
        view = VMView("vm0", pid=QEMU_PID, qmp=qmp)
        collector = HostCollector(lambda: [view], procfs=ProcfsReader(proc_tree.root))
        await collector.refresh_once()
        await collector.refresh_once()
    found = samples(collector)
    # no kvm provider: query-stats is never asked; query-status checks that QEMU answers
    assert fake.calls == {"query-stats-schemas": 1, "query-status": 2, "query-blockstats": 1}
    assert value(found, "cvm_vm_kvm_stats_available", vm="vm0") == 0
    assert "cvm_vm_kvm_exits_total" not in found
    assert "cvm_vm_kvm_halt_poll_seconds_total" not in found
    assert value(found, "cvm_vm_collector_success", vm="vm0", collector="qmp") == 1


async def test_procfs_qemu_vcpus_and_vhost_threads(proc_tree: ProcTree) -> None:
    view = VMView("vm0", pid=QEMU_PID, vcpu_tids=VCPU_TIDS)
    reader = ProcfsReader(proc_tree.root, clock_ticks=100, page_size=4096)
    collector = HostCollector(lambda: [view], procfs=reader)
    await collector.refresh_once()
    found = samples(collector)
    assert value(found, "cvm_vm_qemu_cpu_seconds_total", vm="vm0", mode="user") == 2.5
    assert value(found, "cvm_vm_qemu_cpu_seconds_total", vm="vm0", mode="system") == 0.5
    assert value(found, "cvm_vm_qemu_resident_memory_bytes", vm="vm0") == 1000 * 4096
    assert value(found, "cvm_vm_vcpu_seconds_total", vm="vm0", vcpu="1") == pytest.approx(VCPU_TIDS[1] / 1000)
    assert value(found, "cvm_vm_vcpu_delay_seconds_total", vm="vm0", vcpu="0") == pytest.approx(
        VCPU_TIDS[0] * 1e-6
    )
    assert value(found, "cvm_vm_vhost_worker_cpu_seconds_total", vm="vm0", worker="0") == 1.0
    # no QMP: KVM part fails, says why; procfs part fine
    assert value(found, "cvm_vm_collector_success", vm="vm0", collector="qmp") == 0
    assert value(found, "cvm_vm_collector_success", vm="vm0", collector="procfs") == 1
    assert "cvm_agent_up" not in found  # no agent channel, no agent series


async def test_vhost_kernel_threads_before_linux_6_4(tmp_path: Path) -> None:
    tree = make_proc_tree(tmp_path, release="6.1.0-28-amd64", kernel_vhost=True)
    view = VMView("vm0", pid=QEMU_PID, vcpu_tids=VCPU_TIDS)
    collector = HostCollector(lambda: [view], procfs=ProcfsReader(tree.root, clock_ticks=100))
    await collector.refresh_once()
    assert value(samples(collector), "cvm_vm_vhost_worker_cpu_seconds_total", vm="vm0", worker="0") == 1.0


async def test_gone_process_and_vanished_vcpu_thread(proc_tree: ProcTree) -> None:
    gone = VMView("gone", pid=99999)
    partial = VMView("vm0", pid=QEMU_PID, vcpu_tids=(*VCPU_TIDS, 4299))
    collector = HostCollector(lambda: [gone, partial], procfs=ProcfsReader(proc_tree.root))
    await collector.refresh_once()
    found = samples(collector)
    assert value(found, "cvm_vm_collector_success", vm="gone", collector="procfs") == 0
    assert value(found, "cvm_scrape_collector_success", collector="procfs") == 0
    assert {s.labels["vcpu"] for s in found["cvm_vm_vcpu_seconds_total"]} == {"0", "1"}


async def test_stuck_vm_costs_its_deadline_only(tmp_path: Path, proc_tree: ProcTree) -> None:
    stuck_fake, good_fake = FakeQemu(), FakeQemu()
    async with (
        fake_qmp_client(tmp_path, stuck_fake, "stuck") as stuck_qmp,
        fake_qmp_client(tmp_path, good_fake, "good") as good_qmp,
    ):
        stuck_fake.stop()
        vms = views(
            VMView("stuck", pid=QEMU_PID, qmp=stuck_qmp),
            VMView("good", pid=QEMU_PID, qmp=good_qmp),
        )
        collector = HostCollector(lambda: vms, procfs=ProcfsReader(proc_tree.root), deadline=1.0)
        started = trio.current_time()
        await collector.refresh_once()
        first = trio.current_time() - started
        started = trio.current_time()
        await collector.refresh_once()  # no second command is queued behind the unanswered one
        second = trio.current_time() - started
        found = samples(collector)
        # its deadline plus slack for a loaded machine; the second far below a deadline
        assert first < 1.0 + 1.0 and second < 0.5, (first, second)
        assert value(found, "cvm_vm_collector_success", vm="stuck", collector="qmp") == 0
        assert value(found, "cvm_vm_collector_timeouts_total", vm="stuck", collector="qmp") == 2
        assert value(found, "cvm_vm_collector_success", vm="good", collector="qmp") == 1
        assert {s.labels["vm"] for s in found["cvm_vm_kvm_exits_total"]} == {"good"}
        assert good_fake.calls["query-stats"] == 2
        # QEMU comes back: the late reply arrives, the next refresh asks again and succeeds
        stuck_fake.cont()
        await stuck_qmp.execute("query-status", deadline=2)  # after the late reply to ours
        assert stuck_qmp.dropped_replies == 1
        await collector.refresh_once()
        assert value(samples(collector), "cvm_vm_collector_success", vm="stuck", collector="qmp") == 1


async def test_vms_come_and_go(proc_tree: ProcTree) -> None:
    current: list[VMView] = [VMView("a", pid=QEMU_PID), VMView("b", pid=QEMU_PID)]
    collector = HostCollector(lambda: current, procfs=ProcfsReader(proc_tree.root))
    await collector.refresh_once()
    assert {s.labels["vm"] for s in samples(collector)["cvm_vm_info"]} == {"a", "b"}
    current = [VMView("b", pid=QEMU_PID)]
    await collector.refresh_once()
    assert {s.labels["vm"] for s in samples(collector)["cvm_vm_info"]} == {"b"}
    assert value(samples(collector), "cvm_hostd_vms_followed") == 1


async def test_boot_phases(proc_tree: ProcTree) -> None:
    view = VMView(
        "vm0",
        pid=QEMU_PID,
        boot_phases={"spawn": 0.05, "firmware": 1.5, "kernel": 2.25},
        boot_unmeasured={"userspace": "the daemon was not running when this phase ended"},
    )
    collector = HostCollector(lambda: [view], procfs=ProcfsReader(proc_tree.root))
    await collector.refresh_once()
    found = samples(collector)
    assert value(found, "cvm_vm_boot_phase_seconds", vm="vm0", phase="firmware") == 1.5
    assert len(found["cvm_vm_boot_phase_seconds"]) == 3
    assert value(found, "cvm_vm_boot_phase_unmeasured", vm="vm0", phase="userspace") == 1


@pytest.mark.slow
async def test_guest_metrics_reexported_with_vm_label(agent_on_snp_tree: Path, proc_tree: ProcTree) -> None:
    good = VMView("vm0", tee="sev-snp", pid=QEMU_PID, agent_address=f"unix://{agent_on_snp_tree}")
    down = VMView("vm1", pid=QEMU_PID, agent_address=f"unix://{agent_on_snp_tree}.missing")
    collector = HostCollector(lambda: [good, down], procfs=ProcfsReader(proc_tree.root), guest_interval=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.run)
        with trio.fail_after(15):
            while collector.vms["vm0"].guest is None or collector.vms["vm1"].guest is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    found = samples(collector)
    assert value(found, "cvm_agent_up", vm="vm0") == 1
    assert value(found, "cvm_agent_up", vm="vm1") == 0
    assert value(found, "cvm_vm_collector_success", vm="vm1", collector="agent") == 0
    families = collector.guest_families("vm0")
    assert families is not None
    by_name = {f.name: f for f in families}
    assert by_name["cvm_guest_agent_rpc_duration_seconds"].type == "histogram"
    assert by_name["cvm_guest_swiotlb_size_bytes"].type == "gauge"
    guest = samples(families)
    assert value(guest, "cvm_guest_info", vm="vm0", tee="sev-snp") == 1
    assert value(guest, "cvm_guest_swiotlb_size_bytes", vm="vm0") == 1073741824
    assert "cvm_guest_scrape_collector_success" in guest and "cvm_scrape_collector_success" not in guest
    assert collector.guest_families("vm1") == []
    assert collector.guest_families("nope") is None


async def test_a_failing_provider_keeps_the_last_vms(proc_tree: ProcTree) -> None:
    answers: list[list[VMView] | Exception] = [
        [VMView("a", pid=QEMU_PID)],
        RuntimeError("database is locked"),
    ]

    def provider() -> list[VMView]:
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    collector = HostCollector(provider, procfs=ProcfsReader(proc_tree.root))
    await collector.refresh_once()
    await collector.refresh_once()  # the provider raises: the exporter carries on with "a"
    assert collector.refreshes == 2
    assert value(samples(collector), "cvm_vm_collector_success", vm="a", collector="procfs") == 1


class StuckReader(ProcfsReader):
    """A procfs whose reads of one pid never return (what a deadline is for)."""

    def __init__(self, root: Path, stuck_pid: int, release: threading.Event) -> None:
        super().__init__(root)
        self.stuck_pid, self.release = stuck_pid, release

    def read(self, pid: int, vcpu_tids: Sequence[int], names: ThreadNames, tap: str = "") -> ProcReading:
        if pid == self.stuck_pid:
            self.release.wait(10)
        return super().read(pid, vcpu_tids, names, tap)


async def test_a_hung_procfs_read_costs_only_its_vm(proc_tree: ProcTree) -> None:
    shutil.copytree(proc_tree.root / str(QEMU_PID), proc_tree.root / "4343")
    release = threading.Event()
    vms = [VMView("a", pid=QEMU_PID), VMView("stuck", pid=4343), VMView("z", pid=QEMU_PID)]
    collector = HostCollector(lambda: vms, procfs=StuckReader(proc_tree.root, 4343, release), deadline=1.0)
    try:
        started = trio.current_time()
        await collector.refresh_once()
        assert trio.current_time() - started < 1.0 + 1.0
        found = samples(collector)
        assert value(found, "cvm_vm_collector_success", vm="a", collector="procfs") == 1
        assert value(found, "cvm_vm_collector_timeouts_total", vm="stuck", collector="procfs") == 1
        assert value(found, "cvm_vm_collector_timeouts_total", vm="z", collector="procfs") == 1
        await collector.refresh_once()  # "stuck" is left out; the others are read again
        found = samples(collector)
        assert value(found, "cvm_vm_collector_success", vm="z", collector="procfs") == 1
        assert value(found, "cvm_vm_collector_timeouts_total", vm="stuck", collector="procfs") == 2
        assert value(found, "cvm_vm_collector_timeouts_total", vm="a", collector="procfs") == 0
        release.set()
        with trio.fail_after(10):  # the abandoned thread finishes its read and says so
            while "stuck" in collector._procfs_busy:  # noqa: ASYNC110 (set by a thread, not a task)
                await trio.sleep(0.01)
        await collector.refresh_once()  # its read returned: it is read again
        assert value(samples(collector), "cvm_vm_collector_success", vm="stuck", collector="procfs") == 1
    finally:
        release.set()
