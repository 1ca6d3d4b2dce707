"""Every dashboard panel against a real fleet: a dev guest of the daemon's and a libvirt domain.

The daemon's VMManager boots the dev guest (TCG, its agent over hybrid vsock), a private
libvirtd runs a TCG domain (``tests/host_metrics/libvirt_env.py``), and the exporter follows
both (``serve_host_metrics(..., libvirt=URI)``). Debian's Prometheus scrapes it with the
deploy/ rule files, then every panel query of the dashboard runs through its HTTP API.

Each panel must return data, except those whose series this machine cannot produce, named
in :data:`NEEDS_MORE_THAN_THIS_MACHINE` with the reason: the KVM statistics need KVM (both VMs
run under TCG: QEMU's ``query-stats`` has no ``kvm`` provider), kernel vhost workers need
``/dev/vhost-net`` (absent here; the dev guest's vsock is vhost-user, a user-space process),
the guest's haltpoll driver needs KVM's poll-control feature, attestation needs a TEE, and so
do bounce buffers (or more than 4 GiB) and guest idle states (a TCG guest has none).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import trio

from host_daemon.devguest import complete_with_dev_guest
from host_daemon.metrics.wiring import serve_host_metrics
from host_daemon.vms import VMManager
from tests.host_metrics.conftest import (
    PROMETHEUS,
    prometheus_config,
    running_prometheus,
    start_dev_guest,
    wait_for,
)
from tests.host_metrics.libvirt_env import domain_files, domain_xml, libvirt_daemon, require_libvirt
from tests.host_metrics.test_deploy import check_dashboard_against, dashboard, expand, panel_targets

pytestmark = pytest.mark.slow

BOOT_SECONDS = 240.0

NEEDS_MORE_THAN_THIS_MACHINE = {
    "KVM": {
        "VM exits /s",
        "VM exits by class /s",
        "VM exits per vCPU /s",
        "Halt polling time (cores)",
        "Halt poll success ratio",
        "Halt wait (cores)",
        "Halt polls /s",
    },
    "kernel vhost (/dev/vhost-net)": {"vhost worker CPU (cores)"},
    "KVM poll control in the guest (cpuidle-haltpoll)": {"Guest halt polling (haltpoll)"},
    "a TEE": {
        "Attestation requests /s",
        "Attestation latency p50 / p99",
        "Since last successful attestation",
    },
    "a guest idle driver (the TCG dev guest has no cpuidle states, only the driver-less info)": {
        "Idle state residency (cores)",
        "Idle state entries /s",
        "Idle too deep / too shallow /s",
    },
    "swiotlb, which x86 sets up for a CVM or above 4 GiB (the dev guest has 1 GiB)": {
        "swiotlb used / size",
        "swiotlb fill",
    },
}


async def test_every_panel_answers_for_a_dev_guest_and_a_libvirt_domain(tmp_path: Path) -> None:
    libvirt = require_libvirt("vhost-device-vsock", "prometheus")
    assert PROMETHEUS is not None
    domain_name = f"cvmpanel-{os.getpid()}"
    manager = VMManager(tmp_path / "s", dev_guest=complete_with_dev_guest, boot_seconds=BOOT_SECONDS)
    with domain_files() as files, libvirt_daemon(tmp_path / "libvirt") as uri:
        conn = libvirt.open(uri)
        domain = conn.defineXML(domain_xml(domain_name, files))
        try:
            domain.create()
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.run)
                try:
                    await start_dev_guest(manager, "dev", BOOT_SECONDS)
                    serve = functools.partial(serve_host_metrics, manager, "tcp://127.0.0.1:0", libvirt=uri)
                    endpoint = await nursery.start(serve)
                    with running_prometheus(tmp_path, prometheus_config(endpoint.port)) as (base, process):
                        for query in (
                            'cvm_guest_info{vm="dev"}',
                            f'cvm_vm_block_reads_total{{vm="{domain_name}"}}',
                        ):
                            found = await trio.to_thread.run_sync(wait_for, base, query, 90)
                            assert found, (query, process.stderr)
                        await trio.sleep(35)  # two rule evaluations (30 s) and enough samples for rate()
                        counts = await trio.to_thread.run_sync(check_dashboard_against, base)
                finally:
                    await manager.kill("dev")
                    nursery.cancel_scope.cancel()
        finally:
            domain.destroy()
            domain.undefine()
            conn.close()
    answered: dict[str, bool] = {}
    for title, target in panel_targets(dashboard()):
        answered[title] = answered.get(title, False) or counts[expand(target["expr"])] > 0
    expected_empty = set().union(*NEEDS_MORE_THAN_THIS_MACHINE.values())
    empty = {title for title, has_data in answered.items() if not has_data}
    print(f"panels with data: {len(answered) - len(empty)} of {len(answered)}; empty: {sorted(empty)}")
    assert empty <= expected_empty, sorted(empty - expected_empty)
