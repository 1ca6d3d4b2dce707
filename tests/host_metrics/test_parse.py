"""The pure parsers: procfs lines, QMP statistics replies, the guest's exposition."""

from __future__ import annotations

import pytest

from host_daemon.metrics.parse import (
    TARGET_LABELS,
    GuestTextRejected,
    guest_family_name,
    parse_blockstats,
    parse_net_dev,
    parse_schedstat,
    parse_stat,
    parse_stats_schemas,
    parse_vcpu_stats,
    relabel_guest_families,
)
from host_daemon.metrics.procfs import ProcfsReader, ThreadNames, kernel_has_vhost_tasks
from tests.host_metrics.conftest import QEMU_PID, VCPU_TIDS, ProcTree, stat_line
from tests.host_metrics.fake_qmp import load


def test_stat_line_with_parentheses_and_spaces_in_comm() -> None:
    stat = parse_stat(stat_line(7, "qemu (x) y)", 1234, 56, 789))
    assert (stat.comm, stat.utime_ticks, stat.stime_ticks, stat.rss_pages) == ("qemu (x) y)", 1234, 56, 789)


@pytest.mark.parametrize("text", ["", "12 (x S 1", "12 (x) S 1 2 3"])
def test_stat_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_stat(text)


def test_schedstat() -> None:
    assert parse_schedstat("123456789 987654 42\n") == (123456789, 987654)
    with pytest.raises(ValueError):
        parse_schedstat("12\n")


def test_kvm_schema_units_and_scale() -> None:
    schemas = parse_stats_schemas(load("kvm-query-stats-schemas.json"))
    vcpu = schemas["vcpu"]
    assert vcpu["halt_poll_success_ns"].unit == "seconds"
    assert vcpu["halt_poll_success_ns"].scale == pytest.approx(1e-9)
    assert vcpu["exits"].scale == 1.0 and vcpu["exits"].type == "cumulative"
    assert vcpu["halt_wait_hist"].type == "log2-histogram"


def test_tcg_schema_has_no_kvm_provider() -> None:
    """Recorded from QEMU 10.0.2 under TCG: only cryptodev statistics exist."""
    assert parse_stats_schemas(load("tcg-query-stats-schemas.json")) == {}
    assert parse_stats_schemas(load("tcg-query-stats-schemas.json"), provider="cryptodev")


def test_vcpu_stats_summed_and_scaled() -> None:
    schemas = parse_stats_schemas(load("kvm-query-stats-schemas.json"))
    stats = parse_vcpu_stats(load("kvm-query-stats-vcpu.json"), schemas)
    assert stats.exits == 183452 + 184452
    assert stats.vcpu_exits == (183452.0, 184452.0)
    assert stats.exits_by_kind["halt"] == 61234 + 61334
    assert stats.exits_by_kind["io"] == 2 * 20411
    assert set(stats.exits_by_kind) >= {"halt", "io", "mmio", "irq", "signal"}
    assert stats.halt_poll_seconds["success"] == pytest.approx(2.5 + 1e-9)
    assert stats.halt_poll_seconds["fail"] == pytest.approx(5.0)
    assert stats.halt_wait_seconds == pytest.approx(150.0)
    assert stats.halt_poll_attempts == 2 * 52010
    # histograms (lists) and booleans are not summed as counters
    assert "halt_wait_hist" not in stats.names and "blocking" not in stats.names


def test_vcpu_stats_ignore_names_missing_from_schema() -> None:
    reply = [{"provider": "kvm", "stats": [{"name": "exits", "value": 5}, {"name": "new_thing", "value": 9}]}]
    stats = parse_vcpu_stats(reply, {"vcpu": {}})
    assert stats.exits == 0 and stats.names == frozenset()


def test_kernel_release_decides_vhost_threads() -> None:
    assert kernel_has_vhost_tasks("6.4.0")
    assert kernel_has_vhost_tasks("6.12.48+deb12-amd64")
    assert not kernel_has_vhost_tasks("6.1.0-28-amd64")
    assert not kernel_has_vhost_tasks("5.15.0")


GUEST_TEXT = """\
# HELP cvm_guest_info The guest.
# TYPE cvm_guest_info gauge
cvm_guest_info{kernel="6.12",tee="sev-snp"} 1.0
# HELP cvm_guest_agent_rpcs_total RPCs.
# TYPE cvm_guest_agent_rpcs_total counter
cvm_guest_agent_rpcs_total{code="OK",method="GetInfo",vm="forged"} 3.0
# HELP cvm_scrape_collector_success Collector ok.
# TYPE cvm_scrape_collector_success gauge
cvm_scrape_collector_success{collector="cpuidle"} 1.0
# HELP cvm_guest_agent_rpc_duration_seconds Time.
# TYPE cvm_guest_agent_rpc_duration_seconds histogram
cvm_guest_agent_rpc_duration_seconds_bucket{le="0.001",method="GetInfo"} 2.0
cvm_guest_agent_rpc_duration_seconds_bucket{le="+Inf",method="GetInfo"} 3.0
cvm_guest_agent_rpc_duration_seconds_count{method="GetInfo"} 3.0
cvm_guest_agent_rpc_duration_seconds_sum{method="GetInfo"} 0.004
"""


def test_guest_families_get_vm_label_and_keep_types() -> None:
    families = {f.name: f for f in relabel_guest_families(GUEST_TEXT, "vm0")}
    assert families["cvm_guest_info"].type == "gauge"
    assert families["cvm_guest_agent_rpcs"].type == "counter"
    assert families["cvm_guest_agent_rpc_duration_seconds"].type == "histogram"
    rpcs = families["cvm_guest_agent_rpcs"].samples[0]
    assert rpcs.name == "cvm_guest_agent_rpcs_total"
    assert rpcs.labels == {"code": "OK", "method": "GetInfo", "exported_vm": "forged", "vm": "vm0"}
    assert all(s.labels["vm"] == "vm0" for f in families.values() for s in f.samples)
    # the guest's own self-monitoring never mixes with the host's series of that name
    assert "cvm_guest_scrape_collector_success" in families
    histogram = families["cvm_guest_agent_rpc_duration_seconds"]
    buckets = [s for s in histogram.samples if s.name.endswith("_bucket")]
    assert [s.labels["le"] for s in buckets] == ["0.001", "+Inf"]


def test_guest_family_names_cannot_forge_host_series() -> None:
    assert guest_family_name("cvm_vm_kvm_exits") == "cvm_guest_vm_kvm_exits"
    assert guest_family_name("node_load1") == "cvm_guest_node_load1"
    assert guest_family_name("cvm_guest_info") == "cvm_guest_info"


def test_guest_text_bounds() -> None:
    many = "".join(f'cvm_guest_x{{i="{i}"}} 1\n' for i in range(30))
    with pytest.raises(GuestTextRejected):
        relabel_guest_families(many, "vm0", max_samples=20)
    with pytest.raises(GuestTextRejected):
        relabel_guest_families(f'cvm_guest_x{{i="{"a" * 300}"}} 1\n', "vm0")
    with pytest.raises(ValueError):
        relabel_guest_families("cvm_guest_x{ 1\n", "vm0")


FORGED = (
    'cvm_guest_info{vm="other",host="other-host",tee="tdx",job="cvm-hostd",instance="x:1"} 1\n'
    'cvm_vm_info{vm="victim",host="other-host",job="cvm-hostd"} 1\n'
)


def test_guest_cannot_set_target_labels() -> None:
    families = relabel_guest_families(FORGED, "vm0", target={"host": "h1", "tee": "sev-snp"})
    info, forged_host = (f.samples[0] for f in families)
    assert info.labels == {
        "vm": "vm0",
        "host": "h1",
        "tee": "sev-snp",
        "exported_vm": "other",
        "exported_host": "other-host",
        "exported_tee": "tdx",
        "exported_job": "cvm-hostd",
        "exported_instance": "x:1",
    }
    assert forged_host.name == "cvm_guest_vm_info" and forged_host.labels["host"] == "h1"
    assert not TARGET_LABELS - {"vm", "host", "tee", "job", "instance"}


def test_blockstats() -> None:
    reply = [
        {
            "device": "scratch0",
            "qdev": "/machine/peripheral/scratch0/virtio-backend",
            "stats": {"rd_bytes": 512},
        },
        {
            "device": "",
            "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
            "stats": {"wr_operations": 3},
        },
        {"device": "", "stats": {}},
    ]
    disks = parse_blockstats(reply)
    assert [(d.name, d.read_bytes, d.writes) for d in disks] == [
        ("scratch0", 512.0, 0.0),
        ("/machine/peripheral-anon/device[1]/virtio-backend", 0.0, 3.0),
    ]
    with pytest.raises(ValueError):
        parse_blockstats({})


NET_DEV = (  # man 5 proc: two header lines, then receive and transmit fields per interface
    "Inter-|   Receive                                |  Transmit\n"
    " face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls ...\n"
    "    lo: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
    "  tap0: 1000 10 0 0 0 0 0 0 5000 20 0 0 0 0 0 0\n"
)


def test_net_dev_from_the_vms_side() -> None:
    tap = parse_net_dev(NET_DEV)["tap0"]
    # the host side received 1000 bytes: the guest sent them
    assert (tap.read_bytes, tap.write_bytes, tap.reads, tap.writes) == (5000.0, 1000.0, 20.0, 10.0)
    assert set(parse_net_dev(NET_DEV)) == {"lo", "tap0"}


def test_procfs_reads_the_tap_of_qemus_namespace(proc_tree: ProcTree) -> None:
    (proc_tree.root / str(QEMU_PID) / "net").mkdir()
    (proc_tree.root / str(QEMU_PID) / "net" / "dev").write_text(NET_DEV)
    reader = ProcfsReader(proc_tree.root)
    assert [n.name for n in reader.read(QEMU_PID, VCPU_TIDS, ThreadNames(), "tap0").nets] == ["tap0"]
    assert reader.read(QEMU_PID, VCPU_TIDS, ThreadNames()).nets == ()  # host namespace: not the VM's
