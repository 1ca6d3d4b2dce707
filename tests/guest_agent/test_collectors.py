"""Collectors against fixture trees (exact values), the refresher (MockClock), the exposition."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from cvmcore import __version__
from cvmcore.metrics_http import render_text
from guest_agent.collectors import AgentStats, Roots, build_registry
from guest_agent.collectors.agent import AgentStatsCollector
from guest_agent.collectors.base import (
    CollectorUnavailable,
    SlotState,
    SnapshotExporter,
    SnapshotSource,
    read_kernel_file,
    read_sysfs_attribute,
)
from guest_agent.collectors.cpuidle import IdleState, state_labels
from guest_agent.collectors.info import GuestInfoCollector
from guest_agent.collectors.meminfo import MeminfoCollector, parse_meminfo
from guest_agent.collectors.procstat import parse_proc_stat
from guest_agent.collectors.psi import PressureTotal, parse_pressure
from guest_agent.collectors.registry import Refresher
from guest_agent.collectors.swiotlb import SwiotlbCollector, SwiotlbSnapshot, parse_swiotlb

Sysroot = Callable[[str], Path]
SYSROOTS = Path(__file__).resolve().parent.parent / "fixtures" / "sysroots"


async def inline(function: Callable[[], Any]) -> Any:
    """Run a read on the trio thread: deterministic under MockClock (no worker threads)."""
    return function()


async def registry_for(root: Path, stats: AgentStats | None = None, **kwargs: Any) -> CollectorRegistry:
    registry, refresher = build_registry(
        Roots.under(root),
        stats or AgentStats(),
        kernel_release="test",
        process_metrics=False,
        run_read=inline,
        **kwargs,
    )
    await refresher.refresh_once()
    return registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# ---- pure parsers ------------------------------------------------------------------------------


def test_swiotlb_all_ones_is_clamped() -> None:
    assert parse_swiotlb("524288\n", "1234\n", "18446744073709551615\n") == SwiotlbSnapshot(
        nslabs=524288, used_slabs=1234, used_hiwater_slabs=1234, clamped=True
    )
    assert parse_swiotlb("100", "18446744073709551615", None) == SwiotlbSnapshot(100, 0, None, True)
    assert parse_swiotlb("100", "500", "7") == SwiotlbSnapshot(100, 100, 100, True)
    assert parse_swiotlb("100", "5", "7") == SwiotlbSnapshot(100, 5, 7, False)


def test_pressure_lines() -> None:
    text = "some avg10=0.10 avg60=0.00 avg300=0.00 total=42\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"
    assert parse_pressure("io", text) == [PressureTotal("io", "some", 42), PressureTotal("io", "full", 7)]


def test_proc_stat_of_an_old_kernel_without_guest_columns() -> None:
    snapshot = parse_proc_stat("cpu  1 2 3 4\ncpu0 1 2 3 4 5 6 7\nintr 0\n", user_hz=100)
    assert snapshot.cpus[0].ticks == (1, 2, 3, 4, 5, 6, 7, 0)
    assert snapshot.cpus[0].guest_ticks == (0, 0)


def test_duplicate_state_names_are_made_unique() -> None:
    states = [IdleState(0, i, "C1", 0, 0, None, None, None, 0, False) for i in (1, 2)]
    assert state_labels(states) == {(0, 1): "C1#1", (0, 2): "C1#2"}


# ---- the recorded machine ----------------------------------------------------------------------


async def test_recorded_machine_exact_values() -> None:
    registry = await registry_for(SYSROOTS / "kvm-guest-6.18", tee="none")
    poll = {"cpu": "0", "state": "POLL"}
    halt0 = {"cpu": "0", "state": "haltpoll idle"}
    halt1 = {"cpu": "1", "state": "haltpoll idle"}

    assert value(registry, "cvm_guest_info", tee="none", kernel="test") == 1.0
    assert value(registry, "cvm_guest_cpuidle_info", driver="haltpoll", governor="haltpoll") == 1.0
    assert value(registry, "cvm_guest_cpuidle_state_time_seconds_total", **halt0) == 434.883613
    assert value(registry, "cvm_guest_cpuidle_state_time_seconds_total", **halt1) == 382.653136
    assert value(registry, "cvm_guest_cpuidle_state_time_seconds_total", **poll) == 0.0
    assert value(registry, "cvm_guest_cpuidle_state_entries_total", **halt0) == 52681
    assert value(registry, "cvm_guest_cpuidle_state_entries_total", **halt1) == 88993
    assert value(registry, "cvm_guest_cpuidle_state_above_total", **halt0) == 2
    assert value(registry, "cvm_guest_cpuidle_state_below_total", **halt0) == 0
    assert value(registry, "cvm_guest_cpuidle_state_rejected_total", **halt0) == 0
    assert value(registry, "cvm_guest_cpuidle_state_exit_latency_seconds", **halt0) == 1e-6
    assert value(registry, "cvm_guest_cpuidle_state_disabled", **poll) == 0

    assert value(registry, "cvm_guest_haltpoll_max_poll_seconds") == 0.0
    assert value(registry, "cvm_guest_haltpoll_grow_factor") == 2
    assert value(registry, "cvm_guest_haltpoll_grow_start_seconds") == 50e-6
    assert value(registry, "cvm_guest_haltpoll_shrink_divisor") == 2
    assert value(registry, "cvm_guest_haltpoll_allow_shrink") == 1

    # /proc/stat "cpu0 3349 0 1306 43415 48 0 17 26 0 0" at the USER_HZ of this machine
    user_hz = os.sysconf("SC_CLK_TCK")
    cpu0 = {"cpu": "0"}
    assert value(registry, "cvm_guest_cpu_seconds_total", mode="user", **cpu0) == pytest.approx(
        3349 / user_hz
    )
    assert value(registry, "cvm_guest_cpu_seconds_total", mode="idle", **cpu0) == pytest.approx(
        43415 / user_hz
    )
    assert value(registry, "cvm_guest_cpu_seconds_total", mode="steal", **cpu0) == pytest.approx(26 / user_hz)
    assert value(registry, "cvm_guest_cpu_guest_seconds_total", mode="user", **cpu0) == 0.0

    assert (
        value(registry, "cvm_guest_pressure_stalled_seconds_total", resource="cpu", kind="some") == 7.119948
    )
    assert value(registry, "cvm_guest_pressure_stalled_seconds_total", resource="io", kind="full") == 4.583458

    # no swiotlb in debugfs on that machine: unavailable, not an error elsewhere
    assert value(registry, "cvm_guest_swiotlb_size_bytes") is None
    assert value(registry, "cvm_scrape_collector_success", collector="swiotlb") == 0.0
    for collector in ("cpuidle", "haltpoll", "procstat", "pressure"):
        assert value(registry, "cvm_scrape_collector_success", collector=collector) == 1.0
        duration = value(registry, "cvm_scrape_collector_duration_seconds", collector=collector)
        assert duration is not None and duration >= 0


async def test_snp_guest_swiotlb_and_disabled_state() -> None:
    registry = await registry_for(SYSROOTS / "snp-guest", tee="sev-snp")
    assert value(registry, "cvm_guest_info", tee="sev-snp", kernel="test") == 1.0
    assert value(registry, "cvm_guest_swiotlb_size_bytes") == 524288 * 2048 == 1 << 30
    assert value(registry, "cvm_guest_swiotlb_used_bytes") == 1234 * 2048
    assert value(registry, "cvm_guest_swiotlb_used_max_bytes") == 1234 * 2048
    assert value(registry, "cvm_guest_swiotlb_reading_clamped") == 1.0
    assert value(registry, "cvm_guest_cpuidle_state_disabled", cpu="1", state="POLL") == 1.0
    assert value(registry, "cvm_guest_cpuidle_state_time_seconds_total", cpu="0", state="POLL") == 1.523
    assert value(registry, "cvm_guest_haltpoll_max_poll_seconds") == 200e-6
    assert value(registry, "cvm_scrape_collector_success", collector="pressure") == 0.0  # no PSI here


async def test_tdx_guest_without_cpuidle_driver() -> None:
    registry = await registry_for(SYSROOTS / "tdx-guest", tee="tdx")
    assert value(registry, "cvm_guest_cpuidle_info", driver="none", governor="menu") == 1.0
    assert "cvm_guest_cpuidle_state_time_seconds_total{" not in render_text(registry).decode()
    assert value(registry, "cvm_guest_swiotlb_used_max_bytes") == 65536 * 2048
    assert value(registry, "cvm_guest_swiotlb_reading_clamped") == 0.0
    assert value(registry, "cvm_guest_pressure_stalled_seconds_total", resource="cpu", kind="some") == 1.5
    assert value(registry, "cvm_guest_pressure_stalled_seconds_total", resource="cpu", kind="full") is None


async def test_an_empty_root_marks_every_kernel_collector_failed(tmp_path: Path) -> None:
    (tmp_path / "sys/devices/system/cpu").mkdir(parents=True)
    registry = await registry_for(tmp_path)
    for collector in ("cpuidle", "haltpoll", "swiotlb", "procstat", "pressure"):
        assert value(registry, "cvm_scrape_collector_success", collector=collector) == 0.0
    assert value(registry, "cvm_guest_info", tee="none", kernel="test") == 1.0


# ---- swiotlb and debugfs -----------------------------------------------------------------------


def test_swiotlb_mounts_debugfs_once_when_allowed(tmp_path: Path) -> None:
    debugfs = tmp_path / "debug"
    debugfs.mkdir()
    mounts: list[Path] = []

    def fake_mount(target: Path) -> None:
        mounts.append(target)
        shutil.copytree(SYSROOTS / "tdx-guest/sys/kernel/debug/swiotlb", target / "swiotlb")

    collector = SwiotlbCollector(debugfs, mount=fake_mount)
    assert collector.read() == SwiotlbSnapshot(262144, 4096, 65536, False)
    assert collector.read().nslabs == 262144
    assert mounts == [debugfs]


def test_swiotlb_unavailable_when_mount_fails(tmp_path: Path) -> None:
    calls = 0

    def refused(target: Path) -> None:
        nonlocal calls
        calls += 1
        raise OSError("mount: permission denied")

    collector = SwiotlbCollector(tmp_path, mount=refused)
    for _ in range(2):
        with pytest.raises(CollectorUnavailable, match="mount failed: mount: permission denied"):
            collector.read()
    assert calls == 1
    with pytest.raises(CollectorUnavailable):
        SwiotlbCollector(tmp_path).read()


# ---- the refresher -----------------------------------------------------------------------------


class CountingSource(SnapshotSource[int]):
    name = "counting"

    def __init__(self) -> None:
        self.reads = 0

    def read(self) -> int:
        self.reads += 1
        return self.reads

    def families(self, snapshot: int) -> list[Any]:
        return [GaugeMetricFamily("test_reads", "reads so far", value=snapshot)]


async def test_refresher_refreshes_every_interval(autojump_clock: trio.testing.MockClock) -> None:
    source = CountingSource()
    slot = SlotState(source)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotExporter([slot]))
    refresher = Refresher([slot], interval=15.0, read_deadline=2.0, run_read=inline)
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)
        assert registry.get_sample_value("test_reads") == 1  # first snapshot before started()
        for _ in range(5):
            registry.get_sample_value("test_reads")  # scrapes never read the kernel
        assert source.reads == 1
        await trio.sleep(15.5)
        assert registry.get_sample_value("test_reads") == 2
        await trio.sleep(15 * 4)
        assert source.reads == 6
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 75.5


async def test_a_read_past_its_deadline_fails_that_collector_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(function: Callable[[], Any]) -> Any:
        await trio.sleep(10)
        return function()

    slow_slot = SlotState(CountingSource())
    refresher = Refresher([slow_slot], interval=5.0, read_deadline=2.0, run_read=slow)
    await refresher.refresh_once()
    assert slow_slot.reading is not None
    assert not slow_slot.reading.success
    assert slow_slot.reading.duration_seconds == 2.0
    assert refresher.errors() == {"counting": "read missed its 2 s deadline"}
    assert trio.current_time() == 2.0


class BrokenSource(CountingSource):
    name = "broken"

    def read(self) -> int:
        raise RuntimeError("a bug in one collector")


async def test_a_failing_collector_costs_only_its_own_series() -> None:
    good, broken = SlotState(CountingSource()), SlotState(BrokenSource())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotExporter([good, broken]))
    refresher = Refresher([good, broken], interval=5.0, read_deadline=2.0, run_read=inline)
    await refresher.refresh_once()
    assert refresher.errors() == {"broken": "RuntimeError: a bug in one collector"}
    assert registry.get_sample_value("test_reads") == 1
    assert registry.get_sample_value("cvm_scrape_collector_success", {"collector": "broken"}) == 0.0
    assert registry.get_sample_value("cvm_scrape_collector_success", {"collector": "counting"}) == 1.0


async def test_a_read_still_stuck_in_the_kernel_is_not_started_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = CountingSource()
    slot = SlotState(source)
    slot.in_flight = True  # an abandoned worker thread has not returned yet
    await Refresher([slot], interval=5.0, read_deadline=2.0, run_read=inline).refresh_once()
    assert source.reads == 0
    assert slot.reading is not None and slot.reading.error == "previous read still running"


async def test_default_runner_uses_worker_threads() -> None:
    registry, refresher = build_registry(Roots.under(SYSROOTS / "kvm-guest-6.18"), AgentStats())
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)
        nursery.cancel_scope.cancel()
    assert value(registry, "cvm_scrape_collector_success", collector="cpuidle") == 1.0
    assert (value(registry, "cvm_guest_agent_process_resident_memory_bytes") or 0) > 0


# ---- the agent's own metrics -------------------------------------------------------------------


async def test_agent_stats() -> None:
    stats = AgentStats()
    stats.record_rpc("GetInfo", "OK", 0.0007)
    stats.record_rpc("GetInfo", "OK", 0.003)
    stats.record_rpc("SetIdlePolling", "FAILED_PRECONDITION", 20.0)
    stats.relay_opened("vsock")
    stats.relay_opened("vsock")
    stats.relay_closed("vsock")
    stats.relay_transferred("vsock", "in", 100)
    stats.relay_transferred("vsock", "out", 50)
    registry = await registry_for(SYSROOTS / "tdx-guest", stats)
    assert value(registry, "cvm_guest_agent_rpcs_total", method="GetInfo", code="OK") == 2
    assert value(registry, "cvm_guest_agent_rpc_duration_seconds_count", method="GetInfo") == 2
    assert value(registry, "cvm_guest_agent_rpc_duration_seconds_sum", method="GetInfo") == pytest.approx(
        0.0037
    )
    assert value(registry, "cvm_guest_agent_rpc_duration_seconds_bucket", method="GetInfo", le="0.001") == 1
    assert value(registry, "cvm_guest_agent_rpc_duration_seconds_bucket", method="GetInfo", le="0.005") == 2
    assert (
        value(registry, "cvm_guest_agent_rpc_duration_seconds_bucket", method="SetIdlePolling", le="10.0")
        == 0
    )
    assert (
        value(registry, "cvm_guest_agent_rpc_duration_seconds_bucket", method="SetIdlePolling", le="+Inf")
        == 1
    )
    assert value(registry, "cvm_guest_agent_relay_connections_total", relay="vsock") == 2
    assert value(registry, "cvm_guest_agent_relay_active_connections", relay="vsock") == 1
    assert value(registry, "cvm_guest_agent_relay_bytes_total", relay="vsock", direction="in") == 100


async def test_agent_stats_recovery_and_refusals() -> None:
    stats = AgentStats()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentStatsCollector(stats))
    assert value(registry, "cvm_guest_agent_state_recovery", outcome="discarded") is None
    stats.recovered("discarded", 1)
    stats.relay_refused("vsock")
    assert value(registry, "cvm_guest_agent_state_recovery", outcome="discarded") == 1
    assert value(registry, "cvm_guest_agent_state_discarded_entries") == 1
    assert value(registry, "cvm_guest_agent_relay_refused_connections_total", relay="vsock") == 1


def test_method_label_is_bounded() -> None:
    stats = AgentStats()
    for index in range(100):
        stats.record_rpc(f"Method{index}", "OK", 0.001)
    view = stats.copy()
    assert len(view.durations) == 65  # 64 methods and "other"
    assert view.rpcs[("other", "OK")] == 36


# ---- the exposition ----------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["kvm-guest-6.18", "tcg-guest-6.12", "snp-guest", "tdx-guest"])
async def test_promtool_check_metrics_reports_nothing(tree: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package: prometheus)")
    stats = AgentStats()
    stats.record_rpc("GetInfo", "OK", 0.001)
    stats.relay_opened("vsock")
    registry, refresher = build_registry(Roots.under(SYSROOTS / tree), stats, tee="none", run_read=inline)
    await refresher.refresh_once()
    text = render_text(registry)
    done = await trio.run_process(
        [promtool, "check", "metrics"], stdin=text, capture_stdout=True, capture_stderr=True, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b""), text.decode()


def test_kernel_files_larger_than_one_read(tmp_path: Path) -> None:
    big = tmp_path / "stat"
    text = "intr " + " 0" * 100_000 + "\n"
    big.write_text(text)
    assert read_kernel_file(big) == text
    assert (
        read_sysfs_attribute(SYSROOTS / "kvm-guest-6.18/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        == "0\n"
    )


async def test_recorded_tcg_guest_6_12() -> None:
    """The dev guest under TCG: no cpuidle driver, a forced 64 MiB swiotlb pool, PSI."""
    registry = await registry_for(SYSROOTS / "tcg-guest-6.12")
    assert value(registry, "cvm_guest_cpuidle_info", driver="none", governor="menu") == 1.0
    assert value(registry, "cvm_guest_haltpoll_max_poll_seconds") == 0.0002
    assert value(registry, "cvm_guest_swiotlb_size_bytes") == 32768 * 2048 == 64 << 20
    assert value(registry, "cvm_guest_swiotlb_used_bytes") == 0
    assert value(registry, "cvm_guest_swiotlb_used_max_bytes") == 0
    assert value(registry, "cvm_guest_pressure_stalled_seconds_total", resource="cpu", kind="some") == 1.00823
    user_hz = os.sysconf("SC_CLK_TCK")
    assert value(registry, "cvm_guest_cpu_seconds_total", cpu="1", mode="system") == 444 / user_hz
    for collector in ("cpuidle", "haltpoll", "swiotlb", "procstat", "pressure"):
        assert value(registry, "cvm_scrape_collector_success", collector=collector) == 1.0


MEMINFO = """\
MemTotal:        4002884 kB
MemFree:         3520012 kB
MemAvailable:    3611740 kB
Buffers:            2048 kB
Cached:           180224 kB
SwapTotal:             0 kB
SwapFree:              0 kB
Shmem:             12000 kB
AnonPages:         50000 kB
Unaccepted:      1048576 kB
HugePages_Total:       0
"""


def test_meminfo_summary_in_bytes() -> None:
    summary = parse_meminfo(MEMINFO)
    assert summary["total"] == 4002884 * 1024 and summary["unaccepted"] == 1024**3
    assert set(summary) == {
        "total", "free", "available", "buffers", "cached", "swap_total", "swap_free", "shmem", "anon",
        "unaccepted",
    }  # fmt: skip
    assert "unaccepted" not in parse_meminfo("MemTotal: 1 kB\n")


def test_meminfo_and_build_info_in_the_registry(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(MEMINFO)
    families = {
        f.name: f
        for f in MeminfoCollector(tmp_path / "proc").families(MeminfoCollector(tmp_path / "proc").read())
    }
    [available] = [s for s in families["cvm_guest_memory_bytes"].samples if s.labels["kind"] == "available"]
    assert available.value == 3611740 * 1024
    with pytest.raises(CollectorUnavailable):
        MeminfoCollector(tmp_path / "nowhere").read()
    [build] = list(GuestInfoCollector("none", "6.12").collect())[1].samples
    assert build.name == "cvm_guest_agent_build_info" and build.labels["version"] == __version__
