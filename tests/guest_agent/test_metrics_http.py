"""HTTP /metrics: serving, clean stop, scrapes that never wait on the kernel, a real Prometheus."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.registry import CollectorRegistry

from cvmcore.errors import UsageError
from cvmcore.metrics_http import (
    MAX_CONNECTIONS,
    METRICS_CONTENT_TYPE,
    ConnectionSlots,
    MetricsEndpoint,
    negotiate,
    parse_request_line,
    serve_metrics_http,
)
from guest_agent.collectors import AgentStats, Roots, build_registry
from guest_agent.collectors.base import SlotState, SnapshotExporter, SnapshotSource
from guest_agent.collectors.registry import Refresher
from tests.slow_clients import SLOW_CONNECTIONS, scrape_beside_slow_clients
from workloads.runner import free_port

SYSROOTS = Path(__file__).resolve().parent.parent / "fixtures" / "sysroots"


def fetch(url: str, timeout: float = 5.0, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def afetch(url: str, timeout: float = 5.0, method: str = "GET") -> tuple[int, str, str]:
    return await trio.to_thread.run_sync(fetch, url, timeout, method)


async def fixture_registry() -> CollectorRegistry:
    registry, refresher = build_registry(
        Roots.under(SYSROOTS / "kvm-guest-6.18"), AgentStats(), tee="none", process_metrics=False
    )
    await refresher.refresh_once()
    return registry


def test_request_line_parsing() -> None:
    request = parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept-Encoding:  gzip \r\n\r\n")
    assert request is not None
    assert (request.method, request.path) == ("GET", "/metrics")
    assert request.headers == {"host": "a", "accept-encoding": "gzip"}
    assert parse_request_line(b"garbage\r\n\r\n") is None


#: What Prometheus 2.42 sends (scrape/scrape.go, acceptHeader), and a curl-like default.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_negotiation_uses_client_python_helpers() -> None:
    openmetrics = negotiate({"accept": PROMETHEUS_ACCEPT, "accept-encoding": "gzip"})
    assert openmetrics.content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert openmetrics.gzip
    plain = negotiate({"accept": "*/*"})
    assert plain.content_type == METRICS_CONTENT_TYPE and not plain.gzip


async def test_openmetrics_and_gzip_over_http() -> None:
    async with trio.open_nursery() as nursery:
        endpoint: MetricsEndpoint = await nursery.start(
            serve_metrics_http, await fixture_registry(), "127.0.0.1", 0
        )

        def get() -> tuple[str, str, bytes]:
            headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
            with urllib.request.urlopen(
                urllib.request.Request(endpoint.url, headers=headers), timeout=5
            ) as reply:
                return reply.headers["Content-Type"], reply.headers["Content-Encoding"], reply.read()

        content_type, encoding, body = await trio.to_thread.run_sync(get)
        nursery.cancel_scope.cancel()
    assert content_type.startswith("application/openmetrics-text") and encoding == "gzip"
    text = gzip.decompress(body).decode()
    assert text.endswith("# EOF\n") and "cvm_guest_cpuidle_info" in text


async def test_serves_metrics_and_stops_cleanly() -> None:
    async with trio.open_nursery() as nursery:
        endpoint: MetricsEndpoint = await nursery.start(
            serve_metrics_http, await fixture_registry(), "127.0.0.1", 0
        )
        status, content_type, body = await afetch(endpoint.url)
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        assert 'cvm_guest_cpuidle_info{driver="haltpoll",governor="haltpoll"} 1.0' in body
        assert await afetch(endpoint.url, method="HEAD") == (200, content_type, "")
        assert (await afetch(endpoint.url.replace("/metrics", "/other")))[0] == 404
        assert (await afetch(endpoint.url, method="POST"))[0] == 405
        nursery.cancel_scope.cancel()
    with pytest.raises(urllib.error.URLError):
        await afetch(endpoint.url, 2.0)
    with socket.socket() as probe:  # nothing listens there any more (TIME_WAIT aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", endpoint.port))


async def test_a_silent_client_cannot_pin_the_server(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        endpoint: MetricsEndpoint = await nursery.start(
            serve_metrics_http, CollectorRegistry(), "127.0.0.1", 0
        )
        stream = await trio.open_tcp_stream("127.0.0.1", endpoint.port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # ... and never finishes the head
            with trio.fail_after(60):
                assert await stream.receive_some(100) == b""  # closed after the request timeout
        nursery.cancel_scope.cancel()


async def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    async with trio.open_nursery() as nursery:
        try:
            endpoint: MetricsEndpoint = await nursery.start(serve_metrics_http, CollectorRegistry(), "::1", 0)
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        assert endpoint.url.startswith("http://[::1]:")
        assert (await afetch(endpoint.url))[0] == 200
        nursery.cancel_scope.cancel()


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
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(refresher.run)  # the first refresh gives up after 0.2 s
            endpoint: MetricsEndpoint = await nursery.start(serve_metrics_http, registry, "127.0.0.1", 0)
            started = time.monotonic()
            _, _, body = await afetch(endpoint.url)
            assert time.monotonic() - started < 1.0
            assert 'cvm_scrape_collector_success{collector="stuck"} 0.0' in body
            nursery.cancel_scope.cancel()
    finally:
        source.release.set()


@pytest.mark.slow
async def test_a_real_prometheus_scrapes_the_agent(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (Debian package: prometheus)")
    port = free_port()
    query = urllib.parse.urlencode({"query": "cvm_guest_cpuidle_state_time_seconds_total"})
    url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
    result: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        endpoint: MetricsEndpoint = await nursery.start(
            serve_metrics_http, await fixture_registry(), "127.0.0.1", 0
        )
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: cvm-agent\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{endpoint.port}']}}]\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        process = await trio.lowlevel.open_process(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            with trio.move_on_after(60):
                while not result:
                    await trio.sleep(0.5)
                    try:
                        result = json.loads((await afetch(url, 2.0))[2])["data"]["result"]
                    except (OSError, KeyError, ValueError):  # URLError and a read's timeout are OSErrors
                        continue
        finally:
            process.terminate()
            with trio.move_on_after(20) as waited:
                await process.wait()
            if waited.cancelled_caught:
                process.kill()
                await process.wait()
            log.close()
        nursery.cancel_scope.cancel()
    log_tail = (tmp_path / "prometheus.log").read_text()[-2000:]
    assert result, f"no cvm_guest_cpuidle series in Prometheus; its log:\n{log_tail}"
    series = {(r["metric"]["cpu"], r["metric"]["state"]): float(r["value"][1]) for r in result}
    assert series[("0", "haltpoll idle")] == 434.883613
    assert {r["metric"]["job"] for r in result} == {"cvm-agent"}


async def test_a_scrape_is_answered_while_200_slow_clients_hold_connections() -> None:
    """Slowloris: silent half-requests fill the server, and the scrape still gets through
    (the oldest waiting connections are dropped to make room, so at most the limit stay open)."""
    async with trio.open_nursery() as nursery:
        endpoint: MetricsEndpoint = await nursery.start(
            serve_metrics_http, await fixture_registry(), "127.0.0.1", 0
        )
        status, seconds, dropped = await scrape_beside_slow_clients(endpoint.url, endpoint.port)
        print(
            f"scrape beside {SLOW_CONNECTIONS} slow connections: {seconds * 1000:.1f} ms, {dropped} dropped"
        )
        assert status == 200
        assert dropped >= SLOW_CONNECTIONS - MAX_CONNECTIONS
        nursery.cancel_scope.cancel()


async def test_connection_slots_drop_the_oldest_waiting_connection() -> None:
    slots = ConnectionSlots(limit=2)
    first, second = slots.admit(), slots.admit()
    assert first is not None and second is not None
    second.evictable = False  # rendering its answer: never dropped
    third = slots.admit()
    assert third is not None and first.scope.cancel_called and not second.scope.cancel_called
    third.evictable = False
    assert slots.admit() is None  # all busy rendering: the newcomer is closed
    assert (slots.dropped_total, slots.refused_total, slots.open) == (1, 1, 2)
    slots.release(second)
    assert slots.admit() is not None


async def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            UsageError, match=rf"cannot serve /metrics on tcp://127\.0\.0\.1:{port}: .*in use"
        ):
            await serve_metrics_http(CollectorRegistry(), "127.0.0.1", port)
