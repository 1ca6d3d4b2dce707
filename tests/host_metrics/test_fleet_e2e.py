"""The whole chain for real: a dev guest under the daemon's VMManager, the exporter wired to it
(:func:`host_daemon.metrics.wiring.serve_host_metrics`), and Debian's Prometheus finding the
VM through ``/sd`` and answering both its host (``cvm_vm_*``) and guest (``cvm_guest_*``)
series. The guest boots under TCG and its agent answers over hybrid vsock
(vhost-device-vsock), so this takes a minute or more on a 2-core machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from host_daemon.devguest import complete_with_dev_guest
from host_daemon.metrics.wiring import serve_host_metrics
from host_daemon.vms import VMManager
from tests.host_metrics.conftest import (
    PROMETHEUS,
    metric_names,
    prometheus_config,
    running_prometheus,
    settle,
    start_dev_guest,
    wait_for,
)

pytestmark = pytest.mark.slow

EXPECTED = {
    "cvm_vm_info",
    "cvm_vm_boot_phase_seconds",
    "cvm_vm_kvm_stats_available",  # 0: TCG
    "cvm_vm_vcpu_seconds_total",
    "cvm_vm_qemu_cpu_seconds_total",
    "cvm_vm_qemu_resident_memory_bytes",
    "cvm_agent_up",
}
BOOT_SECONDS = 240.0  # TCG boot plus the agent importing grpc over 9p, on a loaded 2-core machine


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


async def test_prometheus_finds_a_dev_guest_through_the_daemon(tmp_path: Path) -> None:
    for tool in ("qemu-system-x86_64", "vhost-device-vsock", "prometheus"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is not installed")
    assert PROMETHEUS is not None
    manager = VMManager(tmp_path / "s", dev_guest=complete_with_dev_guest, boot_seconds=BOOT_SECONDS)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        try:
            await start_dev_guest(manager, "dev", BOOT_SECONDS)
            endpoint = await nursery.start(serve_host_metrics, manager, "tcp://127.0.0.1:0")
            with running_prometheus(tmp_path, prometheus_config(endpoint.port)) as (base, process):
                guest = await trio.to_thread.run_sync(wait_for, base, 'cvm_guest_info{vm="dev"}', 60)
                host = await trio.to_thread.run_sync(
                    wait_for, base, 'cvm_vm_vcpu_seconds_total{vm="dev"}', 60
                )
                assert guest and host, process.stderr
                query = 'count by (__name__) ({vm="dev", __name__=~"cvm_vm_.+|cvm_agent_up"})'
                names = await trio.to_thread.run_sync(
                    settle, base, query, lambda result: metric_names(result) >= EXPECTED, 30
                )
        finally:
            await manager.kill("dev")
            nursery.cancel_scope.cancel()
    found = metric_names(names)
    assert found >= EXPECTED, EXPECTED - found
    assert "cvm_vm_kvm_exits_total" not in found
    [info] = guest
    assert info["metric"]["job"] == "cvm-guests" and info["metric"]["tee"] == "none"
