"""Following the domains a libvirt daemon runs: ``cvm-hostd --libvirt URI``.

Most CVMs in production are not started by cvm-hostd but by libvirt (directly, or under
OpenStack, KubeVirt and the like). :class:`LibvirtFollower` reads every domain of one libvirt
connection, read-only, and gives the host exporter a :class:`~.state.VMView` per domain next
to the daemon's own VMs, so the same ``cvm_vm_*`` families describe both (``source="libvirt"``
in ``cvm_vm_info``). One :meth:`LibvirtFollower.poll` per refresh, in a worker thread (the
libvirt-python calls block):

``virConnectListAllDomains``   every defined domain, running or not: its state for the inventory;
``virDomainGetXMLDesc``        once per domain start: vCPUs, memory, machine, emulator, and the
                               TEE from ``<launchSecurity type=...>`` (``sev``, ``sev-snp``,
                               ``tdx``; libvirt's formatdomain "Launch Security");
``virConnectGetAllDomainStats`` one call for all domains: ``state``, ``cpu.*`` (including
                               ``cpu.haltpoll.{success,fail}.time``), ``balloon.*``, ``vcpu.<n>.
                               {time,delay}``, ``block.<n>.{rd,wr}.{reqs,bytes}``,
                               ``net.<n>.{rx,tx}.{bytes,pkts}`` (libvirt's "virConnectGetAllDomainStats"
                               documentation names each field and its unit);
``virDomainQemuMonitorCommand`` QMP ``query-stats`` passed through libvirt, for the KVM exit
                               and halt-polling counters the daemon reads from its own VMs; only
                               on a read-write connection (libvirt refuses it on a read-only
                               one) and only while the domain answers it;
the domain's QEMU pid          from libvirt's pid file (``<run dir>/<name>.pid``, local URIs only),
                               checked against ``/proc/<pid>/cmdline`` (it must name the domain's
                               UUID): QEMU's CPU and memory and its vhost workers, read by
                               :mod:`.procfs` like the daemon's own QEMUs.

A domain that cannot be read (it stopped between two calls, libvirt refused its XML or its
monitor) loses that part of its series and shows it in ``cvm_vm_collector_success{collector=
"libvirt"}``; the other domains and the scrape are untouched. A connection that breaks is
opened again on the next refresh. libvirt-python is the optional ``libvirt`` extra; the
parsing here is pure and tested without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import structlog

from cvmcore.errors import UsageError
from host_daemon.metrics.parse import (
    DeviceCounters,
    KvmStats,
    StatSchema,
    parse_stat,
    parse_stats_schemas,
    parse_vcpu_stats,
    vcpu_stats_request,
)

log = structlog.get_logger("host_daemon.metrics.libvirt")

DEFAULT_RUN_DIR: Final = Path("/run/libvirt/qemu")

#: virDomainState (libvirt-domain.h) -> the exporter's VM states (those of the daemon's own VMs).
DOMAIN_STATES: Final[Mapping[int, str]] = {
    0: "other",  # VIR_DOMAIN_NOSTATE
    1: "running",
    2: "running",  # VIR_DOMAIN_BLOCKED: running, waiting on a resource
    3: "paused",
    4: "stopping",  # VIR_DOMAIN_SHUTDOWN: being shut down
    5: "stopped",  # VIR_DOMAIN_SHUTOFF
    6: "crashed",
    7: "paused",  # VIR_DOMAIN_PMSUSPENDED: suspended by guest power management
}
#: VIR_DOMAIN_SHUTOFF_CRASHED: shut off because the domain crashed (virDomainShutoffReason).
SHUTOFF_CRASHED: Final = 3
#: launchSecurity type -> the project's TEE names (cvmcore.tee).
LAUNCH_SECURITY: Final[Mapping[str, str]] = {"sev": "sev", "sev-snp": "sev-snp", "tdx": "tdx"}

#: VIR_DOMAIN_STATS_{STATE,CPU_TOTAL,BALLOON,VCPU,INTERFACE,BLOCK}
STATS_WANTED: Final = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20


class LibvirtUnavailable(UsageError):
    """libvirt-python is not installed, or the URI cannot be opened."""


# --------------------------------------------------------------------------------------------
# Pure: the domain XML and the stats records


@dataclass(frozen=True)
class DomainConfig:
    """What the domain's live XML says that the exporter uses."""

    name: str
    uuid: str
    domain_type: str  # "kvm", "qemu" (TCG), ...
    tee: str = "none"
    machine: str = ""
    vcpus: int = 0
    memory_bytes: float = 0.0


_XML_UNITS: Final[Mapping[str, int]] = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}


def parse_domain_xml(text: str) -> DomainConfig:
    """A domain's XML (``virDomainGetXMLDesc``) -> :class:`DomainConfig`; ``ValueError`` if it is not one."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"domain XML: {exc}") from exc
    if root.tag != "domain":
        raise ValueError(f"domain XML: root element is <{root.tag}>")
    memory = root.find("currentMemory")
    if memory is None:
        memory = root.find("memory")
    memory_bytes = 0.0
    if memory is not None and (memory.text or "").strip().isdigit():
        unit = memory.get("unit", "KiB").lower()  # libvirt's default unit is KiB
        memory_bytes = float(int((memory.text or "0").strip()) * _XML_UNITS.get(unit, 1024))
    vcpu = root.find("vcpu")
    vcpus = 0
    if vcpu is not None:
        current = vcpu.get("current") or (vcpu.text or "").strip()
        vcpus = int(current) if current.isdigit() else 0
    security = root.find("launchSecurity")
    tee = "none"
    if security is not None:
        tee = LAUNCH_SECURITY.get(security.get("type", ""), "unknown")
    os_type = root.find("os/type")
    return DomainConfig(
        name=(root.findtext("name") or "").strip(),
        uuid=(root.findtext("uuid") or "").strip(),
        domain_type=root.get("type", ""),
        tee=tee,
        machine=os_type.get("machine", "") if os_type is not None else "",
        vcpus=vcpus,
        memory_bytes=memory_bytes,
    )


def domain_state(state: int, reason: int) -> str:
    """The exporter's state name for a ``virDomainState`` and its reason."""
    if state == 5 and reason == SHUTOFF_CRASHED:
        return "crashed"
    return DOMAIN_STATES.get(state, "other")


@dataclass(frozen=True)
class DomainStats:
    """One record of ``virConnectGetAllDomainStats``, in base units (seconds, bytes)."""

    state: str
    cpu_seconds: Mapping[str, float] = field(default_factory=dict)  # "user", "system" (cpu.user/system)
    vcpu_seconds: tuple[tuple[float, float], ...] = ()  # per vCPU: (vcpu.<n>.time, vcpu.<n>.delay)
    balloon_bytes: float | None = None  # balloon.current
    balloon_maximum_bytes: float | None = None
    haltpoll_seconds: Mapping[str, float] = field(default_factory=dict)  # "success", "fail"
    blocks: tuple[DeviceCounters, ...] = ()
    nets: tuple[DeviceCounters, ...] = ()


def _number(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _devices(record: Mapping[str, Any], prefix: str, read: str, write: str, ops: str) -> list[DeviceCounters]:
    count = _number(record, f"{prefix}.count") or 0.0
    devices: list[DeviceCounters] = []
    for index in range(int(count)):
        base = f"{prefix}.{index}"
        name = record.get(f"{base}.name")
        if not isinstance(name, str):
            continue
        devices.append(
            DeviceCounters(
                name=name,
                read_bytes=_number(record, f"{base}.{read}.bytes") or 0.0,
                write_bytes=_number(record, f"{base}.{write}.bytes") or 0.0,
                reads=_number(record, f"{base}.{read}.{ops}") or 0.0,
                writes=_number(record, f"{base}.{write}.{ops}") or 0.0,
            )
        )
    return devices


def parse_domain_stats(record: Mapping[str, Any]) -> DomainStats:
    """A ``virConnectGetAllDomainStats`` record (the dict libvirt-python gives) -> :class:`DomainStats`.

    Times are nanoseconds and balloon sizes KiB in libvirt's record; absent fields (a shut-off
    domain has only ``state.*``) stay absent here.
    """
    state = domain_state(int(_number(record, "state.state") or 0), int(_number(record, "state.reason") or 0))
    cpu = {mode: v / 1e9 for mode in ("user", "system") if (v := _number(record, f"cpu.{mode}")) is not None}
    vcpus: list[tuple[float, float]] = []
    for index in range(int(_number(record, "vcpu.current") or 0)):
        ran = _number(record, f"vcpu.{index}.time")
        waited = _number(record, f"vcpu.{index}.delay")
        if ran is None:
            break
        vcpus.append((ran / 1e9, (waited or 0.0) / 1e9))
    current = _number(record, "balloon.current")
    maximum = _number(record, "balloon.maximum")
    haltpoll = {
        result: v / 1e9
        for result in ("success", "fail")
        if (v := _number(record, f"cpu.haltpoll.{result}.time")) is not None
    }
    return DomainStats(
        state=state,
        cpu_seconds=cpu,
        vcpu_seconds=tuple(vcpus),
        balloon_bytes=current * 1024 if current is not None else None,
        balloon_maximum_bytes=maximum * 1024 if maximum is not None else None,
        haltpoll_seconds=haltpoll,
        blocks=tuple(_devices(record, "block", "rd", "wr", "reqs")),
        nets=tuple(_devices(record, "net", "rx", "tx", "pkts")),
    )


def qemu_pid_matches(cmdline: bytes, uuid: str) -> bool:
    """Whether a ``/proc/<pid>/cmdline`` is that of the QEMU libvirt started for domain ``uuid``."""
    return bool(uuid) and uuid.encode() in cmdline.split(b"\0")


def is_local_uri(uri: str) -> bool:
    """A URI without a host part (``qemu:///system``): the domains' processes are on this machine."""
    return not urlsplit(uri).hostname


# --------------------------------------------------------------------------------------------
# One domain's reading


@dataclass(frozen=True)
class DomainReading:
    """What one poll read about one domain; ``error`` names the part that failed, if any."""

    config: DomainConfig
    state: str
    stats: DomainStats | None = None
    pid: int = 0
    started_at: float = 0.0  # the QEMU process's start, Unix seconds (0: unknown)
    qemu_version: str = ""  # the connection's hypervisor version (virConnectGetVersion)
    schemas: dict[str, dict[str, StatSchema]] | None = None  # None: passthrough not (yet) answered
    kvm: KvmStats | None = None
    error: str = ""
    duration_seconds: float = 0.0

    @property
    def live(self) -> bool:
        return self.state in ("running", "paused", "stopping")


@dataclass
class _Known:
    """Per domain start (uuid + domain id): what is asked once."""

    config: DomainConfig
    pid: int = 0
    started_at: float = 0.0
    schemas: dict[str, dict[str, StatSchema]] | None = None
    request: dict[str, Any] = field(default_factory=dict)
    passthrough_error: str = ""


def _open_libvirt(uri: str) -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise LibvirtUnavailable(
            "--libvirt needs libvirt-python: pip install 'cvmctl[libvirt]' (builds against libvirt-dev)"
        ) from exc
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError:
        try:
            return libvirt.openReadOnly(uri)
        except libvirt.libvirtError as exc:
            raise LibvirtUnavailable(f"cannot open libvirt at {uri}: {exc}") from exc


def _monitor_command(domain: Any, command: dict[str, Any]) -> Any:
    import libvirt_qemu

    reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, json.dumps(command), 0))
    if "error" in reply:
        raise ValueError(f"{command['execute']}: {reply['error'].get('desc', reply['error'])}")
    return reply.get("return")


class LibvirtFollower:
    """Reads every domain of one libvirt connection; :meth:`poll` blocks (run it in a thread)."""

    def __init__(
        self,
        uri: str,
        *,
        run_dir: Path = DEFAULT_RUN_DIR,
        procfs: Path = Path("/proc"),
        opener: Callable[[str], Any] = _open_libvirt,
        passthrough: bool = True,
    ) -> None:
        self.uri = uri
        self.run_dir = run_dir
        self.procfs = procfs
        self.local = is_local_uri(uri)
        self.passthrough = passthrough
        self._opener = opener
        self._conn: Any = None
        self._version = ""
        self._known: dict[tuple[str, int], _Known] = {}
        self._boot_time: float | None = None
        self._clock_ticks = os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _connection(self) -> Any:
        if self._conn is not None:
            try:
                if self._conn.isAlive():
                    return self._conn
            except Exception:
                pass
            self.close()
            log.warning("libvirt_reconnecting", uri=self.uri)
        self._conn = self._opener(self.uri)
        try:
            version = int(self._conn.getVersion())  # major * 1,000,000 + minor * 1,000 + release
            self._version = f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
        except Exception:
            self._version = ""
        return self._conn

    def poll(self) -> list[DomainReading]:
        """Every domain's reading; raises only when the connection itself fails."""
        conn = self._connection()
        try:
            domains = conn.listAllDomains(0)
            records = {dom.UUIDString(): stats for dom, stats in conn.getAllDomainStats(STATS_WANTED, 0)}
        except Exception:
            self.close()
            raise
        readings: list[DomainReading] = []
        seen: set[tuple[str, int]] = set()
        for domain in domains:
            started = time.monotonic()
            try:
                reading = self._read(domain, records, seen)
            except Exception as exc:
                try:
                    name = str(domain.name())
                except Exception:
                    continue
                reading = DomainReading(
                    DomainConfig(name, "", ""), "other", error=f"{type(exc).__name__}: {exc}"
                )
            took = time.monotonic() - started
            readings.append(dataclasses.replace(reading, qemu_version=self._version, duration_seconds=took))
        for key in set(self._known) - seen:
            del self._known[key]
        return readings

    def _read(
        self, domain: Any, records: Mapping[str, Mapping[str, Any]], seen: set[tuple[str, int]]
    ) -> DomainReading:
        uuid = str(domain.UUIDString())
        key = (uuid, int(domain.ID()))
        seen.add(key)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = _Known(parse_domain_xml(domain.XMLDesc(0)))
        record = records.get(uuid)
        if record is None:  # gone between the two calls, or libvirt had nothing for it
            state, reason = domain.state()
            return DomainReading(known.config, domain_state(int(state), int(reason)))
        stats = parse_domain_stats(record)
        reading = DomainReading(known.config, stats.state, stats)
        if stats.state not in ("running", "paused", "stopping"):
            return reading
        if self.local and not known.pid:
            known.pid, known.started_at = self._find_pid(known.config)
        errors: list[str] = []
        if self.passthrough and stats.state == "running" and not known.passthrough_error:
            try:
                kvm = self._kvm_stats(domain, known)
            except Exception as exc:
                # Refused (read-only connection, an ACL) or failing: not asked again for this start.
                known.passthrough_error = f"QMP passthrough: {type(exc).__name__}: {exc}"
                errors.append(known.passthrough_error)
                kvm = None
        else:
            kvm = None
        if self.local and not known.pid:
            errors.append("QEMU pid not found")
        return DomainReading(
            known.config,
            stats.state,
            stats,
            pid=known.pid,
            started_at=known.started_at,
            schemas=known.schemas,
            kvm=kvm,
            error="; ".join(errors),
        )

    def _kvm_stats(self, domain: Any, known: _Known) -> KvmStats | None:
        if known.schemas is None:
            known.schemas = parse_stats_schemas(_monitor_command(domain, {"execute": "query-stats-schemas"}))
            known.request = vcpu_stats_request(known.schemas)
        if not known.schemas.get("vcpu"):
            return None  # TCG or QEMU < 7.1: no KVM statistics (kvm_stats_available 0)
        reply = _monitor_command(domain, {"execute": "query-stats", "arguments": known.request})
        return parse_vcpu_stats(reply, known.schemas)

    def _find_pid(self, config: DomainConfig) -> tuple[int, float]:
        """The domain's QEMU pid and start time, from libvirt's pid file checked against /proc."""
        try:
            pid = int((self.run_dir / f"{config.name}.pid").read_text().strip())
            with open(f"{self.procfs}/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read()
            if not qemu_pid_matches(cmdline, config.uuid):
                return 0, 0.0
            with open(f"{self.procfs}/{pid}/stat") as handle:
                start_ticks = parse_stat(handle.read()).start_ticks
        except (OSError, ValueError):
            return 0, 0.0
        return pid, self._btime() + start_ticks / self._clock_ticks

    def _btime(self) -> float:
        if self._boot_time is None:
            self._boot_time = 0.0
            try:
                with open(f"{self.procfs}/stat") as handle:
                    for line in handle:
                        if line.startswith("btime "):
                            self._boot_time = float(line.split()[1])
            except OSError:
                pass
        return self._boot_time
