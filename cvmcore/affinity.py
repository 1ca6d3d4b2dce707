"""Keeping a daemon's threads on one CPU, and the programs it starts off that restriction.

Why the guest agent pins itself by default: it is a Python program whose threads (trio's,
the grpc.aio loop's, grpcio core's poller) hand every RPC from one to another, and only
one of them runs Python at a time anyway. Spread over several vCPUs, each handoff wakes another vCPU
with an inter-processor interrupt: in a VM that is a VMEXIT, and in a confidential VM a
far more expensive one (the study's central finding). On one vCPU the same handoffs are
plain context switches; ``benchmarks/rpc_latency.py`` measures the agent pinned and
unpinned side by side.

A pinned agent must not pass its restriction on: benchmark servers and the commands of
guest workloads get the CPU set the agent itself was started with (:func:`restore_in_child`,
a ``preexec_fn``). Its own short helpers (``mount`` for debugfs, ``modprobe``) stay on the
agent's CPU, where they do no harm.

:func:`parse_cpu_choice` reads the ``--cpu`` option (``auto``, ``all`` or a CPU number);
:func:`choose_cpu` is pure; :func:`pin_process` is the one call that changes anything.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Set
from typing import Final, Literal

from cvmcore.errors import UsageError

CpuChoice = Literal["auto", "all"] | int

AUTO: Final = "auto"
ALL: Final = "all"


def parse_cpu_choice(text: str) -> CpuChoice:
    """``auto`` (one CPU, picked), ``all`` (no pinning) or a CPU number."""
    value = text.strip().lower()
    if value == AUTO:
        return AUTO
    if value == ALL:
        return ALL
    if not value.isdigit():
        raise UsageError(f"--cpu {text!r}: expected auto, all or a CPU number such as 1")
    return int(value)


def choose_cpu(choice: CpuChoice, allowed: Set[int]) -> int | None:
    """The CPU to pin to, or None for no pinning; ``allowed`` is the inherited CPU set.

    ``auto`` takes the highest-numbered allowed CPU: CPU 0 usually takes most device and
    timer interrupts, and benchmark clients and servers tend to start filling CPUs from 0.
    """
    if not allowed:
        raise ValueError("empty CPU set")
    if choice == ALL:
        return None
    if choice == AUTO:
        return max(allowed)
    if choice not in allowed:
        raise UsageError(f"--cpu {choice}: this process may run on CPUs {format_cpu_list(allowed)} only")
    return choice


def format_cpu_list(cpus: Set[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``0-2,5`` (the kernel's cpulist format)."""
    ordered = sorted(cpus)
    ranges: list[str] = []
    start = previous = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == previous + 1:
            previous = cpu
            continue
        ranges.append(str(start) if start == previous else f"{start}-{previous}")
        if cpu is not None:
            start = previous = cpu
    return ",".join(ranges)


def parse_cpu_list(text: str) -> frozenset[int]:
    """The kernel's cpulist format (``0-2,5``) -> ``{0, 1, 2, 5}``; empty text -> empty set
    (the inverse of :func:`format_cpu_list`)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        start = int(first)
        cpus.update(range(start, int(last) + 1) if last else (start,))
    return frozenset(cpus)


class _ChildMask:
    """The CPU set children get back, prepared before any fork.

    Between fork and exec in a threaded program the less the child does the better: the
    mask (a ``cpu_set_t``: an array of longs, bit ``n % bits`` of long ``n // bits``) and
    the libc function are made here, once, so the child runs a few bytecodes and one
    system call, and allocates nothing but ctypes' argument objects.
    """

    def __init__(self, cpus: Set[int]) -> None:
        bits = ctypes.sizeof(ctypes.c_ulong) * 8
        self._mask = (ctypes.c_ulong * (max(cpus) // bits + 1))()
        for cpu in cpus:
            self._mask[cpu // bits] |= 1 << (cpu % bits)
        self._size = ctypes.c_size_t(ctypes.sizeof(self._mask))
        self._pointer = ctypes.byref(self._mask)
        self._setaffinity = ctypes.CDLL(None, use_errno=True).sched_setaffinity

    def apply(self) -> None:
        """In the child: an error becomes an exception, which subprocess reports in the parent."""
        if self._setaffinity(0, self._size, self._pointer) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"sched_setaffinity: {os.strerror(errno)}")


_child_mask: _ChildMask | None = None


def pin_process(cpu: int) -> frozenset[int]:
    """Pin every thread of this process to ``cpu``; the CPU set it had before.

    Threads started later inherit the pinning from their creator. Call it first thing in
    ``main``, before trio or grpcio start theirs.
    """
    global _child_mask
    inherited = frozenset(os.sched_getaffinity(0))
    _child_mask = _ChildMask(inherited)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return inherited


def restore_in_child() -> None:
    """``preexec_fn``: give a child the CPU set the process had before :func:`pin_process`."""
    if _child_mask is not None:
        _child_mask.apply()


def child_preexec() -> Callable[[], None] | None:
    """What to pass as ``preexec_fn`` to restore the CPU set, or None when never pinned."""
    return restore_in_child if _child_mask is not None else None
