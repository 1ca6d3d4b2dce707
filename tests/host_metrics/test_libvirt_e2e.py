"""``cvm-hostd --libvirt`` against a real libvirt daemon, scraped by a real Prometheus.

The test starts libvirt's own daemons (``virtlogd``, then ``libvirtd`` with a private socket
directory and in a network namespace of its own, so the tap it creates never touches the
host's network), defines a TCG domain from XML (the dev guest's kernel and a busybox
initramfs that idles), starts it, and runs the real ``cvm-hostd`` with ``--libvirt``. A
Debian Prometheus with the deploy/ job shapes must then see the domain's inventory, CPU,
vCPU, block and network series; destroying the domain must turn its ``cvm_vm_state`` to
stopped within one refresh.

libvirt 11.3 comes from bookworm-backports (scripts/install-libvirt.sh): bookworm's 9.0
passes ``-no-acpi`` to QEMU, which QEMU 10 refused. On this machine there is no
``/dev/vhost-net`` and libvirt enables vhost only for KVM domains, so a TCG domain has no
vhost workers: the vhost series are the daemon's own procfs scan of the domain's QEMU pid,
the same code its own VMs use (tests/host_metrics/test_collector.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.host_metrics.conftest import (
    PROMETHEUS,
    metric_names,
    prometheus_config,
    running_prometheus,
    settle,
    wait_for,
)
from tests.host_metrics.libvirt_env import domain_files, domain_xml, libvirt_daemon, require_libvirt
from workloads.runner import free_port

pytestmark = pytest.mark.slow

EXPECTED = {
    "cvm_vm_info",
    "cvm_vm_state",
    "cvm_vm_vcpus",
    "cvm_vm_memory_bytes",
    "cvm_vm_start_time_seconds",
    "cvm_vm_qemu_cpu_seconds_total",  # procfs of the domain's QEMU pid
    "cvm_vm_qemu_resident_memory_bytes",
    "cvm_vm_vcpu_seconds_total",  # libvirt's vcpu.<n>.time
    "cvm_vm_vcpu_delay_seconds_total",
    "cvm_vm_block_read_bytes_total",
    "cvm_vm_block_written_bytes_total",
    "cvm_vm_network_receive_bytes_total",
    "cvm_vm_network_transmit_bytes_total",
    "cvm_vm_balloon_bytes",
    "cvm_vm_kvm_stats_available",  # 0: TCG, told by query-stats-schemas through libvirt
}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def states_of(result: list[Any]) -> list[str]:
    return [series["metric"]["state"] for series in result]


def test_hostd_follows_a_libvirt_domain_into_prometheus(tmp_path: Path) -> None:
    libvirt = require_libvirt("prometheus")
    assert PROMETHEUS is not None
    name = f"cvmtest-{os.getpid()}"
    with domain_files() as files, libvirt_daemon(tmp_path / "libvirt") as uri:
        conn = libvirt.open(uri)
        domain = conn.defineXML(domain_xml(name, files))
        hostd: subprocess.Popen[str] | None = None
        try:
            domain.create()
            port = free_port()
            hostd = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "host_daemon.main",
                    "--state-dir",
                    str(tmp_path / "state"),
                    "--listen",
                    f"unix://{tmp_path}/hostd.sock",
                    "--metrics-listen",
                    f"tcp://127.0.0.1:{port}",
                    "--libvirt",
                    uri,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            with running_prometheus(tmp_path, prometheus_config(port)) as (base, process):
                began = time.monotonic()
                info = wait_for(base, f'cvm_vm_info{{vm="{name}", source="libvirt"}}', 90)
                print(f"first cvm_vm_info after {time.monotonic() - began:.1f} s", file=sys.stderr)
                assert info, (process.stderr, hostd.poll())
                assert wait_for(base, f'cvm_vm_block_read_bytes_total{{vm="{name}"}}', 30)
                query = f'count by (__name__) ({{vm="{name}", __name__=~"cvm_vm_.+"}})'
                names = metric_names(settle(base, query, lambda r: metric_names(r) >= EXPECTED, 30))
                running = settle(
                    base, f'cvm_vm_state{{vm="{name}"}} == 1', lambda r: states_of(r) == ["running"], 30
                )
                success = settle(
                    base,
                    f'cvm_vm_collector_success{{vm="{name}"}}',
                    lambda r: (
                        {s["metric"]["collector"]: s["value"][1] for s in r}
                        == {"procfs": "1", "libvirt": "1"}
                    ),
                    30,
                )
                listed = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "cvmctl.cli.main",
                        "vm",
                        "ls",
                        "--json",
                        "--host",
                        f"unix://{tmp_path}/hostd.sock",
                        "--libvirt",
                        uri,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
                # stopping the domain: its state turns to stopped within one refresh (1 s)
                domain.destroy()
                stopped_at = time.monotonic()
                while f'cvm_vm_state{{state="stopped",vm="{name}"}} 1.0' not in scrape(port):
                    assert time.monotonic() - stopped_at < 5, scrape(port)
                    time.sleep(0.1)
                seen_stopped = time.monotonic() - stopped_at
                stopped = wait_for(base, f'cvm_vm_state{{vm="{name}", state="stopped"}} == 1', 30)
                assert stopped
                after = scrape(port)
        finally:
            if hostd is not None:
                hostd.terminate()
                _, errors = hostd.communicate(timeout=30)
                print(errors[-4000:], file=sys.stderr)
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
            domain.undefine()
            conn.close()
    [series] = info
    labels: dict[str, Any] = series["metric"]
    assert labels["job"] == "cvm-hostd" and labels["tee"] == "none" and labels["machine"].startswith("pc-q35")
    assert labels["qemu_version"].startswith("10.")
    assert names >= EXPECTED, EXPECTED - names
    assert "cvm_vm_kvm_exits_total" not in names
    assert states_of(running) == ["running"]
    assert {s["metric"]["collector"]: s["value"][1] for s in success} == {
        "procfs": "1",
        "libvirt": "1",
    }
    assert seen_stopped < 5
    # cvmctl vm ls --libvirt: the daemon's VMs (none here) and the domain, read from libvirt
    [domain_row] = json.loads(listed.stdout)
    assert domain_row["name"] == name and domain_row["source"] == "libvirt"
    assert (domain_row["state"], domain_row["accel"], domain_row["vcpus"]) == ("running", "tcg", 1)
    assert domain_row["qemu_pid"] > 0 and domain_row["memory_bytes"] == 256 * 1024 * 1024
    # a stopped domain keeps its inventory, loses its process series
    assert 'cvm_vm_info{machine="pc-q35' in after
    assert f'cvm_vm_qemu_cpu_seconds_total{{mode="user",vm="{name}"}}' not in after
    print(
        f"libvirt domain: stopped state seen by the daemon {seen_stopped:.2f} s after destroy",
        file=sys.stderr,
    )
