"""`cvmctl bench nginx` on the built-in dev guest, end to end, as a user on a fresh machine.

No daemon runs: cvmctl starts one for the call, which boots the dev guest under TCG; the
agent inside starts nginx; wrk on the host drives it through the loopback forward; the
run is stored; afterwards the VM and the daemon are gone again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.host_daemon.test_lifecycle import Daemon

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: the VM's unix sockets live under it, and sun_path holds 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_bench_nginx_in_the_dev_guest(short_tmp: Path) -> None:
    tmp_path = short_tmp
    for tool in ("qemu-system-x86_64", "vhost-device-vsock", "nginx", "wrk"):
        if shutil.which(tool) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{tool} missing: scripts/setup.sh installs it")
            pytest.skip(f"{tool} not installed")
    env = {
        **os.environ,
        "CVM_HOSTD": f"unix://{tmp_path}/none.sock",  # no system daemon: one is started for the run
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
    }
    args = [
        "bench",
        "nginx",
        "--duration",
        "3",
        "--repeat",
        "2",
        "--warmup",
        "0",
        "--param",
        "threads=2",
        "--param",
        "connections=20",
        "--json",
    ]
    result = subprocess.run(
        [str(BIN / "cvmctl"), *args], capture_output=True, text=True, env=env, timeout=400, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting one for this run" in result.stderr
    assert "boot phase userspace" in result.stderr
    stored = json.loads(result.stdout)
    assert stored["run"]["status"] == "completed" and stored["run"]["target"] == "vm"
    assert "cvmctl-dev" in json.dumps(stored["run"]["metadata"])  # the VM is recorded with the run
    rps = [s["value"] for s in stored["samples"] if s["metric"] == "requests_per_second" and not s["warmup"]]
    assert len(rps) == 2 and all(value > 0 for value in rps)
    listed = subprocess.run(
        [str(BIN / "cvmctl"), "results", "ls"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert "nginx" in listed.stdout and "completed" in listed.stdout
    # The daemon started for the run stopped its VM and itself.
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "state")], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""


def test_bench_boot_and_attestation_in_the_dev_guest(short_tmp: Path) -> None:
    """boot: each repetition is a fresh boot through the daemon, its phases the samples;
    attestation on a normal VM: recorded as unavailable, with the reason, not faked."""
    if shutil.which("qemu-system-x86_64") is None or shutil.which("vhost-device-vsock") is None:
        if os.environ.get("CI"):
            pytest.fail("QEMU or vhost-device-vsock missing: scripts/setup.sh installs them")
        pytest.skip("QEMU or vhost-device-vsock not installed")
    # A daemon the test owns: the VM stays up between the two runs (one boot fewer).
    daemon = Daemon(short_tmp / "s", short_tmp / "h.sock")
    daemon.start()
    env = {**daemon.env, "XDG_DATA_HOME": str(short_tmp / "data")}

    def bench(*args: str) -> dict[str, Any]:
        result = subprocess.run(
            [str(BIN / "cvmctl"), "bench", *args, "--repeat", "1", "--warmup", "0", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=400,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    try:
        boot = bench("boot")
        phases = [s["metric"] for s in boot["samples"]]
        assert phases == ["daemon", "spawn", "firmware", "kernel", "userspace", "total"]
        assert all(s["value"] > 0 for s in boot["samples"])
        attestation = bench("attestation")
        assert attestation["samples"] == []
        assert "not a confidential VM" in json.dumps(attestation["run"]["metadata"]["unavailable"])
    finally:
        daemon.cvmctl("vm", "kill", "cvmctl-dev")
        daemon.stop()
