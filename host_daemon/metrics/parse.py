"""Pure parsers for what the host exporter reads: procfs lines, QMP statistics, guest text.

Nothing here does I/O, so every function is tested against recorded inputs.

procfs (Documentation/filesystems/proc.rst, man 5 proc):

- ``/proc/<pid>/stat`` and ``/proc/<pid>/task/<tid>/stat``: one line; field 2 is the command
  in parentheses (it may hold spaces and parentheses, so the line is split at the *last*
  ``)``), then field 3 onwards separated by spaces. Field 14 ``utime`` and 15 ``stime`` are
  clock ticks (``sysconf(_SC_CLK_TCK)``), field 24 ``rss`` is pages. ``utime`` includes guest
  time (field 43): a KVM vCPU thread running its guest counts as user time of QEMU.
- ``/proc/<pid>/task/<tid>/schedstat``: three numbers, ``run_ns wait_ns timeslices``: time
  spent on a CPU, time spent runnable on a run queue waiting for one (the vCPU's "steal"
  seen from the host, libvirt's ``vcpu.N.delay``), and how many times it ran.

QMP statistics (QEMU ``qapi/stats.json``, since 7.1): ``query-stats-schemas`` lists, per
provider (``kvm``, ``cryptodev``) and target (``vm``, ``vcpu``), each statistic's ``type``
(``cumulative``, ``instant``, ``peak``, ``linear-histogram``, ``log2-histogram``), optional
``unit`` (``bytes``, ``seconds``, ``cycles``, ``boolean``) and the scale ``base ** exponent``
(``halt_poll_success_ns``: unit seconds, base 10, exponent -9). ``query-stats`` with
``{"target": "vcpu", "providers": [{"provider": "kvm"}]}`` returns one ``StatsResult`` per
vCPU: ``{"provider": "kvm", "qom-path": "/machine/unattached/device[0]", "stats": [{"name":
"exits", "value": 1234}, ...]}``; histogram values are lists. The names are KVM's binary
statistics (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"; the x86 set in
arch/x86/kvm/x86.c): coarse exit classes, not VMX/SVM exit reasons. Under TCG no ``kvm``
provider exists: the schema has none and ``query-stats`` returns ``[]``.

Guest exposition: the agent's ``GetMetrics`` text (format 0.0.4) is parsed with
client_python's parser, which keeps each family's type, and re-emitted with the ``vm``
label; see :func:`relabel_guest_families` for what is renamed and what is bounded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# --------------------------------------------------------------------------------------------
# procfs


@dataclass(frozen=True)
class TaskStat:
    """The fields of ``/proc/<pid>[/task/<tid>]/stat`` the exporter uses."""

    comm: str
    utime_ticks: int
    stime_ticks: int
    rss_pages: int
    start_ticks: int  # since boot: with the pid, names one process across pid reuse


def parse_stat(text: str) -> TaskStat:
    """Parse a ``stat`` line; raises ``ValueError`` when it is not one."""
    head, sep, rest = text.rpartition(")")
    if not sep or "(" not in head:
        raise ValueError(f"not a /proc stat line: {text[:80]!r}")
    comm = head.split("(", 1)[1]
    fields = rest.split()
    # fields[0] is field 3 (state): field n is fields[n - 3].
    if len(fields) < 22:
        raise ValueError(f"short /proc stat line ({len(fields) + 2} fields)")
    return TaskStat(
        comm=comm,
        utime_ticks=int(fields[11]),
        stime_ticks=int(fields[12]),
        rss_pages=int(fields[21]),
        start_ticks=int(fields[19]),
    )


def parse_schedstat(text: str) -> tuple[int, int]:
    """``(run_ns, wait_ns)`` from a ``schedstat`` line; raises ``ValueError`` otherwise."""
    fields = text.split()
    if len(fields) < 2:
        raise ValueError(f"not a schedstat line: {text[:80]!r}")
    return int(fields[0]), int(fields[1])


def is_vhost_worker(comm: str, qemu_pid: int) -> bool:
    """Whether a thread or kernel thread named ``comm`` is a vhost worker of QEMU ``qemu_pid``.

    Linux >= 6.4 runs each vhost worker as a thread of the QEMU process (``vhost_task``);
    before, as a kernel thread. Both are named ``vhost-<pid of the owner>``.
    """
    return comm == f"vhost-{qemu_pid}"


# --------------------------------------------------------------------------------------------
# QMP statistics


@dataclass(frozen=True)
class StatSchema:
    """One statistic of ``query-stats-schemas``: its type and the factor to base units."""

    type: str
    unit: str  # "" when the statistic is a plain count
    scale: float  # base ** exponent


KVM_PROVIDER: Final = "kvm"


def parse_stats_schemas(reply: object, provider: str = KVM_PROVIDER) -> dict[str, dict[str, StatSchema]]:
    """``{target: {name: StatSchema}}`` for ``provider`` from a ``query-stats-schemas`` reply.

    An empty result means the provider is absent (no KVM: TCG, or an old QEMU).
    """
    if not isinstance(reply, list):
        raise ValueError("query-stats-schemas: expected a list")
    schemas: dict[str, dict[str, StatSchema]] = {}
    for entry in reply:
        if not isinstance(entry, dict) or entry.get("provider") != provider:
            continue
        target = str(entry.get("target", ""))
        table = schemas.setdefault(target, {})
        for stat in entry.get("stats", []):
            exponent = int(stat.get("exponent", 0))
            base = int(stat.get("base", 10)) if exponent else 1
            table[str(stat["name"])] = StatSchema(
                type=str(stat.get("type", "")), unit=str(stat.get("unit", "")), scale=float(base) ** exponent
            )
    return schemas


#: KVM vCPU counters exported as ``cvm_vm_kvm_exits_by_kind_total{kind}``: name -> kind.
EXIT_KINDS: Final[Mapping[str, str]] = {
    "halt_exits": "halt",
    "io_exits": "io",
    "mmio_exits": "mmio",
    "irq_exits": "irq",
    "irq_window_exits": "irq_window",
    "nmi_window_exits": "nmi_window",
    "signal_exits": "signal",
    "request_irq_exits": "request_irq",
}


#: Every vCPU statistic the exporter reads: what it asks ``query-stats`` for (``names``).
WANTED_VCPU_STATS: Final = (
    "exits",
    *EXIT_KINDS,
    "halt_poll_success_ns",
    "halt_poll_fail_ns",
    "halt_wait_ns",
    "halt_attempted_poll",
    "halt_successful_poll",
    "halt_wakeup",
)


def vcpu_stats_request(schemas: Mapping[str, Mapping[str, StatSchema]]) -> dict[str, Any]:
    """The ``query-stats`` arguments for the vCPU counters the exporter uses that the schema has.

    ``StatsRequest.names`` (qapi/stats.json, since 7.1) keeps QEMU from sending the ~45
    statistics and histograms per vCPU that are not exported: the reply shrinks from about
    3.7 KiB to about 1 KiB per vCPU, and decoding it is most of a refresh's cost.
    """
    available = schemas.get("vcpu", {})
    names = [name for name in WANTED_VCPU_STATS if name in available]
    return {"target": "vcpu", "providers": [{"provider": KVM_PROVIDER, "names": names}]}


@dataclass(frozen=True)
class KvmStats:
    """KVM's per-vCPU statistics of one VM, summed, in base units (seconds, counts)."""

    exits: float
    exits_by_kind: Mapping[str, float]
    halt_poll_seconds: Mapping[str, float]  # "success" / "fail"
    halt_wait_seconds: float
    halt_poll_attempts: float
    halt_poll_successes: float
    halt_wakeups: float
    vcpu_exits: tuple[float, ...]  # per vCPU, in the order QEMU listed them
    vcpu_halt_exits: tuple[float, ...]
    names: frozenset[str] = field(default_factory=frozenset)  # every scalar statistic seen


def _scaled(stats: Sequence[Mapping[str, Any]], schema: Mapping[str, StatSchema]) -> dict[str, float]:
    values: dict[str, float] = {}
    for stat in stats:
        name = str(stat.get("name", ""))
        value = stat.get("value")
        described = schema.get(name)
        # Histograms are lists; booleans and instants are not counters; unknown names lack a unit.
        if described is None or described.type != "cumulative":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        values[name] = value * described.scale
    return values


def parse_vcpu_stats(reply: object, schemas: Mapping[str, Mapping[str, StatSchema]]) -> KvmStats:
    """Sum a ``query-stats`` (target ``vcpu``, provider ``kvm``) reply over the vCPUs."""
    if not isinstance(reply, list):
        raise ValueError("query-stats: expected a list")
    schema = schemas.get("vcpu", {})
    per_vcpu = [
        _scaled(result.get("stats", []), schema)
        for result in reply
        if isinstance(result, dict) and result.get("provider") == KVM_PROVIDER
    ]

    def total(name: str) -> float:
        return sum(v.get(name, 0.0) for v in per_vcpu)

    names = frozenset(name for v in per_vcpu for name in v)
    return KvmStats(
        exits=total("exits"),
        exits_by_kind={kind: total(name) for name, kind in EXIT_KINDS.items() if name in names},
        halt_poll_seconds={"success": total("halt_poll_success_ns"), "fail": total("halt_poll_fail_ns")},
        halt_wait_seconds=total("halt_wait_ns"),
        halt_poll_attempts=total("halt_attempted_poll"),
        halt_poll_successes=total("halt_successful_poll"),
        halt_wakeups=total("halt_wakeup"),
        vcpu_exits=tuple(v.get("exits", 0.0) for v in per_vcpu),
        vcpu_halt_exits=tuple(v.get("halt_exits", 0.0) for v in per_vcpu),
        names=names,
    )


@dataclass(frozen=True)
class DeviceCounters:
    """One disk's or one network interface's counters (bytes and requests / packets)."""

    name: str
    read_bytes: float  # block: rd.bytes; net: rx.bytes, received by the VM
    write_bytes: float  # block: wr.bytes; net: tx.bytes, sent by the VM
    reads: float  # block: rd.reqs; net: rx.pkts
    writes: float  # block: wr.reqs; net: tx.pkts


def parse_net_dev(text: str) -> dict[str, DeviceCounters]:
    """``/proc/<pid>/net/dev`` (man 5 proc: two header lines, then ``name: 8 receive fields 8
    transmit fields``) -> per interface, counters **from the VM's side** of a tap: what the host
    side received (fields 1-2) the guest sent (``write_*``), and the other way round, as libvirt
    reports a tap's ``net.<n>.rx.*`` (received by the domain)."""
    interfaces: dict[str, DeviceCounters] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 16:
            continue
        rx_bytes, rx_packets, tx_bytes, tx_packets = (int(fields[i]) for i in (0, 1, 8, 9))
        interfaces[name.strip()] = DeviceCounters(
            name.strip(), float(tx_bytes), float(rx_bytes), float(tx_packets), float(rx_packets)
        )
    return interfaces


def parse_blockstats(reply: object) -> tuple[DeviceCounters, ...]:
    """Each disk's counters from a QMP ``query-blockstats`` reply (qapi/block-core.json, BlockStats).

    A disk is named by its drive id (``device``, what ``-drive id=`` set), else its qdev path or
    node name; ``rd_bytes``, ``wr_bytes``, ``rd_operations``, ``wr_operations`` are cumulative.
    """
    if not isinstance(reply, list):
        raise ValueError("query-blockstats: expected a list")
    disks: list[DeviceCounters] = []
    for entry in reply:
        stats = entry.get("stats") if isinstance(entry, dict) else None
        if not isinstance(stats, dict):
            continue
        name = str(entry.get("device") or entry.get("qdev") or entry.get("node-name") or "")
        if not name:
            continue
        disks.append(
            DeviceCounters(
                name=name,
                read_bytes=float(stats.get("rd_bytes", 0)),
                write_bytes=float(stats.get("wr_bytes", 0)),
                reads=float(stats.get("rd_operations", 0)),
                writes=float(stats.get("wr_operations", 0)),
            )
        )
    return tuple(disks)


# --------------------------------------------------------------------------------------------
# Guest exposition

GUEST_PREFIX: Final = "cvm_guest_"
MAX_GUEST_SAMPLES: Final = 20000
MAX_LABEL_VALUE: Final = 256


class GuestTextRejected(ValueError):
    """The guest's exposition breaks a bound (too many samples, label values too long)."""


def guest_family_name(name: str) -> str:
    """The name a guest family gets on the host.

    ``cvm_guest_*`` keeps its name. Anything else gets the ``cvm_guest_`` prefix (a leading
    ``cvm_`` dropped), so the guest's ``cvm_scrape_collector_success`` becomes
    ``cvm_guest_scrape_collector_success`` and never mixes with the host's own series of
    that name, nor can a guest forge a ``cvm_vm_*`` series.
    """
    if name.startswith(GUEST_PREFIX):
        return name
    return GUEST_PREFIX + name.removeprefix("cvm_")


#: Labels only the daemon (or Prometheus) may set on a guest series: the target labels of
#: ``/sd`` (``vm``, ``host``, ``tee``) and the ones Prometheus adds itself (``job``, ``instance``).
TARGET_LABELS: Final = frozenset({"vm", "host", "tee", "job", "instance"})


def relabel_guest_families(
    text: str,
    vm: str,
    *,
    target: Mapping[str, str] | None = None,
    max_samples: int = MAX_GUEST_SAMPLES,
) -> list[Metric]:
    """The guest's families, renamed by :func:`guest_family_name`, each sample with ``vm=<vm>``.

    Types (counter, gauge, histogram, summary, info, unknown) are kept. The guest is not
    trusted (in a CVM the host does not trust it either): a label it sets whose name is one of
    :data:`TARGET_LABELS` is kept as
    ``exported_<name>``, as Prometheus does with clashing target labels, and then ``vm`` and
    the daemon's ``target`` labels (``host``, ``tee``) are written over it. The scrape job
    honours the labels it receives (``honor_labels: true``), so what arrives in Prometheus is
    what the daemon wrote, never what the guest claimed; a ``job`` or ``instance`` the guest
    set cannot override the target's either. More than ``max_samples`` samples or a label
    value over :data:`MAX_LABEL_VALUE` characters rejects the whole text
    (:class:`GuestTextRejected`). Unparseable text raises ``ValueError``.
    """
    fixed = {**(target or {}), "vm": vm}
    families: list[Metric] = []
    count = 0
    for family in text_string_to_metric_families(text):
        name = guest_family_name(family.name)
        out = Metric(name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            count += 1
            if count > max_samples:
                raise GuestTextRejected(f"more than {max_samples} samples")
            labels: dict[str, str] = {}
            for label, value in sample.labels.items():
                if len(value) > MAX_LABEL_VALUE:
                    raise GuestTextRejected(
                        f"a label value of {sample.name} is longer than {MAX_LABEL_VALUE}"
                    )
                if label in TARGET_LABELS:  # (client_python's parser refuses "__" names)
                    label = "exported_" + label
                labels[label] = value
            labels.update(fixed)
            out.samples.append(
                Sample(name + sample.name[len(family.name) :], labels, sample.value, sample.timestamp)
            )
        families.append(out)
    return families
