"""cpuidle: which idle driver and governor run, and how each vCPU spends its idle time.

Files (Documentation/ABI/testing/sysfs-devices-system-cpu, Documentation/admin-guide/pm/cpuidle.rst):

* ``sys/devices/system/cpu/cpuidle/current_driver`` and ``current_governor`` (or
  ``current_governor_ro`` on kernels where the governor is not switchable).
* ``sys/devices/system/cpu/cpuN/cpuidle/stateK/``: ``name``; ``time`` (total microseconds
  spent in the state); ``usage`` (times the state was entered); ``above`` (entered, but the
  idle period was too short for it: a deeper state than ideal); ``below`` (a deeper state
  would have fit); ``rejected`` (entry requests the driver refused, newer kernels);
  ``latency`` (exit latency, microseconds); ``disable`` (1 if disabled for this CPU).

With the haltpoll driver a guest has ``POLL`` (state0, the polling loop) and
``haltpoll idle`` (state1, HLT, which exits to the hypervisor): the split of ``time`` between
them is the share of idle time spent polling instead of paying a VMEXIT.

No cpuidle driver registered (``current_driver`` reads ``none``, e.g. under QEMU TCG) means
no per-CPU state directories: the info metric is still exported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from guest_agent.collectors.base import CollectorUnavailable, SnapshotSource, read_sysfs_attribute

CPUIDLE_DIR = "sys/devices/system/cpu/cpuidle"
CPU_DIR = "sys/devices/system/cpu"
MICROSECONDS_PER_SECOND = 1e6

_CPU_NAME = re.compile(r"cpu(\d+)$")
_STATE_NAME = re.compile(r"state(\d+)$")


@dataclass(frozen=True)
class IdleState:
    """One cpuidle state of one CPU, as the kernel reports it (microseconds and counts)."""

    cpu: int
    index: int
    name: str
    time_us: int
    usage: int
    above: int | None
    below: int | None
    rejected: int | None
    latency_us: int
    disabled: bool


@dataclass(frozen=True)
class CpuidleSnapshot:
    driver: str
    governor: str
    states: tuple[IdleState, ...]


def parse_state(cpu: int, index: int, files: Mapping[str, str]) -> IdleState:
    """Build an :class:`IdleState` from the contents of a ``stateK`` directory's files."""

    def optional(name: str) -> int | None:
        text = files.get(name)
        return int(text) if text is not None and text.strip() else None

    return IdleState(
        cpu=cpu,
        index=index,
        name=files.get("name", f"state{index}").strip() or f"state{index}",
        time_us=int(files["time"]),
        usage=int(files["usage"]),
        above=optional("above"),
        below=optional("below"),
        rejected=optional("rejected"),
        latency_us=int(files.get("latency", "0")),
        disabled=files.get("disable", "0").strip() not in ("0", ""),
    )


def state_labels(states: Iterable[IdleState]) -> dict[tuple[int, int], str]:
    """The ``state`` label per (cpu, index): the state's name, made unique with ``#index``."""
    labels: dict[tuple[int, int], str] = {}
    seen: dict[tuple[int, str], int] = {}
    for state in states:
        key = (state.cpu, state.name)
        seen[key] = seen.get(key, 0) + 1
    for state in states:
        duplicate = seen[(state.cpu, state.name)] > 1
        labels[(state.cpu, state.index)] = f"{state.name}#{state.index}" if duplicate else state.name
    return labels


_STATE_FILES = ("name", "time", "usage", "above", "below", "rejected", "latency", "disable")


class CpuidleCollector(SnapshotSource[CpuidleSnapshot]):
    name = "cpuidle"

    def __init__(self, sysfs_root: Path) -> None:
        """``sysfs_root`` is the directory that holds ``sys/`` (``/`` in production)."""
        self.root = sysfs_root

    def _read_text(self, path: Path) -> str | None:
        try:
            return read_sysfs_attribute(path).strip()
        except OSError:
            return None

    def read(self) -> CpuidleSnapshot:
        base = self.root / CPUIDLE_DIR
        driver = self._read_text(base / "current_driver")
        if driver is None:
            raise CollectorUnavailable(f"{base} is absent: the kernel has no CONFIG_CPU_IDLE")
        governor = self._read_text(base / "current_governor") or self._read_text(base / "current_governor_ro")
        states: list[IdleState] = []
        cpu_dirs = []
        for entry in (self.root / CPU_DIR).iterdir():
            match = _CPU_NAME.match(entry.name)
            if match:
                cpu_dirs.append((int(match.group(1)), entry))
        for cpu, cpu_dir in sorted(cpu_dirs):
            idle_dir = cpu_dir / "cpuidle"
            if not idle_dir.is_dir():
                continue
            for state_dir in idle_dir.iterdir():
                match = _STATE_NAME.match(state_dir.name)
                if not match:
                    continue
                files = {}
                for file_name in _STATE_FILES:
                    text = self._read_text(state_dir / file_name)
                    if text is not None:
                        files[file_name] = text
                if "time" in files and "usage" in files:
                    states.append(parse_state(cpu, int(match.group(1)), files))
        states.sort(key=lambda s: (s.cpu, s.index))
        return CpuidleSnapshot(driver=driver, governor=governor or "none", states=tuple(states))

    def families(self, snapshot: CpuidleSnapshot) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "cvm_guest_cpuidle_info",
            "The cpuidle driver and governor in use (value 1).",
            labels=["driver", "governor"],
        )
        info.add_metric([snapshot.driver, snapshot.governor], 1.0)
        yield info

        labels = ["cpu", "state"]
        time = CounterMetricFamily(
            "cvm_guest_cpuidle_state_time_seconds",
            "Seconds the CPU spent in the idle state (sysfs stateK/time).",
            labels=labels,
        )
        entries = CounterMetricFamily(
            "cvm_guest_cpuidle_state_entries",
            "Times the CPU entered the idle state (sysfs stateK/usage).",
            labels=labels,
        )
        above = CounterMetricFamily(
            "cvm_guest_cpuidle_state_above",
            "Entries into the state whose idle period was too short for it (sysfs stateK/above).",
            labels=labels,
        )
        below = CounterMetricFamily(
            "cvm_guest_cpuidle_state_below",
            "Entries into the state when a deeper state would have fit (sysfs stateK/below).",
            labels=labels,
        )
        rejected = CounterMetricFamily(
            "cvm_guest_cpuidle_state_rejected",
            "Requests to enter the state that the driver rejected (sysfs stateK/rejected).",
            labels=labels,
        )
        latency = GaugeMetricFamily(
            "cvm_guest_cpuidle_state_exit_latency_seconds",
            "Exit latency of the idle state (sysfs stateK/latency).",
            labels=labels,
        )
        disabled = GaugeMetricFamily(
            "cvm_guest_cpuidle_state_disabled",
            "1 if the idle state is disabled for this CPU (sysfs stateK/disable).",
            labels=labels,
        )
        names = state_labels(snapshot.states)
        for state in snapshot.states:
            values = [str(state.cpu), names[(state.cpu, state.index)]]
            time.add_metric(values, state.time_us / MICROSECONDS_PER_SECOND)
            entries.add_metric(values, float(state.usage))
            if state.above is not None:
                above.add_metric(values, float(state.above))
            if state.below is not None:
                below.add_metric(values, float(state.below))
            if state.rejected is not None:
                rejected.add_metric(values, float(state.rejected))
            latency.add_metric(values, state.latency_us / MICROSECONDS_PER_SECOND)
            disabled.add_metric(values, 1.0 if state.disabled else 0.0)
        yield from (time, entries, above, below, rejected, latency, disabled)
