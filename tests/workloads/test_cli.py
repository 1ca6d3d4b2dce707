"""``cvmctl bench``, ``results`` and ``report`` as a user runs them."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.workloads.conftest import CLI_PREFIX, cli, require
from workloads.catalogue import get
from workloads.model import Sample
from workloads.runner import free_port
from workloads.store import Store


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_workload(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert cli("bench", "nginxx", "--target", "local") == 2
    assert one_error_line(capsys).startswith("cvmctl: error: unknown workload 'nginxx' (workloads: nginx, ")


def test_bad_parameter(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert cli("bench", "nginx", "--target", "local", "--param", "connections=lots") == 2
    assert one_error_line(capsys) == (
        "cvmctl: error: parameter connections: 'lots' is not allowed "
        "(expected a whole number from 1 to 10000)"
    )
    assert cli("bench", "nginx", "--target", "local", "--param", "threads") == 2
    assert one_error_line(capsys) == "cvmctl: error: --param 'threads': expected NAME=VALUE"


def test_missing_tool(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli("bench", "iperf-tcp", "--target", "local") == 2
    assert one_error_line(capsys) == (
        "cvmctl: error: iperf-tcp needs 'iperf3', which is not installed: install the Debian package iperf3 "
        "(scripts/install-workload-tools.sh)"
    )


def test_bad_targets(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert cli("bench", "vmexit", "--target", "cloud") == 2
    assert (
        one_error_line(capsys)
        == "cvmctl: error: unknown target 'cloud' (available: vm, sev-snp, tdx, each with +swiotlb,"
        " +haltpoll, +idle-poll; vm:NAME; local; local:PORT)"
    )
    assert cli("bench", "vmexit", "--target", "vm:") == 2
    assert "expected vm:NAME" in one_error_line(capsys)
    assert cli("bench", "vmexit", "--compare", "local") == 2
    assert "expected two targets" in one_error_line(capsys)


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("bench", "--list") == 0
    out = capsys.readouterr().out
    assert "nginx  (client-server)" in out and "    threads=8  wrk threads (-t)" in out
    assert (
        "    leaves=0x0,0x1,0x40000000" in out
        and "tools: memcached (memcached), memcaslap (libmemcached-tools)" in out
    )


def test_vmexit_run_table_json_and_results(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    args = (
        "bench",
        "vmexit",
        "--target",
        "local",
        "--repeat",
        "2",
        "--warmup",
        "1",
        "--param",
        "iterations=2000",
    )
    assert cli(*args, "--param", "leaves=0,1") == 0
    captured = capsys.readouterr()
    assert "run 1: vmexit on local, completed" in captured.out
    assert "cpuid_1_ns" in captured.out and "unavailable: hypercall" in captured.out
    assert "[1/3] vmexit warm-up 1 ..." in captured.err and "[3/3] vmexit run 2: cpuid_0_ns" in captured.err
    assert cli("results", "ls") == 0
    assert "vmexit    local   completed" in capsys.readouterr().out
    assert cli("results", "show", "1", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["run"]["metadata"]["repeat"] == 2 and len(data["samples"]) == 3 * 2 * 4
    assert cli("results", "export", "1", "--csv") == 0
    assert capsys.readouterr().out.startswith(
        "run,workload,target,status,arm,repetition,warmup,metric,value,"
    )
    assert cli("results", "show", "9") == 2
    assert "no run 9" in one_error_line(capsys)


def add_run(store: Store, workload: str, samples_by_arm: dict[str, list[list[Sample]]]) -> int:
    run_id = store.begin(workload, {}, "local", {})
    for arm, reps in samples_by_arm.items():
        for rep, samples in enumerate(reps):
            store.add_samples(run_id, rep, False, samples, arm=arm)
    store.finish(run_id, "completed")
    return run_id


def rps(value: float) -> list[Sample]:
    return [
        Sample("requests_per_second", value, "req/s", "higher"),
        Sample("latency_p99", 1000 / value, "ms", "lower"),
    ]


def test_report_draws_png_and_svg(capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    boot = get("boot")
    with Store.open(data_dir) as store:
        plain = add_run(store, "nginx", {"": [rps(100), rps(104), rps(98)]})
        other = add_run(store, "nginx", {"": [rps(90), rps(92), rps(91)]})
        paired = add_run(store, "nginx", {"A": [rps(100), rps(101)], "B": [rps(93), rps(95)]})
        boots = add_run(
            store, "boot", {"": [boot.samples_from({"qemu": 3.3, "firmware": 3.5, "linux": 1.5})] * 2}
        )
        exits = add_run(
            store, "vmexit", {"": [[Sample("cpuid_1_ns", v, "ns", "lower")] for v in (1226.0, 1230.0)]}
        )
    out = tmp_path / "figures"
    assert cli("report", *map(str, (plain, other, paired, boots, exits)), "-o", str(out)) == 0
    written = capsys.readouterr().out.split()
    for name in ("relative", "boot", "vmexit"):
        for suffix in ("png", "svg"):
            path = out / f"{name}.{suffix}"
            assert str(path) in written and path.stat().st_size > 1000
    assert (out / "relative.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (out / "boot.svg").read_bytes()[:1000]


@pytest.mark.slow
def test_bench_nginx_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    """The lead's command, against a real nginx on 127.0.0.1 (about 7 s: warm-up + 2 x 2 s)."""
    require("nginx", "wrk")
    env = {**os.environ, "CVMCTL_DATA_DIR": str(data_dir)}
    argv = [*CLI_PREFIX, "bench", "nginx", "--target", "local", "--duration", "2", "--repeat", "2"]
    argv += ["--param", f"port={free_port()}"]  # 8080 may be another program's
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "run 1: nginx on local, completed" in done.stdout
    assert "requests_per_second" in done.stdout and "latency_p99" in done.stdout
    with Store.open(data_dir) as store:
        run = store.run(1)
        (_, summary) = store.summaries(1)[("", "requests_per_second")]
    assert summary.n == 2 and summary.median > 100  # req/s; thousands here
    assert run.params["duration"] == "2" and run.params["listen"] == "127.0.0.1"
    assert run.metadata["tools"]["wrk"] and run.metadata["host"]["kernel"]
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed: the report half of this test is skipped")
    report = subprocess.run(
        [*CLI_PREFIX, "report", "1", "-o", str(tmp_path / "fig")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    # a single run: its absolute values, not bars of 1.0 against itself
    assert (tmp_path / "fig" / "absolute.png").exists() and (tmp_path / "fig" / "absolute.svg").exists()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def sample_count(db: Path, run_id: int) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=5) as connection:
        return int(
            connection.execute("SELECT COUNT(*) FROM samples WHERE run_id = ?", (run_id,)).fetchone()[0]
        )


@pytest.mark.slow
def test_kill_9_marks_the_run_aborted(data_dir: Path) -> None:
    require("nginx", "wrk")
    env = {**os.environ, "CVMCTL_DATA_DIR": str(data_dir)}
    quick = [*CLI_PREFIX, "bench", "vmexit", "--target", "local", "--repeat", "1", "--warmup", "0", "--quiet"]
    subprocess.run(
        [*quick, "--param", "iterations=1000"], check=True, timeout=60, env=env, capture_output=True
    )
    with Store.open(data_dir) as store:
        earlier = store.export_json(1)
    port = free_port()
    argv = [
        *CLI_PREFIX,
        "bench",
        "nginx",
        "--target",
        "local",
        "--duration",
        "1",
        "--repeat",
        "50",
        "--warmup",
        "0",
        "--param",
        f"port={port}",
        "--param",
        "connections=20",
        "--quiet",
    ]
    process = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while sample_count(data_dir / "results.sqlite3", 2) == 0:
            assert process.poll() is None, "the benchmark ended before it could be killed"
            assert time.monotonic() < deadline, "no repetition stored within 60 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        # nginx got SIGTERM from the kernel when its parent died (PR_SET_PDEATHSIG): the port closes.
        deadline = time.monotonic() + 10
        while port_open(port):
            assert time.monotonic() < deadline, "nginx outlived the killed benchmark"
            time.sleep(0.1)
    finally:
        # Whatever of the group we started is left (a wrk finishing its second): end it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    with Store.open(data_dir) as store:
        run = store.run(2)
        assert run.status == "aborted"
        assert run.finished is None
        assert len(store.samples(2)) >= 1  # the repetitions that finished are kept
        assert store.export_json(1) == earlier


def test_local_port_target_and_a_compare_run(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert cli("bench", "ping", "--target", "local:http") == 2
    assert one_error_line(capsys) == "cvmctl: error: target 'local:http': expected local:PORT with a TCP port"
    args = ("--repeat", "3", "--warmup", "0", "--param", "iterations=1000", "--param", "leaves=1")
    assert cli("bench", "vmexit", "--compare", "local,local", *args) == 0
    out = capsys.readouterr().out
    assert "arm  metric" in out and "B/A" in out and ("within noise" in out or "distinguishable" in out)
    assert cli("results", "show", "1", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["run"]["metadata"]["arms"] == {"A": "local", "B": "local"}
    assert {o["metric"] for o in data["overheads"]} >= {"cpuid_1_ns"}
    assert all(o["pairs"] == 3 for o in data["overheads"])


def test_fio_scratch_file_is_removed(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    require("fio")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    params = [f"directory={scratch}", "jobs=alat-read", "runtime=1", "ramp=0", "size_mb=8"]
    args = [arg for p in params for arg in ("--param", p)]
    assert cli("bench", "fio", "--target", "local", "--repeat", "1", "--warmup", "0", "--quiet", *args) == 0
    assert "alat-read_read_lat_mean" in capsys.readouterr().out
    assert list(scratch.iterdir()) == []  # the run's private directory is gone


def test_boot_and_attestation_need_a_vm(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert cli("bench", "boot", "--target", "local") == 2
    assert "boot is measured by the host daemon and the agent of a VM: use --target vm" in one_error_line(
        capsys
    )


def test_results_ls_json_and_export_to_a_file(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    with Store.open(data_dir) as store:
        run_id = add_run(store, "nginx", {"": [rps(100), rps(101)]})
    assert cli("results", "ls", "--json") == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["workload"], listed["status"]) == (run_id, "nginx", "completed")
    out = tmp_path / "run.json"
    assert cli("results", "export", str(run_id), "--json", "-o", str(out)) == 0
    data = json.loads(out.read_text())
    assert [s["metric"] for s in data["summaries"]] == ["requests_per_second", "latency_p99"]
    assert cli("results", "export", "x", "--csv") == 2
    assert "'x' is not a run id" in one_error_line(capsys)
