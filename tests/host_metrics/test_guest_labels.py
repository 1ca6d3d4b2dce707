"""A hostile guest cannot forge the labels that say where a series comes from.

The guest's exposition is relayed by the daemon (``/metrics/vm/<name>``) and scraped by a
real Prometheus through ``/sd`` with the job shapes of ``deploy/prometheus/prometheus.yml``
(``cvm-guests`` honours the labels it receives). The guest claims ``vm``, ``host``, ``tee``,
``job`` and ``instance`` of another VM, another host and the daemon's own job; in Prometheus
every one of its series carries the daemon's values, and the forged ones only survive as
``exported_*`` labels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from host_daemon.metrics.collector import HostCollector
from host_daemon.metrics.http import serve_host_metrics_http
from host_daemon.metrics.state import VMView
from tests.host_metrics.conftest import PROMETHEUS, api, prometheus_config, running_prometheus, wait_for

HOSTILE = b"""\
# TYPE cvm_guest_info gauge
cvm_guest_info{vm="victim",host="other-host",tee="none",job="cvm-hostd",instance="10.0.0.9:9465"} 1
# TYPE cvm_vm_kvm_exits counter
cvm_vm_kvm_exits_total{vm="victim",host="other-host"} 1e9
# TYPE up gauge
up{job="cvm-hostd",host="other-host",instance="other-host:9465"} 0
"""


@asynccontextmanager
async def hostile_agent(address: str, timeout: float) -> AsyncIterator[Callable[[], Awaitable[bytes]]]:
    async def fetch() -> bytes:
        return HOSTILE

    yield fetch


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
async def test_forged_labels_do_not_survive_a_real_prometheus(tmp_path: Path) -> None:
    view = VMView("vm0", tee="sev-snp", pid=os.getpid(), agent_address="unix:///nowhere")
    collector = HostCollector(lambda: [view], guest_interval=0.5, agent_session=hostile_agent)
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.run)
        serve = functools.partial(serve_host_metrics_http, collector, "127.0.0.1", 0, host_label="h1")
        endpoint = await nursery.start(serve)
        with running_prometheus(tmp_path, prometheus_config(endpoint.port)) as (base, process):
            found = await trio.to_thread.run_sync(wait_for, base, "cvm_guest_info", 60)
            assert found, process.stderr
            await trio.sleep(2)  # a few scrapes of both jobs
            every = await trio.to_thread.run_sync(
                functools.partial(api, base, "/api/v1/query", query='{__name__=~".+"}')
            )
        nursery.cancel_scope.cancel()
    series = [s["metric"] for s in every["data"]["result"]]
    # Series without a job (recording rules' results) are not scraped ones: not asked about.
    guest = [s for s in series if s.get("job") == "cvm-guests"]
    assert {s["__name__"] for s in guest} >= {
        "cvm_guest_info",
        "cvm_guest_vm_kvm_exits_total",
        "cvm_guest_up",
    }
    for labels in guest:
        assert labels["vm"] == "vm0" and labels["host"] == "h1" and labels["tee"] == "sev-snp", labels
        assert labels["instance"] == endpoint.advertised, labels
    [info] = [s for s in guest if s["__name__"] == "cvm_guest_info"]
    assert info["exported_host"] == "other-host" and info["exported_job"] == "cvm-hostd"
    # nothing anywhere claims the other host, the victim VM, or a guest series under the daemon's job
    assert not [s for s in series if s.get("host") == "other-host" or s.get("vm") == "victim"]
    assert not [s for s in series if s.get("job") == "cvm-hostd" and s["__name__"].startswith("cvm_guest_")]
    ups = {(s["job"], s.get("vm", "")) for s in series if s["__name__"] == "up"}
    assert ups == {("cvm-hostd", ""), ("cvm-guests", "vm0")}
