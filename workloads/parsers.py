"""Pure parsers of the benchmark tools' output (text in, numbers out, no I/O).

Each function takes one tool's stdout, as the bookworm package prints it, and returns
plain numbers; the workloads in :mod:`workloads.catalogue` turn them into samples. The
formats were read off real runs (``tests/workloads/fixtures/``, with the commands that
produced them) and from the tools' documentation:

- wrk 4.1.0 with ``--latency``: ``Requests/sec:`` and the ``Latency Distribution`` block
  (50/75/90/99 %), durations with a unit suffix (us, ms, s, m, h);
- iperf3 3.12 ``-J``: ``end.sum_received`` / ``end.sum_sent`` (TCP), and for UDP also
  ``end.sum`` with ``lost_percent`` and ``jitter_ms``;
- ping (iputils): one ``time=X ms`` per reply;
- memaslap (``memcaslap`` in libmemcached-tools 1.1.4): ``cmd_get:``/``cmd_set:`` counts and
  the closing ``Run time: 2.0s Ops: N TPS: N`` line;
- fio 3.33 ``--output-format=json``: ``jobs[0].read|write`` with ``iops``, ``iops_stddev``,
  ``bw_bytes``, ``lat_ns.mean|stddev`` (``--group_reporting`` folds numjobs into one);
- mbw 1.2.2 ``-q``: ``AVG\\tMethod: MEMCPY\\t... Copy: 11052.268 MiB/s``;
- sysbench 1.0.20: ``events per second:``, ``total number of events:``,
  ``MiB transferred (X MiB/sec)`` and the ``Latency (ms):`` block;
- stress-ng 0.15 ``--yaml /dev/stdout``: the ``metrics:`` list.

A parser that does not find what it needs raises :class:`ParseError` with the tool's name
and what was missing; a silent zero would be a wrong measurement.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cvmcore.errors import CvmError


class ParseError(CvmError):
    """A tool's output did not have the expected shape (the tool failed, or a new version)."""

    exit_code = 1


# -- wrk ----------------------------------------------------------------------------------

_WRK_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def wrk_duration_seconds(text: str) -> float:
    """``"5.38ms"`` -> 0.00538 (wrk prints latencies with us, ms, s, m or h)."""
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ParseError(f"wrk: cannot read the duration {text!r}")
    return float(match.group(1)) * _WRK_UNITS_S[match.group(2)]


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    latency_percentiles_s: dict[int, float]  # 50, 75, 90, 99 (with --latency)
    requests: int
    socket_errors: int  # connect + read + write + timeout
    non_2xx_3xx: int


def parse_wrk(text: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in ", text, re.M)
    if not rps or not total:
        raise ParseError("wrk: no 'Requests/sec:' line in its output")
    percentiles: dict[int, float] = {}
    block = text.split("Latency Distribution", 1)
    if len(block) == 2:
        for match in re.finditer(r"^\s+(\d+)%\s+(\S+)$", block[1], re.M):
            percentiles[int(match.group(1))] = wrk_duration_seconds(match.group(2))
    errors = 0
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if socket:
        errors = sum(int(g) for g in socket.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests_per_second=float(rps.group(1)),
        latency_percentiles_s=percentiles,
        requests=int(total.group(1)),
        socket_errors=errors,
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
    )


# -- iperf3 -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IperfResult:
    received_bits_per_second: float
    sent_bits_per_second: float
    retransmits: int | None  # TCP only
    lost_percent: float | None  # UDP only
    jitter_ms: float | None  # UDP only
    version: str


def parse_iperf3(text: str) -> IperfResult:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"iperf3: output is not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ParseError("iperf3: output is not a JSON object")
    if data.get("error"):
        raise ParseError(f"iperf3: {data['error']}")
    end: dict[str, Any] = data.get("end") or {}
    received = end.get("sum_received")
    sent = end.get("sum_sent")
    if not isinstance(received, dict) or not isinstance(sent, dict):
        raise ParseError("iperf3: no end.sum_received in its JSON")
    udp = end.get("sum") if isinstance(end.get("sum"), dict) else None
    return IperfResult(
        received_bits_per_second=float(received["bits_per_second"]),
        sent_bits_per_second=float(sent["bits_per_second"]),
        retransmits=int(sent["retransmits"]) if "retransmits" in sent else None,
        lost_percent=float(udp["lost_percent"]) if udp and "lost_percent" in udp else None,
        jitter_ms=float(udp["jitter_ms"]) if udp and "jitter_ms" in udp else None,
        version=str((data.get("start") or {}).get("version", "")),
    )


# -- ping ---------------------------------------------------------------------------------


def parse_ping_rtts_ms(text: str) -> list[float]:
    """The round-trip times of the replies, in order, in milliseconds."""
    rtts = [float(m.group(1)) for m in re.finditer(r"\btime[=<]([0-9.]+) ms", text)]
    if not rtts:
        raise ParseError("ping: no replies in its output")
    return rtts


# -- memaslap -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemaslapResult:
    gets: int
    sets: int
    get_misses: int
    seconds: float
    ops_per_second: float  # memaslap's TPS

    @property
    def gets_per_second(self) -> float:
        return self.gets / self.seconds

    @property
    def sets_per_second(self) -> float:
        return self.sets / self.seconds


def parse_memaslap(text: str) -> MemaslapResult:
    final = re.search(r"^Run time: ([0-9.]+)s Ops: (\d+) TPS: (\d+)", text, re.M)
    gets = re.search(r"^cmd_get: (\d+)", text, re.M)
    sets = re.search(r"^cmd_set: (\d+)", text, re.M)
    misses = re.search(r"^get_misses: (\d+)", text, re.M)
    if not final or not gets or not sets:
        raise ParseError("memaslap: no 'Run time: ... TPS:' summary in its output")
    seconds = float(final.group(1))
    if seconds <= 0:
        raise ParseError("memaslap: run time 0")
    return MemaslapResult(
        gets=int(gets.group(1)),
        sets=int(sets.group(1)),
        get_misses=int(misses.group(1)) if misses else 0,
        seconds=seconds,
        ops_per_second=float(final.group(3)),
    )


# -- fio ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FioDirection:
    iops: float
    iops_stddev: float
    bw_bytes_per_second: float
    lat_mean_ns: float
    lat_stddev_ns: float


def parse_fio(text: str) -> tuple[str, dict[str, FioDirection]]:
    """(fio version, {"read"|"write": numbers}) of the first job; directions with no I/O left out."""
    try:
        data = json.loads(text)
        job = data["jobs"][0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise ParseError("fio: output is not fio's JSON with a job") from None
    if job.get("error"):
        raise ParseError(f"fio: job {job.get('jobname', '?')} failed with error {job['error']}")
    result: dict[str, FioDirection] = {}
    for direction in ("read", "write"):
        d = job.get(direction) or {}
        if not d.get("total_ios"):
            continue
        lat = d.get("lat_ns") or {}
        result[direction] = FioDirection(
            iops=float(d["iops"]),
            iops_stddev=float(d.get("iops_stddev", 0.0)),
            bw_bytes_per_second=float(d["bw_bytes"]),
            lat_mean_ns=float(lat.get("mean", 0.0)),
            lat_stddev_ns=float(lat.get("stddev", 0.0)),
        )
    if not result:
        raise ParseError("fio: the job did no I/O")
    return str(data.get("fio version", "")), result


# -- mbw ----------------------------------------------------------------------------------


def parse_mbw(text: str) -> dict[str, float]:
    """{method: average MiB/s} from mbw's ``AVG`` lines (MEMCPY, DUMB, MCBLOCK)."""
    averages = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^AVG\s+Method: (\w+)\s.*Copy: ([0-9.]+) MiB/s", text, re.M)
    }
    if not averages:
        raise ParseError("mbw: no AVG line in its output")
    return averages


# -- sysbench -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SysbenchResult:
    total_time_s: float
    events: int
    events_per_second: float | None  # cpu test
    mib_per_second: float | None  # memory test
    latency_ms: dict[str, float]  # min, avg, max, 95th percentile, sum


def parse_sysbench(text: str) -> SysbenchResult:
    total_time = re.search(r"total time:\s+([0-9.]+)s", text)
    events = re.search(r"total number of events:\s+(\d+)", text)
    if not total_time or not events:
        raise ParseError("sysbench: no 'General statistics' in its output")
    eps = re.search(r"events per second:\s+([0-9.]+)", text)
    mib = re.search(r"MiB transferred \(([0-9.]+) MiB/sec\)", text)
    latency: dict[str, float] = {}
    block = text.split("Latency (ms):", 1)
    if len(block) == 2:
        for match in re.finditer(r"^\s+([\w ]+?):\s+([0-9.]+)$", block[1].split("\n\n", 1)[0], re.M):
            latency[match.group(1)] = float(match.group(2))
    return SysbenchResult(
        total_time_s=float(total_time.group(1)),
        events=int(events.group(1)),
        events_per_second=float(eps.group(1)) if eps else None,
        mib_per_second=float(mib.group(1)) if mib else None,
        latency_ms=latency,
    )


# -- stress-ng ----------------------------------------------------------------------------


def parse_stress_ng_yaml(text: str) -> dict[str, dict[str, float]]:
    """{stressor: {key: number}} from the ``metrics:`` list of stress-ng's YAML.

    Only the flat ``- stressor: NAME`` entries with ``key: number`` lines are read, which is
    all stress-ng writes there; no YAML library needed.
    """
    metrics: dict[str, dict[str, float]] = {}
    in_metrics = False
    current: dict[str, float] | None = None
    for line in text.splitlines():
        if not line.startswith(" "):
            in_metrics = line.strip() == "metrics:"
            current = None
            continue
        if not in_metrics:
            continue
        entry = re.match(r"\s+- stressor: (\S+)", line)
        if entry:
            current = metrics.setdefault(entry.group(1), {})
            continue
        pair = re.match(r"\s+([\w-]+): (-?[0-9.]+(?:e[-+]?\d+)?)$", line)
        if pair and current is not None:
            current[pair.group(1)] = float(pair.group(2))
    if not metrics:
        raise ParseError("stress-ng: no metrics in its YAML")
    return metrics
