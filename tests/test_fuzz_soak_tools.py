"""The fuzzing and soak benchmarks in CI size: every fuzz target runs its seeds through the
harness (no finding), a short atheris run reports its figures, and the soak report's
arithmetic (growth per hour, missed scrapes, log counts) is right. The 1,000,000-input and
one-hour runs themselves are benchmarks, not tests."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.fuzz import parse_libfuzzer_log
from benchmarks.soak import (
    Sample,
    count_log_lines,
    parse_duration,
    process_figures,
    scrape_figures,
    slope_per_hour,
)
from tests.conftest import REPO_ROOT

FUZZ = REPO_ROOT / "benchmarks" / "fuzz.py"


def test_every_fuzz_target_runs_its_seeds_without_a_finding() -> None:
    # A subprocess: the RPC targets replace the edges that would act on the host.
    result = subprocess.run(
        [sys.executable, str(FUZZ), "--check-seeds"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    listed = subprocess.run(
        [sys.executable, str(FUZZ), "--list"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    for name in ("spec", "address", "http", "snp_report", "tdx_quote", "agent_rpc", "hostd_rpc"):
        assert name in listed
        assert f"{name}: " in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris has no wheel here")
def test_a_short_atheris_run_reports_inputs_coverage_and_findings(tmp_path: Path) -> None:
    out = f"{tmp_path}/fuzz"
    result = subprocess.run(
        [sys.executable, str(FUZZ), "--inputs", "2000", "--target", "address", "--out", out,
         "--json", f"{out}.json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [row] = json.loads(Path(f"{out}.json").read_text())["targets"]
    assert row["inputs"] == 2000 and row["exit_code"] == 0
    assert row["cov"] and row["ft"] and row["inputs_per_second"]
    assert row["findings"] == []


def test_libfuzzer_figures_are_read_from_its_output() -> None:
    text = (
        "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 50Mb\n"
        "#512\tpulse  cov: 40 ft: 90 corp: 9/99b lim: 4 exec/s: 256 rss: 51Mb\n"
        "#1000\tDONE   cov: 42 ft: 97 corp: 10/120b lim: 8 exec/s: 500 rss: 52Mb\n"
        "stat::number_of_executed_units: 1000\nstat::average_exec_per_sec:     500\n"
        "stat::peak_rss_mb:              52\n"
        "artifact_prefix='/o/x-'; Test unit written to /o/x-crash-abc\n"
    )
    figures = parse_libfuzzer_log(text)
    assert figures == {
        "executed": 1000,
        "exec_per_sec": 500,
        "peak_rss_mb": 52,
        "cov": 42,
        "ft": 97,
        "artifacts": ["/o/x-crash-abc"],
    }


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("2m", 120), ("1h", 3600), ("1h30m", 5400), ("1.5h", 5400)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1d", "-1m", "m1"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_growth_per_hour_is_the_least_squares_slope() -> None:
    assert slope_per_hour([(0, 100), (1800, 110), (3600, 120)]) == pytest.approx(20)
    assert slope_per_hour([(0, 5), (600, 5)]) == 0
    assert slope_per_hour([(10, 5)]) is None
    assert slope_per_hour([(10, 5), (10, 6)]) is None  # one instant: no slope


def test_process_figures_leave_the_warmup_out_of_the_slope() -> None:
    mib = 1024 * 1024
    # 50 MiB while warming up, then a steady 1 MiB per 10 minutes (6 MiB/h) and one fd per hour.
    samples = [Sample(0, 10 * mib, 5), Sample(60, 60 * mib, 9)]
    samples += [Sample(600 * i, (60 + i) * mib, 9 + i / 6) for i in range(1, 7)]
    figures = process_figures(samples, warmup=300)
    assert figures["samples"] == 8
    assert figures["rss_mib_start"] == 61 and figures["rss_mib_end"] == 66 and figures["rss_mib_max"] == 66
    assert figures["rss_mib_per_hour"] == pytest.approx(6)
    assert figures["fds_per_hour"] == pytest.approx(1)
    assert process_figures([], warmup=0) == {"samples": 0}


def test_missed_scrapes_count_failures_and_gaps() -> None:
    # 1 h at 5 s: 720 expected; Prometheus tried 700 times and 695 succeeded.
    assert scrape_figures(3600, 5, 700, 695) == {
        "expected": 720,
        "attempted": 700,
        "succeeded": 695,
        "failed": 5,
        "missed": 25,
    }
    # The partial interval at the edge is not a miss; an extra attempt is not negative.
    assert scrape_figures(3604, 5, 721, 721)["missed"] == 0


def test_log_lines_are_counted_by_level_event_and_rpc_code() -> None:
    lines = [
        json.dumps({"event": "rpc", "level": "info", "code": "OK"}),
        json.dumps({"event": "rpc", "level": "info", "code": "INVALID_ARGUMENT"}),
        json.dumps({"event": "rpc_failed", "level": "error", "exception": "Traceback ..."}),
        json.dumps({"event": "agent_slow", "level": "warning"}),
        # a guest's serial console: structlog's console rendering, with colours
        "\x1b[2m2026-11-30T09:50:52.8Z\x1b[0m [\x1b[31merror    \x1b[0m] \x1b[1mcollector_failed\x1b[0m x=1",
        "2026-11-30T09:50:52.8Z [info     ] rpc    code=UNAVAILABLE method=/cvm.v1.GuestAgent/GetMetrics",
        "Traceback (most recent call last):",
        "[    1.234] a kernel line",
    ]
    counts = count_log_lines(lines)
    assert counts["error"] == 2 and counts["warning"] == 1
    assert counts["error_events"] == {"rpc_failed": 1, "collector_failed": 1}
    assert counts["rpc_not_ok"] == {"INVALID_ARGUMENT": 1, "UNAVAILABLE": 1}
    assert counts["tracebacks"] == 1


@pytest.mark.slow
def test_a_short_soak_of_fake_vms_reports_every_process_and_scrape(tmp_path: Path) -> None:
    """No VM boots here (the 1 h run in the closing note has a real one): a fake-QMP VM and its
    host-side agent under the real daemon and Prometheus for 20 s."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (scripts/install-monitoring.sh)")
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "soak.py"), "--duration", "20s", "--real", "0",
         "--fake", "1", "--sample", "5", "--warmup", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"]
    assert {"cvm-hostd", "fake-qmp:fake0", "agent:fake0", "prometheus"} <= set(report["processes"])
    hostd = report["processes"]["cvm-hostd"]
    assert hostd["samples"] >= 3 and hostd["rss_mib_end"] > 0 and hostd["fds_end"] > 0
    jobs = {row["job"] for row in report["scrapes"]}
    assert jobs == {"cvm-hostd", "cvm-guests"}
    assert all(row["succeeded"] > 0 for row in report["scrapes"])
    assert report["logs"]["hostd"]["tracebacks"] == 0
    assert "cvm-hostd" in result.stdout and "scrape target" in result.stdout
