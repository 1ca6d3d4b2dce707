"""CPU time of a running process, per thread, in nanoseconds, from procfs.

Process CPU times (``/proc/PID/stat``, psutil's ``cpu_times``) tick at 10 ms: too coarse for
an idle daemon, which uses about 100 ms of CPU in two minutes. Each thread's
``/proc/PID/task/TID/schedstat`` counts nanoseconds on CPU; a :class:`ThreadCpuSampler`
reads them now and then so that threads which start and end between two reads still
count (a thread's counter is gone once it exits, so a sample taken before it exits keeps it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: grpcio's core threads (timers, its thread pool's lifeguard), whatever runs on top
GRPC_CORE_THREAD_PREFIXES = ("event_engine", "grpc_global_tim", "lifeguard")


def read_thread_cpu(pid: int, proc: Path = Path("/proc")) -> dict[str, tuple[str, int]]:
    """Per thread id of ``pid``: (thread name, nanoseconds on CPU so far)."""
    threads: dict[str, tuple[str, int]] = {}
    task_dir = proc / str(pid) / "task"
    for tid in os.listdir(task_dir):
        try:
            name = (task_dir / tid / "comm").read_text().strip()
            nanoseconds = int((task_dir / tid / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
        threads[tid] = (name, nanoseconds)
    return threads


@dataclass
class ThreadCpuSampler:
    """CPU a process used since the sampler was made; call :meth:`sample` every second or so."""

    pid: int
    proc: Path = Path("/proc")
    _baseline: dict[str, int] = field(init=False)
    _latest: dict[str, tuple[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self._baseline = {tid: ns for tid, (_, ns) in read_thread_cpu(self.pid, self.proc).items()}
        self._latest = {}

    def sample(self) -> None:
        self._latest.update(read_thread_cpu(self.pid, self.proc))

    def used_ns(self) -> dict[str, tuple[str, int]]:
        """Per thread seen: (name, nanoseconds used since the sampler was made)."""
        self.sample()
        return {tid: (name, ns - self._baseline.get(tid, 0)) for tid, (name, ns) in self._latest.items()}

    def seconds(self, name_prefixes: Iterable[str] | None = None) -> float:
        """CPU seconds used, by every thread or by those whose names start with a prefix."""
        prefixes = tuple(name_prefixes) if name_prefixes is not None else None
        return (
            sum(ns for name, ns in self.used_ns().values() if prefixes is None or name.startswith(prefixes))
            / 1e9
        )
