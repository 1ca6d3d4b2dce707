"""deploy/: promtool checks, the dashboard's structure, and every panel's query on a real Prometheus.

The real-Prometheus test starts Debian's ``prometheus`` on loopback with a configuration in
the shape of ``deploy/prometheus/prometheus.yml`` (the same rule files, http_sd jobs
``cvm-hostd`` and ``cvm-guests``), pointed at a host exporter serving two VMs: ``vm0`` with
a KVM-speaking fake QMP monitor and a real ``cvm-agent`` on a unix socket, ``vm1`` answering
as QEMU under TCG without an agent. Prometheus finds both through ``/sd``, scrapes them, and
then every panel query of the dashboard runs through its HTTP API (instant and range).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from host_daemon.metrics.collector import HostCollector
from host_daemon.metrics.http import serve_host_metrics_http
from host_daemon.metrics.state import VMView
from tests.conftest import REPO_ROOT
from tests.host_metrics.conftest import api, fake_qmp_client, prometheus_config, running_prometheus, wait_for
from tests.host_metrics.fake_qmp import FakeQemu

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cvm-overview.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")

#: What Grafana substitutes in a query before sending it (its built-in variables, and ours).
GRAFANA_VARIABLES = {
    "$__rate_interval": "15s",
    "$__interval": "5s",
    "$__range": "1m",
    "$vm": ".*",
    "$host": ".*",
}


def promtool(*args: str, cwd: Path | None = None) -> str:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "federation.yml"])
def test_promtool_check_config(config: str) -> None:
    assert "SUCCESS" in promtool("check", "config", str(DEPLOY / "prometheus" / config))


@needs_promtool
def test_promtool_check_and_test_rules() -> None:
    rules = sorted(str(p) for p in (DEPLOY / "prometheus" / "rules").glob("*.yml"))
    assert len(rules) == 2
    promtool("check", "rules", *rules)
    promtool("test", "rules", "tests/cvm-rules.test.yml", cwd=DEPLOY / "prometheus")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panel_targets(board: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target


def expand(query: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        query = query.replace(name, value)
    assert "$" not in query, f"unknown variable in {query}"
    return query


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    rows = {panel["title"] for panel in board["panels"] if panel["type"] == "row"}
    assert {
        "Per-VM overview",
        "KVM exits and halt polling",
        "Guest idle states",
        "Bounce buffers (swiotlb)",
        "Boot phases",
        "Attestation",
        "Inventory, disks and network",
    } <= rows
    # nothing produces benchmark series for Prometheus: no panel may wait for them
    assert not [t for _, t in panel_targets(board) if "cvm_bench_" in t["expr"]]
    provisioned = (DEPLOY / "grafana" / "provisioning" / "datasources" / "cvm-prometheus.yml").read_text()
    uid = re.search(r"uid: (\S+)", provisioned)
    assert uid is not None
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == uid.group(1)
    variables = {variable["name"] for variable in board["templating"]["list"]}
    for title, target in panel_targets(board):
        assert target["expr"].strip(), title
        used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__interval", "__range"}
        assert used <= variables, f"{title}: {used - variables}"
    provider = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "cvm.yml").read_text()
    assert "type: file" in provider


# --------------------------------------------------------------------------------------------
# A real Prometheus


def check_dashboard_against(base: str) -> dict[str, int]:
    """Run every panel query (instant and range) and variable query; return series counts per query."""
    board = dashboard()
    now = time.time()
    counts: dict[str, int] = {}
    for title, target in panel_targets(board):
        query = expand(target["expr"])
        instant = api(base, "/api/v1/query", query=query)
        assert instant["status"] == "success", (title, query, instant)
        ranged = api(base, "/api/v1/query_range", query=query, start=str(now - 60), end=str(now), step="2")
        assert ranged["status"] == "success", (title, query, ranged)
        counts[query] = len(instant["data"]["result"])
    for variable in board["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", expand(variable["definition"]))
        assert match is not None, variable
        values = api(base, f"/api/v1/label/{match.group(2)}/values", **{"match[]": match.group(1)})
        assert values["status"] == "success" and values["data"], variable
    return counts


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
async def test_real_prometheus_discovers_scrapes_and_answers_every_panel(
    tmp_path: Path, agent_on_snp_tree: Path
) -> None:
    assert PROMETHEUS is not None
    async with (
        fake_qmp_client(tmp_path, FakeQemu(kvm=True), "vm0") as qmp0,
        fake_qmp_client(tmp_path, FakeQemu(kvm=False), "vm1") as qmp1,
    ):
        me = os.getpid()
        vms = [
            VMView(
                "vm0",
                tee="sev-snp",
                machine="q35",
                qemu_version="10.0.2",
                pid=me,
                vcpu_tids=(me, threading.get_native_id()),
                qmp=qmp0,
                agent_address=f"unix://{agent_on_snp_tree}",
                boot_phases={"spawn": 0.05, "firmware": 2.0, "kernel": 3.0, "userspace": 4.0},
            ),
            VMView("vm1", machine="q35", qemu_version="10.0.2", pid=me, vcpu_tids=(me,), qmp=qmp1),
        ]
        collector = HostCollector(lambda: vms, guest_interval=0.5)
        async with trio.open_nursery() as nursery:
            await nursery.start(collector.run)
            endpoint = await nursery.start(serve_host_metrics_http, collector, "127.0.0.1", 0)
            with running_prometheus(tmp_path, prometheus_config(endpoint.port)) as (base, process):
                host = await trio.to_thread.run_sync(wait_for, base, 'cvm_vm_kvm_exits_total{vm="vm0"}', 60)
                guest = await trio.to_thread.run_sync(wait_for, base, 'cvm_guest_info{vm="vm0"}', 60)
                assert host and guest, process.stderr
                # discovery labels: the guest target carries vm, tee and host
                [series] = guest
                assert series["metric"]["job"] == "cvm-guests" and series["metric"]["tee"] == "sev-snp"
                assert host[0]["metric"]["job"] == "cvm-hostd" and host[0]["metric"]["host"]
                targets = await trio.to_thread.run_sync(api, base, "/api/v1/targets")
                scraped = {t["labels"].get("vm", "") for t in targets["data"]["activeTargets"]}
                assert scraped == {"", "vm0"}  # the daemon itself, and the one VM with an agent
                await trio.sleep(4)  # enough samples for rate() over the dashboard's 15 s
                counts = await trio.to_thread.run_sync(check_dashboard_against, base)
                rules = await trio.to_thread.run_sync(api, base, "/api/v1/rules")
            nursery.cancel_scope.cancel()
    assert counts[expand('cvm_vm_info{vm=~"$vm", host=~"$host"}')] == 2
    assert (
        counts[
            expand('sum by (vm) (rate(cvm_vm_kvm_exits_total{vm=~"$vm", host=~"$host"}[$__rate_interval]))')
        ]
        == 1
    )
    assert counts[expand('cvm_guest_cpuidle_info{vm=~"$vm", host=~"$host"}')] == 1
    assert counts[expand('cvm_vm_boot_phase_seconds{vm=~"$vm", host=~"$host"}')] == 4
    groups = rules["data"]["groups"]
    assert len(groups) == 3
    assert all(rule["health"] != "err" for group in groups for rule in group["rules"]), groups
