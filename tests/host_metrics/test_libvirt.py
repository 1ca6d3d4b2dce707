"""The libvirt provider without libvirt: domain XML, stats records, and a fake connection.

The stats record is the one libvirt 11.3 gave for a running TCG domain on this machine
(``virsh domstats``, the same keys libvirt-python's ``getAllDomainStats`` returns).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from host_daemon.metrics.collector import HostCollector
from host_daemon.metrics.families import device_families, info_families, proc_families
from host_daemon.metrics.libvirt import (
    LibvirtFollower,
    domain_state,
    is_local_uri,
    parse_domain_stats,
    parse_domain_xml,
    qemu_pid_matches,
)

RECORD: dict[str, Any] = {
    "state.state": 1,
    "state.reason": 1,
    "cpu.time": 4210264000,
    "cpu.user": 3647300000,
    "cpu.system": 562963000,
    "cpu.haltpoll.success.time": 0,
    "cpu.haltpoll.fail.time": 0,
    "balloon.current": 262144,
    "balloon.maximum": 262144,
    "balloon.rss": 231700,
    "vcpu.current": 1,
    "vcpu.maximum": 1,
    "vcpu.0.state": 1,
    "vcpu.0.time": 3880000000,
    "vcpu.0.wait": 0,
    "vcpu.0.delay": 466717014,
    "net.count": 1,
    "net.0.name": "cvmtap0",
    "net.0.rx.bytes": 90,
    "net.0.rx.pkts": 1,
    "net.0.tx.bytes": 0,
    "net.0.tx.pkts": 0,
    "block.count": 1,
    "block.0.name": "vda",
    "block.0.path": "/tmp/disk.raw",
    "block.0.rd.reqs": 1,
    "block.0.rd.bytes": 512,
    "block.0.wr.reqs": 0,
    "block.0.wr.bytes": 0,
}

UUID = "8799279f-d633-4b2d-b2b3-8eac7d2e5390"
XML = f"""<domain type='kvm' id='3'>
  <name>snp0</name>
  <uuid>{UUID}</uuid>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='GiB'>2</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os><type arch='x86_64' machine='pc-q35-10.0'>hvm</type></os>
  <launchSecurity type='sev-snp' authorProvided='no' policy='0x00030000'/>
</domain>"""


def test_domain_xml() -> None:
    config = parse_domain_xml(XML)
    assert (config.name, config.uuid, config.domain_type, config.tee) == ("snp0", UUID, "kvm", "sev-snp")
    assert (config.machine, config.vcpus, config.memory_bytes) == ("pc-q35-10.0", 2, 2 * 1024**3)
    plain = parse_domain_xml("<domain type='qemu'><name>n</name><memory>1024</memory><vcpu>3</vcpu></domain>")
    assert (plain.tee, plain.vcpus, plain.memory_bytes) == ("none", 3, 1024 * 1024)
    assert parse_domain_xml("<domain><launchSecurity type='s390-pv'/></domain>").tee == "unknown"
    with pytest.raises(ValueError):
        parse_domain_xml("<network/>")
    with pytest.raises(ValueError):
        parse_domain_xml("<domain")


def test_domain_stats_in_base_units() -> None:
    stats = parse_domain_stats(RECORD)
    assert stats.state == "running"
    assert stats.cpu_seconds == {"user": 3.6473, "system": 0.562963}
    assert stats.vcpu_seconds == ((3.88, 0.466717014),)
    assert stats.balloon_bytes == 262144 * 1024
    assert [(b.name, b.read_bytes, b.reads) for b in stats.blocks] == [("vda", 512.0, 1.0)]
    assert [(n.name, n.read_bytes, n.write_bytes) for n in stats.nets] == [("cvmtap0", 90.0, 0.0)]
    shut_off = parse_domain_stats({"state.state": 5, "state.reason": 1})
    assert (shut_off.state, shut_off.blocks, shut_off.cpu_seconds) == ("stopped", (), {})


def test_states_and_helpers() -> None:
    assert [domain_state(s, 0) for s in range(8)] == [
        "other", "running", "running", "paused", "stopping", "stopped", "crashed", "paused",
    ]  # fmt: skip
    assert domain_state(5, 3) == "crashed"  # shut off, reason VIR_DOMAIN_SHUTOFF_CRASHED
    assert qemu_pid_matches(f"qemu\0-uuid\0{UUID}\0".encode(), UUID)
    assert not qemu_pid_matches(b"qemu\0-uuid\0other\0", UUID)
    assert not qemu_pid_matches(b"anything", "")
    assert is_local_uri("qemu:///system") and is_local_uri("qemu:///system?socket=/x/libvirt-sock")
    assert not is_local_uri("qemu+ssh://root@h1/system")


class FakeError(Exception):
    pass


class FakeDomain:
    def __init__(self, name: str, uuid: str, ident: int, *, broken: bool = False, xml: str = "") -> None:
        self._name, self._uuid, self._id, self.broken = name, uuid, ident, broken
        self.xml = xml or f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><vcpu>1</vcpu></domain>"

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._uuid

    def ID(self) -> int:
        return self._id

    def XMLDesc(self, flags: int) -> str:
        if self.broken:
            raise FakeError("access denied")
        return self.xml

    def state(self) -> list[int]:
        return [5, 1]


class FakeConnection:
    def __init__(self, domains: list[FakeDomain], records: dict[str, dict[str, Any]]) -> None:
        self.domains, self.records, self.alive = domains, records, True

    def isAlive(self) -> bool:
        return self.alive

    def getVersion(self) -> int:
        return 10000002

    def listAllDomains(self, flags: int) -> list[FakeDomain]:
        return self.domains

    def getAllDomainStats(self, stats: int, flags: int) -> list[tuple[FakeDomain, dict[str, Any]]]:
        return [(d, self.records[d.UUIDString()]) for d in self.domains if d.UUIDString() in self.records]

    def close(self) -> None:
        self.alive = False


def fake_follower(tmp_path: Path, conn: FakeConnection) -> LibvirtFollower:
    """A follower whose run dir names this test process as the QEMU of domain ``a``."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "a.pid").write_text(f"{os.getpid()}\n")
    proc = tmp_path / "proc"
    (proc / str(os.getpid())).mkdir(parents=True, exist_ok=True)
    (proc / str(os.getpid()) / "cmdline").write_bytes(b"qemu\0-uuid\0uuid-a\0")
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    (proc / str(os.getpid()) / "stat").write_text(stat)
    (proc / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    return LibvirtFollower(
        "qemu:///system", run_dir=run, procfs=proc, opener=lambda _: conn, passthrough=False
    )


def test_a_domain_that_cannot_be_read_costs_only_its_own_series(tmp_path: Path) -> None:
    conn = FakeConnection(
        [
            FakeDomain("a", "uuid-a", 1),
            FakeDomain("b", "uuid-b", 2, broken=True),
            FakeDomain("c", "uuid-c", -1),
        ],
        {"uuid-a": RECORD, "uuid-b": RECORD, "uuid-c": {"state.state": 5, "state.reason": 3}},
    )
    readings = {r.config.name: r for r in fake_follower(tmp_path, conn).poll()}
    a, b, c = readings["a"], readings["b"], readings["c"]
    assert a.error == "" and a.pid == os.getpid() and a.started_at > 1700000000 and a.qemu_version == "10.0.2"
    assert a.stats is not None and a.stats.blocks
    assert b.stats is None and "access denied" in b.error
    assert (c.state, c.pid, c.live) == ("crashed", 0, False)


async def test_collector_follows_libvirt_domains_next_to_its_own(tmp_path: Path) -> None:
    conn = FakeConnection([FakeDomain("a", "uuid-a", 1)], {"uuid-a": RECORD})
    follower = fake_follower(tmp_path, conn)
    collector = HostCollector(lambda: [], libvirt=follower, procfs=Path("/proc"))
    await collector.refresh_once()
    state = collector.vms["a"]
    assert state.view.source == "libvirt" and state.parts["libvirt"].success and state.parts["procfs"].success
    names = {f.name: f for f in (*info_families([state]), *proc_families([state]), *device_families([state]))}
    assert [s.labels["source"] for s in names["cvm_vm_info"].samples] == ["libvirt"]
    assert [s.labels["state"] for s in names["cvm_vm_state"].samples if s.value == 1] == ["running"]
    assert [s.value for s in names["cvm_vm_vcpu_seconds"].samples] == [3.88]  # from libvirt
    assert [s.labels["device"] for s in names["cvm_vm_block_read_bytes"].samples] == ["vda"]
    # the connection breaks: the domain keeps its last view, its libvirt part fails
    conn.alive = False
    follower._opener = lambda _: (_ for _ in ()).throw(OSError("libvirt is gone"))
    await collector.refresh_once()
    assert not collector.vms["a"].parts["libvirt"].success
    assert "libvirt is gone" in collector.vms["a"].parts["libvirt"].error
    # it stops: stopped state, no process series
    conn.records["uuid-a"] = {"state.state": 5, "state.reason": 1}
    conn.alive = True
    follower._opener = lambda _: conn
    await collector.refresh_once()
    stopped = collector.vms["a"]
    assert stopped.view.state == "stopped" and stopped.proc is None and "procfs" not in stopped.parts
