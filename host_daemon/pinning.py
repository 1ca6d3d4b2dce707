"""vCPU pinning: ``[pinning] host_cpus`` applied to QEMU's threads, and read back from the kernel.

What the study did (docs/study.md, "vCPU pinning"): the thread id of each vCPU from QMP
``query-cpus-fast``, then ``taskset -pc (base+i) tid``. libvirt's equivalent is one
``<vcpupin>`` per vCPU plus ``<emulatorpin>`` for "the emulator": every QEMU thread that is
not a vCPU (the main loop, ``call_rcu``, ``IO <id>`` iothreads, thread-pool workers).
Here:

* vCPU *i* runs on ``host_cpus[i]`` only;
* every other thread of the QEMU process runs on the CPUs QEMU was allowed minus the pinned
  ones, so the emulator never competes with a vCPU for its core. When that leaves nothing
  (a one-CPU set, or every allowed CPU given to a vCPU) they are left as they are, and the
  :class:`Plan` says so;
* the main thread is among them, so a thread QEMU starts later (a worker for a new I/O
  request) inherits the emulator set from it.

"The CPUs QEMU was allowed" is the union of its threads' current CPU sets: at boot every
thread still has the set QEMU inherited (the daemon's, or a NUMA node's under ``numactl
--cpunodebind``); after a daemon restart the vCPU sets and the emulator set together are
that same union again, so applying twice gives the same result, and a restarted daemon
puts back a vCPU someone moved meanwhile.

:func:`plan` is pure. :func:`apply` does the I/O: it lists ``<procfs>/<pid>/task``, calls
``sched_setaffinity`` per thread and reads each thread's ``Cpus_allowed_list`` back from
``<procfs>/<pid>/task/<tid>/status``. The procfs root and the setter are injectable, as
:class:`host_daemon.metrics.procfs.ProcfsReader` does. A thread that ends in between is
not an error. :func:`check_host_cpus` runs before QEMU does: a CPU the host lacks or the
daemon may not use refuses the start with the CPU's number.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path

from cvmcore.affinity import format_cpu_list, parse_cpu_list
from cvmcore.errors import CvmError, HostNotReady
from host_daemon.store import VcpuPin


class PinningError(CvmError):
    """The kernel refused to place a QEMU thread where the spec says."""


@dataclass(frozen=True)
class Plan:
    """Where each thread of one QEMU process may run."""

    threads: Mapping[int, frozenset[int]]  # thread id -> its CPU set
    vcpus: tuple[tuple[int, int, int], ...]  # (vCPU index, thread id, host CPU)
    emulator: frozenset[int]  # the set of every other thread; empty: they are left alone
    notes: tuple[str, ...] = ()


def plan(
    host_cpus: Sequence[int],
    vcpu_tids: Sequence[int],
    all_tids: Iterable[int],
    allowed: Set[int],
) -> Plan:
    """Pin vCPU ``i`` (thread ``vcpu_tids[i]``) to ``host_cpus[i]``, every other thread to
    ``allowed`` minus ``host_cpus``."""
    notes: list[str] = []
    if len(vcpu_tids) != len(host_cpus):
        notes.append(
            f"QEMU reports {len(vcpu_tids)} vCPU threads and [pinning] host_cpus names "
            f"{len(host_cpus)} CPUs: only the first of each are paired"
        )
    threads: dict[int, frozenset[int]] = {}
    vcpus: list[tuple[int, int, int]] = []
    for index, (tid, cpu) in enumerate(zip(vcpu_tids, host_cpus, strict=False)):
        if tid in threads:  # one thread runs several vCPUs (TCG thread=single): it gets all their CPUs
            notes.append(f"vCPUs share thread {tid}: it runs on every CPU they are pinned to")
        threads[tid] = threads.get(tid, frozenset()) | {cpu}
        vcpus.append((index, tid, cpu))
    emulator = frozenset(allowed) - frozenset(host_cpus)
    others = sorted(set(all_tids) - set(threads))
    if not emulator:
        if others:
            shown = format_cpu_list(allowed) if allowed else "none"
            notes.append(
                f"no CPU left for QEMU's other threads (QEMU may use CPUs {shown}, all pinned to vCPUs): "
                "they are left as they are"
            )
    else:
        for tid in others:
            threads[tid] = emulator
    return Plan(threads=threads, vcpus=tuple(vcpus), emulator=emulator, notes=tuple(notes))


def parse_allowed_list(status: str) -> str | None:
    """The ``Cpus_allowed_list`` value of a ``/proc/<pid>/task/<tid>/status`` text, as written."""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "Cpus_allowed_list":
            return value.strip()
    return None


def check_host_cpus(
    host_cpus: Sequence[int], *, usable: Set[int] | None = None, present: int | None = None, name: str = ""
) -> None:
    """Refuse, before QEMU runs, a CPU this host lacks or this daemon may not use.

    ``usable`` defaults to ``os.sched_getaffinity(0)`` (the daemon's own set, which QEMU
    inherits), ``present`` to ``os.cpu_count()``.
    """
    if not host_cpus:
        return
    usable = frozenset(os.sched_getaffinity(0) if usable is None else usable)
    present = (os.cpu_count() or 0) if present is None else present
    who = f"VM {name!r}: " if name else ""
    for cpu in host_cpus:
        if cpu >= present:
            raise HostNotReady(
                f"{who}[pinning] host_cpus names CPU {cpu}, which this host does not have "
                f"(it has {present} CPU{'s' if present != 1 else ''}: 0-{present - 1})"
            )
        if cpu not in usable:
            shown = format_cpu_list(usable) if usable else "none"
            raise HostNotReady(
                f"{who}[pinning] host_cpus names CPU {cpu}, which cvm-hostd may not use "
                f"(its CPU set is {shown}: offline, or excluded by a cpuset or taskset)"
            )


@dataclass(frozen=True)
class Applied:
    """What the kernel reports after :func:`apply`."""

    vcpus: tuple[VcpuPin, ...]
    emulator_cpus: str  # the main thread's Cpus_allowed_list, when the emulator set was applied
    notes: tuple[str, ...] = field(default=())


class _Procfs:
    def __init__(self, root: Path, pid: int) -> None:
        self.task = root / str(pid) / "task"

    def tids(self) -> list[int]:
        try:
            return sorted(int(name) for name in os.listdir(self.task) if name.isdigit())
        except FileNotFoundError:
            return []

    def allowed(self, tid: int) -> str | None:
        """The thread's Cpus_allowed_list, None when the thread is gone."""
        try:
            return parse_allowed_list((self.task / str(tid) / "status").read_text())
        except (FileNotFoundError, ProcessLookupError):
            return None


def apply(
    pid: int,
    host_cpus: Sequence[int],
    vcpu_tids: Sequence[int],
    *,
    procfs: Path = Path("/proc"),
    setaffinity: Callable[[int, Set[int]], None] = os.sched_setaffinity,
) -> Applied:
    """Pin the threads of QEMU process ``pid`` (see :func:`plan`) and read the result back.

    Raises :class:`PinningError` when the kernel refuses a CPU set (EINVAL: no usable CPU in
    it; EPERM: not the daemon's process). A thread that ended meanwhile is skipped.
    """
    tasks = _Procfs(procfs, pid)
    tids = tasks.tids()
    if not tids:
        raise PinningError(f"QEMU (pid {pid}) has no threads to pin: it exited")
    current: set[int] = set()
    for tid in tids:
        text = tasks.allowed(tid)
        if text:
            current |= parse_cpu_list(text)
    planned = plan(host_cpus, vcpu_tids, tids, current)
    vcpu_set = {tid for _, tid, _ in planned.vcpus}
    order = sorted(planned.threads, key=lambda tid: (tid != pid, tid))  # the main thread first

    def pin(tid: int, cpus: frozenset[int]) -> None:
        try:
            setaffinity(tid, cpus)
        except ProcessLookupError:
            pass  # the thread ended between listing and pinning
        except OSError as exc:
            what = "vCPU thread" if tid in vcpu_set else "thread"
            raise PinningError(
                f"cannot pin QEMU's {what} {tid} (pid {pid}) to CPU {format_cpu_list(cpus)}: {exc.strerror}"
            ) from exc

    listed = set(tids)
    notes = list(planned.notes)
    for tid in order:
        if tid not in listed:  # never touch a thread id that is not QEMU's (a stale or reused one)
            notes.append(f"vCPU thread {tid} is not a thread of QEMU (pid {pid}): not pinned")
            continue
        pin(tid, planned.threads[tid])
    if planned.emulator:
        # Threads started while the main thread still had the old set: give them the emulator set too.
        for tid in tasks.tids():
            if tid not in planned.threads:
                pin(tid, planned.emulator)

    pins: list[VcpuPin] = []
    for index, tid, cpu in planned.vcpus:
        allowed = tasks.allowed(tid)
        if allowed is None:
            notes.append(f"vCPU {index} thread {tid} ended before its CPU set could be read back")
            allowed = ""
        elif parse_cpu_list(allowed) != planned.threads[tid]:
            notes.append(f"vCPU {index} thread {tid} is allowed CPUs {allowed}, not {cpu}")
        pins.append(VcpuPin(index, tid, cpu, allowed))
    emulator_cpus = ""
    if planned.emulator:
        emulator_cpus = tasks.allowed(pid) or ""
        if emulator_cpus and parse_cpu_list(emulator_cpus) != planned.emulator:
            notes.append(
                f"QEMU's main thread is allowed CPUs {emulator_cpus}, not {format_cpu_list(planned.emulator)}"
            )
    return Applied(vcpus=tuple(pins), emulator_cpus=emulator_cpus, notes=tuple(notes))
