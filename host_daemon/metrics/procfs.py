"""Reading one QEMU process's procfs files: CPU, memory, vCPU threads, vhost workers.

Blocking file reads, run by :class:`~host_daemon.metrics.collector.HostCollector` in a worker
thread under the VM's deadline; the parsing is :mod:`.parse`. The procfs root is injectable
(``ProcfsReader(Path("tests/tree/proc"))``), as node_exporter's ``--path.procfs`` and
client_python's ``ProcessCollector(proc=...)`` allow, so tests run against recorded trees.

vhost workers: on Linux >= 6.4 they are threads of the QEMU process named ``vhost-<pid>``,
found in ``/proc/<pid>/task/*/comm`` (a thread's name is read once and cached by tid). On
older kernels they are kernel threads of the same name, found by scanning ``/proc/*/stat``;
that scan costs one read per process on the host, so it is shared by every VM and repeated
at most every :data:`KTHREAD_SCAN_SECONDS`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from host_daemon.metrics.parse import (
    DeviceCounters,
    TaskStat,
    is_vhost_worker,
    parse_net_dev,
    parse_schedstat,
    parse_stat,
)

KTHREAD_SCAN_SECONDS: Final = 60.0
_VHOST_COMM: Final = re.compile(r"vhost-(\d+)$")


def read_small(path: str) -> str:
    """One ``read`` of a small procfs file (a stat line, a schedstat line, a comm)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode("latin-1")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProcReading:
    """What one refresh read about one QEMU process, in base units."""

    cpu_seconds: Mapping[str, float]  # "user", "system"
    resident_bytes: float
    vcpu_run_seconds: tuple[float | None, ...]  # per vCPU; None: the thread is gone
    vcpu_wait_seconds: tuple[float | None, ...]
    vhost_seconds: tuple[float, ...]  # per vhost worker, ordered by thread id
    nets: tuple[DeviceCounters, ...] = ()  # the tap in QEMU's network namespace, the VM's view


@dataclass
class ThreadNames:
    """Per-VM cache: which of QEMU's thread ids are vhost workers (comm read once per tid)."""

    vhost: dict[int, bool] = field(default_factory=dict)


def kernel_has_vhost_tasks(release: str) -> bool:
    """Linux >= 6.4 runs vhost workers as threads of their owner (``vhost_task``)."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        return True
    return (int(match.group(1)), int(match.group(2))) >= (6, 4)


class ProcfsReader:
    """Reads QEMU processes under ``procfs`` (default ``/proc``)."""

    def __init__(
        self,
        procfs: Path = Path("/proc"),
        *,
        clock_ticks: int | None = None,
        page_size: int | None = None,
        kernel_release: str | None = None,
    ) -> None:
        self.procfs = str(procfs)
        self.clock_ticks = clock_ticks or os.sysconf("SC_CLK_TCK")
        self.page_size = page_size or os.sysconf("SC_PAGE_SIZE")
        if kernel_release is None:
            try:
                kernel_release = read_small(f"{self.procfs}/sys/kernel/osrelease").strip()
            except OSError:
                kernel_release = os.uname().release
        self.vhost_threads = kernel_has_vhost_tasks(kernel_release)
        self._kthreads: dict[int, list[int]] = {}
        self._kthreads_at = -KTHREAD_SCAN_SECONDS

    def _stat(self, path: str) -> TaskStat:
        return parse_stat(read_small(path))

    def _seconds(self, stat: TaskStat) -> float:
        return (stat.utime_ticks + stat.stime_ticks) / self.clock_ticks

    def read(self, pid: int, vcpu_tids: Sequence[int], names: ThreadNames, tap: str = "") -> ProcReading:
        """Read QEMU ``pid``; raises ``OSError`` when the process is gone, ``ValueError`` on garbage.

        ``tap``: the VM's tap, in the network namespace QEMU runs in (the daemon's tap path),
        whose counters ``/proc/<pid>/net/dev`` shows; empty for a VM in the host's namespace,
        whose ``net/dev`` lists the host's interfaces, not the VM's.
        """
        base = f"{self.procfs}/{pid}"
        stat = self._stat(f"{base}/stat")
        run: list[float | None] = []
        wait: list[float | None] = []
        for tid in vcpu_tids:
            try:
                run_ns, wait_ns = parse_schedstat(read_small(f"{base}/task/{tid}/schedstat"))
            except (OSError, ValueError):
                run.append(None)
                wait.append(None)
                continue
            run.append(run_ns / 1e9)
            wait.append(wait_ns / 1e9)
        return ProcReading(
            cpu_seconds={
                "user": stat.utime_ticks / self.clock_ticks,
                "system": stat.stime_ticks / self.clock_ticks,
            },
            resident_bytes=float(stat.rss_pages * self.page_size),
            vcpu_run_seconds=tuple(run),
            vcpu_wait_seconds=tuple(wait),
            vhost_seconds=self._vhost_seconds(pid, names),
            nets=self._tap(pid, tap) if tap else (),
        )

    def _tap(self, pid: int, tap: str) -> tuple[DeviceCounters, ...]:
        # One read: the daemon's namespace holds lo and the tap only, a few hundred bytes.
        counters = parse_net_dev(read_small(f"{self.procfs}/{pid}/net/dev")).get(tap)
        return (counters,) if counters is not None else ()

    def _vhost_seconds(self, pid: int, names: ThreadNames) -> tuple[float, ...]:
        if self.vhost_threads:
            base = f"{self.procfs}/{pid}/task"
            tids = sorted(int(entry) for entry in os.listdir(base) if entry.isdigit())
            known = names.vhost
            for stale in set(known) - set(tids):
                del known[stale]
            workers: list[str] = []
            for tid in tids:
                flag = known.get(tid)
                if flag is None:
                    try:
                        flag = is_vhost_worker(read_small(f"{base}/{tid}/comm").strip(), pid)
                    except OSError:
                        continue  # the thread just exited
                    known[tid] = flag
                if flag:
                    workers.append(f"{base}/{tid}/stat")
        else:
            workers = [f"{self.procfs}/{kpid}/stat" for kpid in self._kernel_vhost_threads().get(pid, [])]
        seconds: list[float] = []
        for path in workers:
            try:
                seconds.append(self._seconds(self._stat(path)))
            except (OSError, ValueError):
                continue
        return tuple(seconds)

    def _kernel_vhost_threads(self) -> Mapping[int, list[int]]:
        """``{owner pid: [kernel thread pids]}`` of ``vhost-<owner>`` kernel threads (cached scan)."""
        now = time.monotonic()
        if now - self._kthreads_at < KTHREAD_SCAN_SECONDS:
            return self._kthreads
        found: dict[int, list[int]] = {}
        for entry in os.listdir(self.procfs):
            if not entry.isdigit():
                continue
            try:
                comm = read_small(f"{self.procfs}/{entry}/comm").strip()
            except OSError:
                continue
            match = _VHOST_COMM.match(comm)
            if match:
                found.setdefault(int(match.group(1)), []).append(int(entry))
        for pids in found.values():
            pids.sort()
        self._kthreads, self._kthreads_at = found, now
        return found


# --------------------------------------------------------------------------------------------
# CPU of every thread of a process, for the benchmarks that measure an idle daemon

#: grpcio's core threads (timers, its thread pool's lifeguard), whatever runs on top
GRPC_CORE_THREAD_PREFIXES: Final = ("event_engine", "grpc_global_tim", "lifeguard")


def read_thread_cpu(pid: int, procfs: Path = Path("/proc")) -> dict[str, tuple[str, int]]:
    """Per thread id of ``pid``: (thread name, nanoseconds on CPU so far, from schedstat)."""
    threads: dict[str, tuple[str, int]] = {}
    base = f"{procfs}/{pid}/task"
    for tid in os.listdir(base):
        try:
            name = read_small(f"{base}/{tid}/comm").strip()
            run_ns, _ = parse_schedstat(read_small(f"{base}/{tid}/schedstat"))
        except (OSError, ValueError):  # the thread ended meanwhile
            continue
        threads[tid] = (name, run_ns)
    return threads


@dataclass
class ThreadCpuSampler:
    """CPU a process used since the sampler was made; call :meth:`sample` every second or so.

    Process CPU times (``/proc/PID/stat``) tick at 10 ms: too coarse for an idle daemon,
    which uses about 100 ms of CPU in two minutes. Each thread's schedstat counts
    nanoseconds; sampling now and then keeps the threads that start and end between two
    reads (a thread's counter is gone once it exits).
    """

    pid: int
    procfs: Path = Path("/proc")
    _baseline: dict[str, int] = field(init=False)
    _latest: dict[str, tuple[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self._baseline = {tid: ns for tid, (_, ns) in read_thread_cpu(self.pid, self.procfs).items()}
        self._latest = {}

    def sample(self) -> None:
        self._latest.update(read_thread_cpu(self.pid, self.procfs))

    def used_ns(self) -> dict[str, tuple[str, int]]:
        """Per thread seen: (name, nanoseconds used since the sampler was made)."""
        self.sample()
        return {tid: (name, ns - self._baseline.get(tid, 0)) for tid, (name, ns) in self._latest.items()}

    def seconds(self, name_prefixes: tuple[str, ...] | None = None) -> float:
        """CPU seconds used, by every thread or by those whose names start with a prefix."""
        used = self.used_ns().values()
        return sum(ns for name, ns in used if name_prefixes is None or name.startswith(name_prefixes)) / 1e9
