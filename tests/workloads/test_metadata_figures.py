"""Run metadata read from a recorded tree, and the figures' data (no drawing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workloads.catalogue import get
from workloads.figures import absolute_bars, boot_stacks, relative_bars, vmexit_bars
from workloads.metadata import cpu_info, cvmctl_metadata, machine_metadata, steal_fraction
from workloads.model import Sample
from workloads.store import Run, StoredSample


def test_cpu_info_first_processor_only() -> None:
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9654P\nmicrocode\t: 0xa101144\n\n"
    text += "processor\t: 1\nmodel name\t: X\n"
    assert cpu_info(text) == {"cpu_model": "AMD EPYC 9654P", "cpu_microcode": "0xa101144"}


def test_steal_fraction() -> None:
    # user nice system idle iowait irq softirq steal
    assert steal_fraction("cpu  10 0 10 70 0 0 0 10 0 0\ncpu0 1 2 3\n") == pytest.approx(0.1)
    assert steal_fraction("intr 1 2\n") is None


def test_machine_metadata_from_a_tree(tmp_path: Path) -> None:
    files = {
        "proc/cmdline": "root=/dev/vda cpuidle_haltpoll.force=Y\n",
        "sys/devices/system/cpu/cpuidle/current_driver": "haltpoll\n",
        "sys/devices/system/cpu/cpuidle/current_governor_ro": "haltpoll\n",
        "sys/module/haltpoll/parameters/guest_halt_poll_ns": "200000\n",
        "proc/loadavg": "0.50 0.40 0.30 1/100 42\n",
    }
    for relative, content in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    meta = machine_metadata(tmp_path)
    assert meta["cmdline"] == "root=/dev/vda cpuidle_haltpoll.force=Y"
    assert (meta["cpuidle_driver"], meta["cpuidle_governor"]) == ("haltpoll", "haltpoll")
    assert meta["haltpoll"] == {"guest_halt_poll_ns": "200000"}
    assert meta["loadavg"] == "0.50 0.40 0.30"
    assert "cpu_pressure" not in meta  # not in the tree: left out, never guessed


def test_cvmctl_version_and_commit() -> None:
    meta = cvmctl_metadata()
    assert meta["cvmctl_version"]
    if "cvmctl_commit" in meta:
        assert len(meta["cvmctl_commit"].removesuffix("-dirty")) == 40


def run(run_id: int, workload: str, target: str = "local") -> Run:
    return Run(run_id, workload, {}, target, "completed", 0.0, 1.0, 1, {})


def stored(samples_by_rep: list[list[Sample]], arm: str = "") -> list[StoredSample]:
    return [StoredSample(arm, rep, False, s) for rep, samples in enumerate(samples_by_rep) for s in samples]


def test_relative_bars_paired_inverts_lower_is_better() -> None:
    a = stored([[Sample("lat", 10.0, "ms", "lower")], [Sample("lat", 10.0, "ms", "lower")]], "A")
    b = stored([[Sample("lat", 12.5, "ms", "lower")], [Sample("lat", 12.5, "ms", "lower")]], "B")
    [bar] = relative_bars([(run(1, "nginx"), a + b)])
    assert bar.value == pytest.approx(0.8)  # 25% more latency reads as 0.8 of the performance
    assert bar.low == pytest.approx(0.8) and bar.high == pytest.approx(0.8)


def test_relative_bars_between_runs() -> None:
    base = stored([[Sample("rps", v, "req/s", "higher")] for v in (100.0, 100.0)])
    other = stored([[Sample("rps", v, "req/s", "higher")] for v in (90.0, 90.0)])
    [bar] = relative_bars([(run(1, "nginx"), base), (run(2, "nginx"), other)])
    assert (bar.group, bar.label) == ("run 2 vs 1", "rps")
    assert bar.value == pytest.approx(0.9)


def test_a_single_run_is_drawn_in_absolute_values() -> None:
    """Not bars of 1.0 against itself: its median and CI, in its unit."""
    values = stored([[Sample("rps", v, "req/s", "higher")] for v in (90.0, 100.0, 110.0)])
    assert relative_bars([(run(1, "nginx"), values)]) == []
    [(bar, unit)] = absolute_bars([(run(1, "nginx"), values)])
    assert (bar.label, bar.value, unit) == ("rps", 100.0, "req/s")
    assert bar.low is not None and bar.high is not None and bar.low < 100.0 < bar.high
    assert absolute_bars([(run(1, "nginx"), values), (run(2, "nginx"), values)]) == []


def test_boot_and_vmexit_data() -> None:
    boot = get("boot")
    reps = [boot.samples_from({"qemu": q, "firmware": 3.5}) for q in (9.0, 3.28, 1.0)]
    stacks = boot_stacks([(run(5, "boot", "vm:snp"), stored(reps))])
    assert stacks == {"run 5 (vm:snp)": {"qemu": 3.28, "firmware": 3.5}}  # the median-total boot
    exits = stored(
        [[Sample("cpuid_1_ns", 1226.0, "ns", "lower"), Sample("cpuid_1_cycles", 3000.0, "cycles", "lower")]]
    )
    [bar] = vmexit_bars([(run(6, "vmexit"), exits)])
    assert (bar.label, bar.value) == ("cpuid_1", 1226.0)
