"""`cvmctl bench` on the built-in targets, end to end, as a user on a fresh machine.

No daemon runs: cvmctl starts one for the call, which boots the dev guest under TCG (and,
for ``--compare vm,vm+swiotlb``, a second one with forced bounce buffers); the agent inside
starts nginx; wrk on the host drives it through the loopback forward; the run is stored;
afterwards the VMs and the daemon are gone again.
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


def test_bench_nginx_vm_against_vm_swiotlb(short_tmp: Path) -> None:
    """The study's bounce-buffer ablation as one paired run; the arms' argv differ in swiotlb only."""
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
        "--compare",
        "vm,vm+swiotlb",
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
    run = stored["run"]
    assert run["status"] == "completed" and run["target"] == "vm,vm+swiotlb"
    targets = run["metadata"]["targets"]
    assert (targets["A"]["name"], targets["B"]["name"]) == ("cvmctl-dev", "cvmctl-dev-swiotlb")
    for arm in ("A", "B"):
        rps = [
            s["value"]
            for s in stored["samples"]
            if s["metric"] == "requests_per_second" and not s["warmup"] and s["arm"] == arm
        ]
        assert len(rps) == 2 and all(value > 0 for value in rps)
    assert any(
        o["metric"] == "requests_per_second" and o["ci95_low"] is not None for o in stored["overheads"]
    )
    shown = subprocess.run(
        [str(BIN / "cvmctl"), "results", "show", str(run["id"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    differences = shown.stdout.split("B differs from A in (VM names, paths and ports aside):\n")[1]
    changed = [line for line in differences.splitlines() if line.startswith(("  -", "  +"))]
    assert changed, shown.stdout
    # forced bounce buffers: the kernel parameter, and the devices made to honour the DMA API;
    # with those two taken out of B's lines, B's lines are A's
    only_a = sorted(line[4:] for line in changed if line.startswith("  -"))
    only_b = [line[4:] for line in changed if line.startswith("  +")]
    assert any("swiotlb=524288,force" in line for line in only_b), changed
    forced = (" swiotlb=524288,force", ",iommu_platform=on,disable-modern=off,disable-legacy=on")
    stripped = []
    for line in only_b:
        for part in forced:
            line = line.replace(part, "")
        stripped.append(line)
    assert sorted(stripped) == only_a, changed
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
