"""haltpoll: the governor's parameters (Documentation/virt/guest-halt-polling.rst).

``sys/module/haltpoll/parameters/``: ``guest_halt_poll_ns`` (the ceiling of the per-CPU poll
time, ns), ``guest_halt_poll_grow`` (factor applied when a poll was too short),
``guest_halt_poll_grow_start`` (ns, where growth starts from zero), ``guest_halt_poll_shrink``
(divisor applied when a poll was useless) and ``guest_halt_poll_allow_shrink`` (Y/N).
The directory exists when the haltpoll governor is built in or loaded, whatever governor runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from guest_agent.collectors.base import CollectorUnavailable, SnapshotSource, read_sysfs_attribute
from guest_agent.idle_polling import (
    HALTPOLL_PARAM_NAMES,
    HALTPOLL_PARAMS_DIR,
    HaltpollParams,
    parse_haltpoll_params,
)

NANOSECONDS_PER_SECOND = 1e9


class HaltpollCollector(SnapshotSource[HaltpollParams]):
    name = "haltpoll"

    def __init__(self, sysfs_root: Path) -> None:
        self.root = sysfs_root

    def read(self) -> HaltpollParams:
        directory = self.root / HALTPOLL_PARAMS_DIR
        files: dict[str, str] = {}
        for name in HALTPOLL_PARAM_NAMES:
            try:
                files[name] = read_sysfs_attribute(directory / name)
            except FileNotFoundError:
                continue
        if not files:
            raise CollectorUnavailable(f"{directory} is absent: no haltpoll governor in this kernel")
        return parse_haltpoll_params(files)

    def families(self, snapshot: HaltpollParams) -> Iterable[Metric]:
        for name, documentation, field, divisor in _GAUGES:
            value = getattr(snapshot, field)
            if value is not None:
                yield GaugeMetricFamily(name, documentation, value=float(value) / divisor)


# (metric, help, HaltpollParams field, divisor to base units)
_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    (
        "cvm_guest_haltpoll_max_poll_seconds",
        "Ceiling of the adaptive per-CPU poll time (guest_halt_poll_ns).",
        "guest_halt_poll_ns",
        NANOSECONDS_PER_SECOND,
    ),
    (
        "cvm_guest_haltpoll_grow_factor",
        "Factor the poll time grows by after a too-short poll (guest_halt_poll_grow).",
        "guest_halt_poll_grow",
        1.0,
    ),
    (
        "cvm_guest_haltpoll_grow_start_seconds",
        "Poll time that growth starts from (guest_halt_poll_grow_start).",
        "guest_halt_poll_grow_start",
        NANOSECONDS_PER_SECOND,
    ),
    (
        "cvm_guest_haltpoll_shrink_divisor",
        "Divisor the poll time shrinks by after a useless poll (guest_halt_poll_shrink).",
        "guest_halt_poll_shrink",
        1.0,
    ),
    (
        "cvm_guest_haltpoll_allow_shrink",
        "1 if the poll time may shrink (guest_halt_poll_allow_shrink).",
        "guest_halt_poll_allow_shrink",
        1.0,
    ),
)
