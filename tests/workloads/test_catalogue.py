"""The catalogue: parameters and their errors, the argv each workload builds, scaling, tools."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cvmcore.errors import UsageError
from workloads.catalogue import CATALOGUE, get
from workloads.model import MissingToolError, Param, ServerPlan

REPO = Path(__file__).resolve().parents[2]


def test_unknown_workload_lists_the_names() -> None:
    with pytest.raises(UsageError, match=r"unknown workload 'nginxx' \(workloads: nginx, iperf-tcp"):
        get("nginxx")


def test_study_defaults() -> None:
    assert get("nginx").validate({}) | {} == {
        "threads": 8,
        "connections": 300,
        "duration": 30,
        "port": 8080,
        "page_bytes": 615,
        "listen": "0.0.0.0",
    }
    assert get("iperf-tcp").validate({})["streams"] == 32
    assert get("iperf-tcp").validate({})["length"] == 128 * 1024
    assert get("iperf-udp").validate({})["length"] == [64, 128, 256, 512, 1024, 1460]
    assert get("ping").validate({}) == {
        "size": [64, 128, 256, 512, 1024],
        "count": 30,
        "interval": 0.1,
        "drop": 3,
    }
    assert get("vmexit").validate({})["leaves"] == [0, 1, 0x40000000]
    assert get("vmexit").validate({})["iterations"] == 100_000
    fio = get("fio").validate({})
    assert (fio["runtime"], fio["ramp"], fio["direct"]) == (30, 20, True)


@pytest.mark.parametrize(
    ("workload", "raw", "message"),
    [
        (
            "nginx",
            {"threads": "x"},
            "parameter threads: 'x' is not allowed (expected a whole number from 1 to 256)",
        ),
        ("nginx", {"threads": "0"}, "parameter threads: '0' is not allowed"),
        ("nginx", {"threads": "16", "connections": "8"}, "parameter connections: 8 is not allowed"),
        (
            "nginx",
            {"listen": "example.org"},
            "parameter listen: 'example.org' is not allowed (expected an IP",
        ),
        ("nginx", {"bogus": "1"}, "nginx has no parameter 'bogus' (parameters: threads, connections"),
        (
            "iperf-udp",
            {"length": "64,,128"},
            "parameter length: '64,,128' is not allowed (expected comma-separated",
        ),
        ("ping", {"interval": "nan"}, "parameter interval: 'nan' is not allowed"),
        ("ping", {"count": "5", "drop": "4"}, "parameter drop: 4 is not allowed"),
        ("fio", {"directory": "/etc"}, "parameter directory: '/etc' is not allowed"),
        ("fio", {"directory": "/var/tmp/../etc"}, "parameter directory: '/var/tmp/../etc' is not allowed"),
        ("fio", {"directory": "/tmpx"}, "parameter directory: '/tmpx' is not allowed"),
        ("fio", {"filename": "/tmp/victim"}, "fio has no parameter 'filename' (parameters: directory,"),
        ("fio", {"jobs": "bw-read,nope"}, "parameter jobs: 'nope' is not allowed"),
        ("fio", {"direct": "maybe"}, "parameter direct: 'maybe' is not allowed (expected yes or no)"),
        ("sysbench", {"stressors": "cpu,fork"}, "parameter stressors: 'fork' is not allowed"),
        ("boot", {"repeat_policy": "x"}, "parameter repeat_policy: 'x' is not allowed (expected one of"),
    ],
)
def test_bad_parameters_name_param_value_and_allowed(
    workload: str, raw: dict[str, str], message: str
) -> None:
    with pytest.raises(UsageError) as caught:
        get(workload).validate(raw)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_param_parsing() -> None:
    assert Param("p", "int", 0, "").parse("0x80") == 128
    assert Param("b", "bool", False, "").parse("Yes") is True
    assert Param("l", "list[int]", [], "", minimum=1).parse("1, 2,3") == [1, 2, 3]
    assert Param("l", "list[int]", [], "").format([1, 2]) == "1,2"
    with pytest.raises(UsageError):
        Param("l", "list[int]", [], "", maximum=2).parse("1,3")


def test_nginx_server_plan_and_client() -> None:
    nginx = get("nginx")
    params = nginx.validate({"listen": "127.0.0.1", "port": "18080"})
    plan = nginx.guest_server(params)
    assert isinstance(plan, ServerPlan) and plan.port == 18080
    argv, files = plan.materialise("/tmp/x")
    assert argv == ["nginx", "-p", "/tmp/x", "-e", "stderr", "-c", "/tmp/x/nginx.conf"]
    conf = files["nginx.conf"].decode()
    assert "worker_processes 1;" in conf and "access_log off;" in conf
    assert "listen 127.0.0.1:18080" in conf and "root /tmp/x/www;" in conf and "{dir}" not in conf
    assert len(files["www/index.html"]) == 615
    assert nginx.host_command(params, "::1", 18080) == [
        "wrk",
        "-t8",
        "-c300",
        "-d30s",
        "--latency",
        "http://[::1]:18080/",
    ]


def test_iperf_commands_follow_the_study() -> None:
    tcp = get("iperf-tcp")
    params = tcp.validate({})
    assert tcp.host_command(params, "127.0.0.1", 7175) == [
        "iperf3",
        "-c",
        "127.0.0.1",
        "-p",
        "7175",
        "-b",
        "0",
        "-i",
        "1",
        "-l",
        "131072",
        "-P",
        "32",
        "-t",
        "10",
        "-J",
    ]
    plan = tcp.guest_server(params)
    assert plan is not None and plan.argv == ["iperf3", "-s", "-p", "7175", "-B", "0.0.0.0"]
    udp = get("iperf-udp")
    cases = udp.cases(udp.validate({}))
    assert [c["length"] for c in cases] == [[64], [128], [256], [512], [1024], [1460]]
    argv = udp.host_command(cases[0], "127.0.0.1", 7175)
    assert argv is not None and argv[-1] == "-u" and argv[argv.index("-l") + 1] == "64"
    assert argv[argv.index("-P") + 1] == "8"


def test_ping_and_memcached_commands() -> None:
    ping = get("ping")
    case = ping.cases(ping.validate({}))[2]
    assert ping.host_command(case, "127.0.0.1", 0) == [
        "ping",
        "-n",
        "-c",
        "30",
        "-i",
        "0.1",
        "-s",
        "256",
        "-w",
        "8",
        "127.0.0.1",
    ]
    memcached = get("memcached")
    params = memcached.validate({"threads": "2", "duration": "5"})
    assert memcached.host_command(params, "127.0.0.1", 11211) == [
        "memcaslap",
        "-s",
        "127.0.0.1:11211",
        "-T",
        "2",
        "-c",
        "200",
        "-t",
        "5s",
        "-B",
    ]
    plan = memcached.guest_server(params)
    assert plan is not None and plan.argv[:2] == ["memcached", "-p"]


def test_fio_job_set() -> None:
    fio = get("fio")
    cases = fio.cases(fio.validate({}))
    assert [c["jobs"] for c in cases] == [
        "alat-randread",
        "alat-randwrite",
        "alat-read",
        "alat-write",
        "bw-read",
        "bw-write",
        "iops-randread",
        "iops-randwrite",
        "iops-rw",
    ]
    [argv] = fio.guest_commands(cases[4])
    assert "--rw=read" in argv and "--bs=128k" in argv and "--iodepth=128" in argv and "--numjobs=4" in argv
    assert "--ioengine=libaio" in argv and "--direct=1" in argv and "--ramp_time=20" in argv
    [argv] = fio.guest_commands(cases[8])
    assert "--rwmixread=70" in argv and "--iodepth=32" in argv


def test_duration_scales_each_workload_down() -> None:
    nginx = get("nginx")
    assert nginx.scaled(nginx.validate({}), 2)["duration"] == 2
    udp = get("iperf-udp")
    assert udp.scaled(udp.validate({}), 12)["duration"] == 2  # six cases
    ping = get("ping")
    assert ping.scaled(ping.validate({}), 5)["count"] == 10  # 1 s per size at 0.1 s
    fio = get("fio")
    scaled = fio.scaled(fio.validate({}), 18)
    assert (scaled["runtime"], scaled["ramp"]) == (1, 1)
    vmexit = get("vmexit")
    assert vmexit.scaled(vmexit.validate({}), 1)["iterations"] == 10_000
    for workload in CATALOGUE.values():  # every workload accepts --duration
        params = workload.scaled(workload.validate({}), 3)
        workload.check(params)


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingToolError) as caught:
        get("nginx").require_tools("host")
    assert str(caught.value) == (
        "nginx needs 'wrk', which is not installed: install the Debian package wrk "
        "(scripts/install-workload-tools.sh)"
    )
    with pytest.raises(MissingToolError, match="libmemcached-tools"):
        get("memcached").require_tools("host")


def test_install_script_covers_every_tool() -> None:
    script = (REPO / "scripts" / "install-workload-tools.sh").read_text()
    match = re.search(r"^PACKAGES=\(\n(.*?)\n\)", script, re.S | re.M)
    assert match is not None
    packages = set(match.group(1).split())
    needed = {p for w in CATALOGUE.values() for p in (*w.guest_tools.values(), *w.host_tools.values())}
    assert needed <= packages, needed - packages


def test_external_workloads_adapt_timings() -> None:
    boot = get("boot")
    samples = boot.samples_from({"qemu": 3.28, "firmware": 3.5, "linux": 1.49, "init": 0.91})
    assert [s.metric for s in samples] == ["qemu", "firmware", "linux", "init", "total"]
    assert samples[-1].value == pytest.approx(9.18)
    assert all(s.unit == "s" and s.direction == "lower" for s in samples)
    with pytest.raises(UsageError):
        get("attestation").samples_from({"verify": -1.0})


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_case_params_survive_the_trip_to_the_agent(name: str) -> None:
    """What a VM target sends (format_params of a case) validates back to the same case."""
    workload = get(name)
    for case in workload.cases(workload.validate({})):
        assert workload.validate(workload.format_params(case)) == case
