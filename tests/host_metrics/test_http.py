"""The daemon's metrics endpoint: /metrics, /metrics/vm/<name>, /sd; promtool-clean output."""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from cvmcore.metrics_http import MAX_CONNECTIONS
from host_daemon.metrics.collector import HostCollector
from host_daemon.metrics.http import HostEndpoint, serve_host_metrics_http
from host_daemon.metrics.procfs import ProcfsReader
from host_daemon.metrics.state import VMView
from host_daemon.qmp import open_qmp
from tests.host_metrics.conftest import QEMU_PID, VCPU_TIDS, ProcTree, fake_qmp_client
from tests.host_metrics.fake_qmp import FakeQemu
from tests.slow_clients import SLOW_CONNECTIONS, scrape_beside_slow_clients


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def get(url: str) -> tuple[int, str, bytes]:
    return await trio.to_thread.run_sync(http_get, url)


def promtool_check_metrics(text: bytes) -> str:
    """``promtool check metrics`` output (empty when clean)."""
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    return (result.stdout + result.stderr).decode()


@asynccontextmanager
async def serving(collector: HostCollector) -> AsyncIterator[HostEndpoint]:
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.run)
        endpoint: HostEndpoint = await nursery.start(serve_host_metrics_http, collector, "127.0.0.1", 0)
        yield endpoint
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_routes_and_service_discovery(
    tmp_path: Path, proc_tree: ProcTree, agent_on_snp_tree: Path
) -> None:
    async with fake_qmp_client(tmp_path, FakeQemu(kvm=True)) as qmp:
        vm = VMView(
            "vm0",
            tee="sev-snp",
            machine="q35",
            qemu_version="10.0.2",
            pid=QEMU_PID,
            vcpu_tids=VCPU_TIDS,
            qmp=qmp,
            agent_address=f"unix://{agent_on_snp_tree}",
            boot_phases={"spawn": 0.1, "firmware": 1.0},
        )
        collector = HostCollector(lambda: [vm], procfs=ProcfsReader(proc_tree.root), guest_interval=0.2)
        async with serving(collector) as endpoint:
            with trio.fail_after(15):
                while collector.vms["vm0"].guest is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            base = f"http://127.0.0.1:{endpoint.port}"
            status, content_type, host_text = await get(base + "/metrics")
            assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
            assert b'cvm_vm_kvm_exits_total{vm="vm0"}' in host_text
            assert b'cvm_agent_up{vm="vm0"} 1.0' in host_text
            assert b'cvm_vm_block_read_bytes_total{device="disk0",vm="vm0"}' in host_text  # query-blockstats
            assert b"cvm_guest_" not in host_text  # guest series are per-VM targets
            status, _, vm_text = await get(base + "/metrics/vm/vm0")
            assert status == 200
            # vm, host and tee are the daemon's; the guest's own TEE claim is kept as exported_tee
            assert b'cvm_guest_info{exported_tee="sev-snp",host="' in vm_text
            assert b',tee="sev-snp",vm="vm0"}' in vm_text
            headers = {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"}
            request = urllib.request.Request(base + "/metrics/vm/vm0", headers=headers)
            reply = await trio.to_thread.run_sync(
                functools.partial(urllib.request.urlopen, request, timeout=10)
            )
            assert reply.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(reply.read()).endswith(b"# EOF\n")
            assert (await get(base + "/metrics/vm/nope"))[0] == 404
            assert (await get(base + "/nope"))[0] == 404
            status, content_type, sd = await get(base + "/sd")
            assert status == 200 and content_type == "application/json"
            [target] = json.loads(sd)
            assert target["targets"] == [f"127.0.0.1:{endpoint.port}"]
            assert target["labels"]["__metrics_path__"] == "/metrics/vm/vm0"
            assert target["labels"]["vm"] == "vm0" and target["labels"]["tee"] == "sev-snp"
            assert target["labels"]["host"]
            [host_target] = json.loads((await get(base + "/sd/host"))[2])
            assert host_target["targets"] == [f"127.0.0.1:{endpoint.port}"]
    if shutil.which("promtool"):
        assert promtool_check_metrics(host_text) == ""
        assert promtool_check_metrics(vm_text) == ""


QEMU = shutil.which("qemu-system-x86_64")


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
async def test_sigstopped_qemu_does_not_delay_the_others(tmp_path: Path) -> None:
    """Real QEMU processes (TCG, paused, no guest): one gets SIGSTOP; the scrape stays fast."""
    assert QEMU is not None
    qemu_args = ["-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64", "-smp", "2"]
    processes = [
        subprocess.Popen(  # noqa: ASYNC220 (fork and exec only: nothing waits)
            [QEMU, *qemu_args, "-qmp", f"unix:{tmp_path / name}.qmp,server=on,wait=off"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name in ("a", "b", "c")
    ]
    try:
        async with (
            open_qmp(tmp_path / "a.qmp", deadline=20, retry=True, name="a") as qa,
            open_qmp(tmp_path / "b.qmp", deadline=20, retry=True, name="b") as qb,
            open_qmp(tmp_path / "c.qmp", deadline=20, retry=True, name="c") as qc,
        ):
            vms = []
            for process, qmp in zip(processes, (qa, qb, qc), strict=True):
                cpus = await qmp.execute("query-cpus-fast", deadline=5)
                tids = tuple(int(cpu["thread-id"]) for cpu in cpus)
                vms.append(VMView(qmp.name, pid=process.pid, vcpu_tids=tids, qmp=qmp, qemu_version="10"))
            # No background refreshes (a tick between the manual ones would add a timeout), and a
            # deadline long enough that "the scrape does not wait for it" holds with room on a
            # loaded machine.
            collector = HostCollector(lambda: vms, deadline=2.0, interval=3600)
            async with serving(collector) as endpoint:
                url = f"http://127.0.0.1:{endpoint.port}/metrics"
                started = trio.current_time()
                await get(url)
                healthy = trio.current_time() - started
                processes[1].send_signal(signal.SIGSTOP)
                refresh = []
                for _ in range(3):
                    started = trio.current_time()
                    await collector.refresh_once()
                    refresh.append(trio.current_time() - started)
                started = trio.current_time()
                _, _, text = await get(url)
                stalled = trio.current_time() - started
                processes[1].send_signal(signal.SIGCONT)
        body = text.decode()
        # the scrape reads snapshots: a stuck VM does not slow it at all; a refresh waits its deadline at most
        assert stalled < healthy + 1.0, (healthy, stalled)
        assert max(refresh) < 2.0 + 1.0, refresh
        assert 'cvm_vm_collector_success{collector="qmp",vm="b"} 0.0' in body
        assert 'cvm_vm_collector_success{collector="qmp",vm="a"} 1.0' in body
        assert 'cvm_vm_collector_timeouts_total{collector="qmp",vm="b"} 3.0' in body
        assert 'cvm_vm_kvm_stats_available{vm="a"} 0.0' in body  # TCG: unavailable, no zeros
        assert 'cvm_vm_kvm_exits_total{vm="a"}' not in body
        assert 'cvm_vm_vcpu_seconds_total{vcpu="1",vm="c"}' in body
        assert 'cvm_vm_qemu_resident_memory_bytes{vm="b"}' in body  # procfs works on a stopped process
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait(10)


async def test_a_scrape_is_answered_while_200_slow_clients_hold_connections() -> None:
    async with serving(HostCollector(list, deadline=0.5)) as endpoint:
        status, seconds, dropped = await scrape_beside_slow_clients(endpoint.url, endpoint.port)
    print(
        f"host /metrics beside {SLOW_CONNECTIONS} slow connections: {seconds * 1000:.1f} ms, "
        f"{dropped} dropped"
    )
    assert status == 200
    assert dropped >= SLOW_CONNECTIONS - MAX_CONNECTIONS
