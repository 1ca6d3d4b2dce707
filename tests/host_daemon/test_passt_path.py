"""The rootless network path with UDP, end to end: the dev guest behind passt.

A daemon the test starts creates the built-in ``vm`` target's guest with ``$CVMCTL_NETWORK``
set to ``passt`` (what a daemon without root gets where passt is installed), so the guest's
NIC is a virtio-net whose back end is the passt process the daemon starts beside QEMU
(host_daemon.passt). Through passt's loopback forwards: iperf3's UDP test, whose datagrams
need the UDP forward of the control port's number, and nginx over TCP; ping is refused up
front (passt carries no ICMP echo from the host to the guest), before anything boots. Every
run records the path, ``results show`` names it, and passt goes with the VM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host_daemon.test_lifecycle import Daemon

pytestmark = pytest.mark.slow

TINY = ["--duration", "1", "--repeat", "1", "--warmup", "0", "--quiet"]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: the VM's unix sockets live under it, and sun_path holds 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def passt_processes(run_dir: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-a", "-f", f"passt .*{run_dir}"], capture_output=True, text=True)
    return found.stdout.splitlines()


def test_udp_and_tcp_through_passt_and_ping_refused(short_tmp: Path) -> None:
    for tool in ("qemu-system-x86_64", "vhost-device-vsock", "passt", "iperf3", "nginx", "wrk"):
        if shutil.which(tool) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{tool} missing: scripts/setup.sh installs it")
            pytest.skip(f"{tool} not installed")
    daemon = Daemon(short_tmp / "s", short_tmp / "h.sock")
    daemon.start()
    daemon.env.update({"CVMCTL_NETWORK": "passt", "XDG_DATA_HOME": str(short_tmp / "data")})
    daemon.env.pop("CVMCTL_DATA_DIR", None)
    run_dir = short_tmp / "s" / "vms" / "cvmctl-dev"
    try:
        ping = daemon.cvmctl("bench", "ping", *TINY)
        assert ping.returncode == 2, ping.stderr
        assert "passt" in ping.stderr and "no ICMP echo from the host to the guest" in ping.stderr
        assert json.loads(daemon.cvmctl("vm", "ls", "--json").stdout or "[]") == [], "a refusal booted a VM"

        udp = daemon.cvmctl(
            "bench", "iperf-udp", *TINY, "--json", "--param", "streams=2", "--param", "length=64,1460",
            timeout=400,
        )  # fmt: skip
        assert udp.returncode == 0, udp.stderr
        data = json.loads(udp.stdout)
        metrics = {s["metric"]: s["value"] for s in data["samples"] if not s["warmup"]}
        assert metrics["throughput_64B"] > 0 and metrics["throughput_1460B"] > 0
        assert [t["network"] for t in data["run"]["metadata"]["targets"].values()] == ["passt"]
        assert 'mode = "passt"' in daemon.vm("cvmctl-dev")["spec_toml"]
        assert passt_processes(run_dir), "no passt beside the running VM"

        shown = daemon.cvmctl("results", "show", str(data["run"]["id"]))
        assert shown.returncode == 0 and "network path: passt" in shown.stdout, shown.stdout

        nginx = daemon.cvmctl(
            "bench", "nginx", *TINY, "--json", "--param", "threads=2", "--param", "connections=20"
        )
        assert nginx.returncode == 0, nginx.stderr
        samples = json.loads(nginx.stdout)["samples"]
        assert any(s["metric"] == "requests_per_second" and s["value"] > 0 for s in samples)
    finally:
        daemon.cvmctl("vm", "kill", "cvmctl-dev")
        daemon.cvmctl("vm", "rm", "cvmctl-dev")
        daemon.stop()
    assert passt_processes(run_dir) == [], "passt outlived its VM"
