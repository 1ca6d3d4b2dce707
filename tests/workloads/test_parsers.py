"""The parsers against real tool output captured on this machine (fixtures/README.md)."""

from __future__ import annotations

import pytest

from tests.workloads.conftest import fixture_text
from workloads import parsers
from workloads.catalogue import get


def test_wrk() -> None:
    result = parsers.parse_wrk(fixture_text("wrk.txt"))
    assert result.requests_per_second == 53391.48
    assert result.requests == 161519
    assert result.latency_percentiles_s == pytest.approx(
        {50: 5.38e-3, 75: 5.75e-3, 90: 6.32e-3, 99: 406.85e-3}
    )
    assert result.socket_errors == 0 and result.non_2xx_3xx == 0


def test_wrk_errors_and_units() -> None:
    text = fixture_text("wrk.txt").replace(
        "Requests/sec:",
        "  Socket errors: connect 1, read 2, write 3, timeout 4\n"
        "  Non-2xx or 3xx responses: 5\nRequests/sec:",
    )
    result = parsers.parse_wrk(text)
    assert (result.socket_errors, result.non_2xx_3xx) == (10, 5)
    assert parsers.wrk_duration_seconds("812.00us") == pytest.approx(812e-6)
    assert parsers.wrk_duration_seconds("1.50s") == 1.5
    assert parsers.wrk_duration_seconds("2.00m") == 120.0


def test_wrk_failure_is_an_error() -> None:
    with pytest.raises(parsers.ParseError, match="Requests/sec"):
        parsers.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_nginx_samples() -> None:
    samples = get("nginx").parse_host(fixture_text("wrk.txt"), {})
    by_metric = {s.metric: s for s in samples}
    assert by_metric["requests_per_second"].value == 53391.48
    assert by_metric["requests_per_second"].direction == "higher"
    assert by_metric["latency_p99"].value == pytest.approx(406.85)
    assert by_metric["latency_p99"].unit == "ms" and by_metric["latency_p99"].direction == "lower"
    assert by_metric["errors"].value == 0


def test_iperf_tcp() -> None:
    result = parsers.parse_iperf3(fixture_text("iperf-tcp.json"))
    assert result.received_bits_per_second == pytest.approx(16447461020.143122)
    assert result.version == "iperf 3.12"
    assert result.retransmits is not None and result.lost_percent is None
    workload = get("iperf-tcp")
    samples = workload.parse_host(fixture_text("iperf-tcp.json"), workload.validate({}))
    assert samples[0].metric == "throughput" and samples[0].value == pytest.approx(16.447461)


def test_iperf_udp_uses_the_receiver() -> None:
    result = parsers.parse_iperf3(fixture_text("iperf-udp.json"))
    # sum_received (what arrived), not sum_sent: 2.088 of the 2.694 Gbit/s sent.
    assert result.received_bits_per_second == pytest.approx(2088388760.811669)
    assert result.lost_percent == pytest.approx(22.465976)
    workload = get("iperf-udp")
    case = workload.cases(workload.validate({"length": "1460"}))[0]
    metrics = {s.metric: s.value for s in workload.parse_host(fixture_text("iperf-udp.json"), case)}
    assert set(metrics) == {"throughput_1460B", "lost_1460B", "jitter_1460B"}
    small = parsers.parse_iperf3(fixture_text("iperf-udp-64.json"))
    assert small.received_bits_per_second > 0


def test_iperf_error_json() -> None:
    with pytest.raises(parsers.ParseError, match="unable to connect"):
        parsers.parse_iperf3('{"start": {}, "error": "error - unable to connect to server"}')
    with pytest.raises(parsers.ParseError, match="not JSON"):
        parsers.parse_iperf3("iperf3: error")


def test_ping_drops_the_first_replies() -> None:
    rtts = parsers.parse_ping_rtts_ms(fixture_text("ping.txt"))
    assert rtts == [0.512, 0.037, 0.043, 0.034, 0.037, 0.039, 0.039, 0.035]
    workload = get("ping")
    case = workload.cases(workload.validate({"size": "64", "count": "8"}))[0]
    metrics = {s.metric: s.value for s in workload.parse_host(fixture_text("ping.txt"), case)}
    kept = [0.034, 0.037, 0.039, 0.039, 0.035]  # the first 3 (0.512 among them) dropped
    assert metrics["rtt_mean_64B"] == pytest.approx(sum(kept) / 5)
    assert metrics["rtt_median_64B"] == 0.037


def test_memaslap() -> None:
    result = parsers.parse_memaslap(fixture_text("memaslap.txt"))
    assert (result.gets, result.sets, result.seconds, result.ops_per_second) == (216086, 24111, 2.0, 120089)
    assert result.gets_per_second == 108043


def test_fio() -> None:
    version, directions = parsers.parse_fio(fixture_text("fio-alat-randread.json"))
    assert version == "fio-3.33"
    assert set(directions) == {"read"}
    assert directions["read"].iops == pytest.approx(17009.995002)
    assert directions["read"].lat_mean_ns == pytest.approx(58254.600288)
    _, mixed = parsers.parse_fio(fixture_text("fio-iops-rw.json"))
    assert mixed["read"].iops == pytest.approx(69576.923077)
    assert mixed["write"].iops == pytest.approx(29837.162837)
    workload = get("fio")
    case = workload.cases(workload.validate({"jobs": "alat-randread"}))[0]
    samples = {s.metric: s for s in workload.parse_guest([fixture_text("fio-alat-randread.json")], case)}
    assert samples["alat-randread_read_lat_mean"].value == pytest.approx(58.2546006)
    assert samples["alat-randread_read_lat_mean"].unit == "us"


def test_mbw() -> None:
    assert parsers.parse_mbw(fixture_text("mbw-t0.txt")) == {"MEMCPY": 11052.268}
    assert parsers.parse_mbw(fixture_text("mbw-t2.txt")) == {"MCBLOCK": 13889.894}


def test_sysbench() -> None:
    cpu = parsers.parse_sysbench(fixture_text("sysbench-cpu.txt"))
    assert (cpu.events_per_second, cpu.events, cpu.total_time_s) == (1754.27, 3516, 2.0037)
    assert cpu.latency_ms == {"min": 0.59, "avg": 1.13, "max": 20.64, "95th percentile": 4.65, "sum": 3989.45}
    memory = parsers.parse_sysbench(fixture_text("sysbench-memory.txt"))
    assert memory.mib_per_second == 7865.99 and memory.events_per_second is None
    threads = parsers.parse_sysbench(fixture_text("sysbench-threads.txt"))
    assert threads.events == 2428


def test_stress_ng_yaml() -> None:
    metrics = parsers.parse_stress_ng_yaml(fixture_text("stress-ng-cpu.yaml"))
    assert metrics["cpu"]["bogo-ops"] == 3855
    assert metrics["cpu"]["bogo-ops-per-second-real-time"] == 1927.163207
    with pytest.raises(parsers.ParseError):
        parsers.parse_stress_ng_yaml("---\nsystem-info:\n      cpus: 2\n...\n")


def test_sysbench_workload_reads_every_output() -> None:
    workload = get("sysbench")
    params = workload.validate({"stressors": "cpu"})
    outputs = [
        fixture_text("sysbench-cpu.txt"),
        fixture_text("sysbench-threads.txt"),
        fixture_text("stress-ng-cpu.yaml"),
    ]
    metrics = {s.metric: s.value for s in workload.parse_guest(outputs, params)}
    assert metrics == {
        "sysbench_cpu": 1754.27,
        "sysbench_threads": pytest.approx(2428 / 2.0008),
        "stress_cpu": 1927.163207,
    }
