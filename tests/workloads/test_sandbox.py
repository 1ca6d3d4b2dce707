"""Where workload processes run: the mode, the systemd-run command, the unit's sandbox."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from workloads.inprocess import in_process_argv, parse_output, render_output
from workloads.model import Sample, Unavailable
from workloads.sandbox import (
    DIRECT,
    WORKLOAD_PROPERTIES,
    Sandbox,
    choose,
    detect,
    own_unit,
    run_argv,
    stop_all_argv,
    unit_name,
)


def test_detect_needs_the_agent_unit_on_a_systemd_system(tmp_path: Path) -> None:
    booted, cgroup = tmp_path / "system", tmp_path / "cgroup"
    service = {"INVOCATION_ID": "abc"}
    cgroup.write_text("0::/system.slice/cvm-agent.service\n")
    assert detect(service, booted, cgroup) == DIRECT  # not booted with systemd
    booted.mkdir()
    assert detect({}, booted, cgroup) == DIRECT  # not a service
    expected = "systemd" if shutil.which("systemd-run") else "direct"
    assert detect(service, booted, cgroup).mode == expected
    cgroup.write_text("0::/system.slice/ci-runner.service\n")  # a test inside another service
    assert detect(service, booted, cgroup) == DIRECT
    assert own_unit(cgroup) == "ci-runner.service"
    assert own_unit(tmp_path / "missing") is None


def test_choose() -> None:
    assert choose("direct") == DIRECT
    assert choose("systemd").systemd
    with pytest.raises(ValueError, match="unknown workload sandbox"):
        choose("docker")


def test_unit_names_are_unique_and_safe() -> None:
    a, b = unit_name("nginx"), unit_name("nginx")
    assert a != b and a.startswith("cvm-workload-nginx-") and a.endswith(".service")
    assert "/" not in unit_name("../x y")


def test_run_argv_pipes_and_waits() -> None:
    argv = run_argv(Sandbox("systemd"), "cvm-workload-x-1-1.service", ["nginx", "-g", "daemon off;"])
    assert argv[0] == "systemd-run" and {"--wait", "--pipe", "--collect"} <= set(argv)
    assert argv[argv.index("--") + 1 :] == ["nginx", "-g", "daemon off;"]
    assert "--property=JoinsNamespaceOf=cvm-agent.service" in argv
    assert stop_all_argv() == ["systemctl", "stop", "cvm-workload-*.service"]


def test_the_workload_sandbox_fits_the_benchmarks() -> None:
    props = dict(p.split("=", 1) for p in WORKLOAD_PROPERTIES if not p.startswith("DeviceAllow"))
    caps = set(props["CapabilityBoundingSet"].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE", "CAP_SYS_RAWIO"} <= caps
    assert "CAP_SYS_ADMIN" not in caps and "CAP_SYS_MODULE" not in caps
    assert "IPAddressDeny" not in props  # the host's clients reach the servers
    assert "MemoryDenyWriteExecute" not in props  # vmexit's code page
    devices = [p for p in WORKLOAD_PROPERTIES if p.startswith("DeviceAllow")]
    assert devices == ["DeviceAllow=/dev/port rw", "DeviceAllow=char-cpu/msr rw"]
    assert props["PrivateTmp"] == "yes"


def test_in_process_samples_round_trip() -> None:
    samples = [Sample("cpuid", 1.5, "ns", "lower", {"leaf": "0"}), Sample("rdtsc", 2.0, "ns", "lower")]
    notes = [Unavailable("pio_0x40", "/dev/port is not readable")]
    assert parse_output(render_output(samples, notes)) == (samples, notes)
    argv = in_process_argv("vmexit", {"iterations": 10})
    assert argv[1:4] == ["-m", "workloads.inprocess", "vmexit"]
