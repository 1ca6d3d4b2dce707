"""HTTP /metrics: serving, clean stop, scrapes that never wait on the kernel, a real Prometheus."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.registry import CollectorRegistry

from guest_agent.collectors import AgentStats, Roots, build_registry
from guest_agent.collectors.base import SlotState, SnapshotExporter, SnapshotSource
from guest_agent.collectors.registry import Refresher
from guest_agent.metrics_http import MetricsHttpServer, serve_metrics_http

SYSROOTS = Path(__file__).resolve().parent.parent / "fixtures" / "sysroots"


def fetch(url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


async def fixture_registry() -> CollectorRegistry:
    registry, refresher = build_registry(
        Roots.under(SYSROOTS / "kvm-guest-6.18"), AgentStats(), tee="none", process_metrics=False
    )
    await refresher.refresh_once()
    return registry


@pytest.fixture
def server() -> Iterator[MetricsHttpServer]:
    running = MetricsHttpServer(trio.run(fixture_registry), host="127.0.0.1", port=0)
    try:
        yield running
    finally:
        running.stop()


def test_serves_metrics_and_stops_cleanly(server: MetricsHttpServer) -> None:
    status, content_type, body = fetch(server.url)
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert 'cvm_guest_cpuidle_info{driver="haltpoll",governor="haltpoll"} 1.0' in body
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        fetch(server.url, timeout=2)
    with socket.socket() as probe:  # nothing listens there any more (TIME_WAIT aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        running = MetricsHttpServer(CollectorRegistry(), host="::1", port=0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert running.url.startswith("http://[::1]:")
        assert fetch(running.url)[0] == 200
    finally:
        running.stop()


async def test_trio_form_runs_until_cancelled() -> None:
    async with trio.open_nursery() as nursery:
        running: MetricsHttpServer = await nursery.start(
            serve_metrics_http, await fixture_registry(), "127.0.0.1", 0
        )
        status, _, body = await trio.to_thread.run_sync(fetch, running.url)
        assert status == 200 and "cvm_guest_info" in body
        nursery.cancel_scope.cancel()
    with pytest.raises(urllib.error.URLError):
        await trio.to_thread.run_sync(fetch, running.url, 2.0)


class StuckSource(SnapshotSource[int]):
    """A sysfs read that hangs until released (a locked driver, a wedged device)."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()

    def read(self) -> int:
        self.release.wait(30)
        return 1

    def families(self, snapshot: int) -> list[Any]:
        return []


async def test_a_hung_read_never_stalls_a_scrape() -> None:
    source = StuckSource()
    slot = SlotState(source)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotExporter([slot]))
    refresher = Refresher([slot], interval=0.1, read_deadline=0.2)
    running = MetricsHttpServer(registry, port=0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(refresher.run)  # the first refresh gives up after 0.2 s
            started = time.monotonic()
            _, _, body = await trio.to_thread.run_sync(fetch, running.url)
            assert time.monotonic() - started < 1.0
            assert 'cvm_scrape_collector_success{collector="stuck"} 0.0' in body
            nursery.cancel_scope.cancel()
    finally:
        source.release.set()
        running.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_agent(server: MetricsHttpServer, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (Debian package: prometheus)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: cvm-agent\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    query = urllib.parse.urlencode({"query": "cvm_guest_cpuidle_state_time_seconds_total"})
    url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
    result: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not result:
            time.sleep(0.5)
            try:
                result = json.loads(fetch(url, timeout=2)[2])["data"]["result"]
            except (urllib.error.URLError, ConnectionError):
                continue
    finally:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert result, f"no cvm_guest_cpuidle series in Prometheus; its log:\n{stderr.decode()[-2000:]}"
    series = {(r["metric"]["cpu"], r["metric"]["state"]): float(r["value"][1]) for r in result}
    assert series[("0", "haltpoll idle")] == 434.883613
    assert {r["metric"]["job"] for r in result} == {"cvm-agent"}
