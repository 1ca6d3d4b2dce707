"""VMEXIT latency from user space: cpuid, port I/O and rdmsr, in cycles and nanoseconds.

The study timed each exiting instruction in a kernel module, 100,000 iterations after
1,000 warm-ups with rdtsc (docs/study.md, "VMEXIT latency"): cpuid leaves 0, 1
and 0x40000000; rdmsr 0x1b and 0xC0000100; the KVM hypercall; inb from ports 0x40, 0x70 and
0xA0. We measure what user space can:

``cpuid``
    cpuid is not privileged, yet it exits to the hypervisor on every VM (Intel VMX always
    intercepts it; on SEV-SNP and TDX it raises #VC / #VE and the guest kernel asks the
    hypervisor, except leaves the firmware answers from the CPUID page). So a user-space
    cpuid loop times the full exit round trip, and on bare metal it would time the
    instruction alone. Inside a KVM guest (a cloud VM, a nested host) the exits are real.
``port I/O``
    ``pread(/dev/port, 1 byte, offset=PORT)`` makes the kernel execute ``inb PORT``; the
    time includes one system call, so a ``pread`` of ``/dev/zero`` is measured alongside
    (``syscall_pread``) to subtract. Needs root (CAP_SYS_RAWIO) and ``/dev/port``.
``rdmsr``
    ``pread(/dev/cpu/N/msr, 8 bytes, offset=MSR)`` runs rdmsr on CPU N (``modprobe msr``;
    we pin to N so no IPI is involved); also one system call. Note that a guest's MSR read
    exits only if the hypervisor intercepts that MSR (APIC_BASE 0x1b usually is).
``hypercall``
    vmcall / vmmcall fault with #UD in user space: only kernel code can make one. Reported
    as unavailable, never estimated.

Why machine code and no compiler: a confidential guest image has no gcc, and a prebuilt
helper binary would be an opaque blob to ship and trust. The loop is a few dozen bytes of
x86-64, written out below instruction by instruction, written into a memfd that is then
mapped read+execute (never writable and executable, and no ``mprotect`` adding execute:
what ``MemoryDenyWriteExecute=yes`` and the kernel's ``PR_SET_MDWE`` forbid; where a memfd
cannot be mapped executable, an anonymous mapping written first and then made executable
is the fallback) and called through ctypes with the System V calling convention (arguments in rdi, rsi, rdx;
result in rax; rbx, r12-r14 saved because cpuid clobbers ebx and we use the others). One
ctypes call (about a microsecond) per :data:`CHUNK` iterations does not show in the result;
between calls the loop checks whether it was asked to stop, so a cancelled run ends within
one chunk instead of running on in an abandoned thread (:func:`workloads.execute.run_stoppable`).

Two loops are generated:

- ``bulk(leaf, n) -> cycles``: rdtsc, n x cpuid, rdtsc; the mean cost per exit, also timed
  with ``time.perf_counter_ns`` around the call, which gives nanoseconds directly (and the
  TSC frequency as cycles / ns, recorded in the metadata);
- ``each(leaf, n, out)``: rdtsc / cpuid / rdtsc per iteration into ``out[i]``, for the
  median and 99th percentile; ``each`` without the cpuid measures rdtsc's own cost.

The loops run on one CPU (``cpu``, default ``auto``), pinned for their duration on the
worker thread that runs them. The CPUs to choose from are the workload's, not the agent's:
the agent keeps its own threads on one vCPU (``cvm-agent --cpu auto``, the highest), but
hands its workloads the CPU set it was started with (:mod:`cvmcore.affinity`), and so does
this loop. ``auto`` is the lowest of those CPUs other than the agent's own, so the loop
and the agent do not share a vCPU.

cpuid is serializing, so no fence is needed between it and the counter reads; an lfence
before each rdtsc keeps rdtsc from running ahead of earlier instructions.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator, Mapping, Set
from contextlib import contextmanager
from typing import Any, ClassVar

from cvmcore.affinity import child_preexec, format_cpu_list
from cvmcore.errors import CvmError, UsageError
from workloads.model import NEVER_STOP, Param, Sample, StopFlag, Unavailable, Workload, WorkloadStopped

# -- the machine code -------------------------------------------------------------------
# Each entry: bytes, the instruction in Intel syntax. REX prefixes: 0x41 = B (r8-r15 in
# ModRM.rm), 0x44 = R (r8-r15 in ModRM.reg), 0x48 = W (64-bit), 0x49 = W+B, 0x4c = W+R.

PROLOGUE = [
    (b"\x53", "push rbx"),
    (b"\x41\x54", "push r12"),
    (b"\x41\x55", "push r13"),
    (b"\x41\x56", "push r14"),
    (b"\x49\x89\xf4", "mov r12, rsi      ; iterations"),
    (b"\x41\x89\xfd", "mov r13d, edi     ; leaf"),
    (b"\x49\x89\xd6", "mov r14, rdx      ; out (each) / unused (bulk)"),
]
EPILOGUE = [
    (b"\x41\x5e", "pop r14"),
    (b"\x41\x5d", "pop r13"),
    (b"\x41\x5c", "pop r12"),
    (b"\x5b", "pop rbx"),
    (b"\xc3", "ret"),
]
RDTSC_TO_RAX = [
    (b"\x0f\xae\xe8", "lfence"),
    (b"\x0f\x31", "rdtsc             ; edx:eax = TSC"),
    (b"\x48\xc1\xe2\x20", "shl rdx, 32"),
    (b"\x48\x09\xd0", "or rax, rdx       ; rax = TSC"),
]
SAVE_START = [(b"\x49\x89\xc0", "mov r8, rax       ; start (cpuid leaves r8 alone)")]
SUB_START = [(b"\x4c\x29\xc0", "sub rax, r8       ; rax = end - start")]
CPUID = [
    (b"\x44\x89\xe8", "mov eax, r13d     ; leaf"),
    (b"\x31\xc9", "xor ecx, ecx      ; subleaf 0"),
    (b"\x0f\xa2", "cpuid"),
]
STORE_NEXT = [
    (b"\x49\x89\x06", "mov [r14], rax"),
    (b"\x49\x83\xc6\x08", "add r14, 8"),
]
DEC = [(b"\x49\xff\xcc", "dec r12")]


def _bytes(instructions: list[tuple[bytes, str]]) -> bytes:
    return b"".join(code for code, _ in instructions)


def _loop(body: list[tuple[bytes, str]]) -> bytes:
    """body; dec r12; jnz back to the start of body (rel8, so the body stays < 128 bytes)."""
    code = _bytes(body + DEC)
    displacement = -(len(code) + 2)
    assert -128 <= displacement < 0
    return code + b"\x75" + displacement.to_bytes(1, "little", signed=True)


def bulk_code() -> bytes:
    """``uint64_t bulk(uint32_t leaf, uint64_t n)``: TSC cycles of n cpuids (n >= 1)."""
    return (
        _bytes(PROLOGUE + RDTSC_TO_RAX + SAVE_START)
        + _loop(CPUID)
        + _bytes(RDTSC_TO_RAX + SUB_START + EPILOGUE)
    )


def each_code(with_cpuid: bool = True) -> bytes:
    """``void each(uint32_t leaf, uint64_t n, uint64_t *out)``: cycles of each iteration."""
    body = RDTSC_TO_RAX + SAVE_START + (CPUID if with_cpuid else []) + RDTSC_TO_RAX + SUB_START + STORE_NEXT
    return _bytes(PROLOGUE) + _loop(body) + _bytes(EPILOGUE)


def listing() -> str:
    """The generated code as an assembly listing (``python -m workloads.vmexit``)."""
    loop, jnz = [(b"", "loop:")], [(b"\x75", "jnz loop          ; rel8 back to loop:")]
    sections = {
        "bulk": PROLOGUE
        + RDTSC_TO_RAX
        + SAVE_START
        + loop
        + CPUID
        + DEC
        + jnz
        + RDTSC_TO_RAX
        + SUB_START
        + EPILOGUE,
        "each": PROLOGUE
        + loop
        + RDTSC_TO_RAX
        + SAVE_START
        + CPUID
        + RDTSC_TO_RAX
        + SUB_START
        + STORE_NEXT
        + DEC
        + jnz
        + EPILOGUE,
    }
    lines = []
    for name, instructions in sections.items():
        lines.append(f"{name}:")
        lines += [f"    {code.hex(' '):<16} {text}" for code, text in instructions]
    return "\n".join(lines)


BulkFn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64)
EachFn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64))


class CodeNotExecutable(CvmError):
    """This process may not map the loops executable (a policy forbids it): the run cannot
    happen here, whatever the request (FAILED_PRECONDITION over gRPC)."""


class MachineCode:
    """The loops in one executable mapping; ``close()`` unmaps it (use as a context manager)."""

    def __init__(self) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise UsageError(f"vmexit needs an x86-64 CPU (this is {platform.machine()})")
        parts = [bulk_code(), each_code(True), each_code(False)]
        offsets, blob = [], b""
        for part in parts:
            blob += b"\xcc" * (-len(blob) % 16)  # int3 padding; 16-byte aligned entries
            offsets.append(len(blob))
            blob += part
        self._size = mmap.PAGESIZE * (1 + len(blob) // mmap.PAGESIZE)
        libc = ctypes.CDLL(None, use_errno=True)
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self._mprotect = libc.mprotect
        self._mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._munmap = libc.munmap
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._address: int | None = None
        #: how the code is mapped: "memfd" (read+execute from the start) or "anonymous"
        self.mapping = "memfd"
        try:
            address = self._map_memfd(blob)
        except OSError as first:
            self.mapping = "anonymous"
            try:
                address = self._map_anonymous(blob)
            except OSError as second:
                raise CodeNotExecutable(
                    "vmexit cannot run its machine code here: this process may not map memory "
                    f"executable (a memfd mapped read+execute: {first.strerror}; anonymous memory made "
                    f"executable: {second.strerror}). A seccomp filter or policy stricter than "
                    "systemd's MemoryDenyWriteExecute= refuses it"
                ) from None
        self._address = address
        self.bulk = BulkFn(address + offsets[0])
        self.each = EachFn(address + offsets[1])
        self.each_empty = EachFn(address + offsets[2])

    def _map(self, prot: int, flags: int, fd: int) -> int:
        address = self._mmap(None, self._size, prot, flags, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            errno = ctypes.get_errno()
            raise OSError(errno, f"mmap of the vmexit loop failed: {os.strerror(errno)}")
        return int(address)

    def _map_memfd(self, blob: bytes) -> int:
        """The code written into a memfd, mapped read+execute: never writable and executable."""
        fd = os.memfd_create("cvmctl-vmexit", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self._size)
            os.pwrite(fd, blob, 0)
            address = self._map(mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_PRIVATE, fd)
        finally:
            os.close(fd)
        return address

    def _map_anonymous(self, blob: bytes) -> int:
        """Anonymous memory written, then made read+execute (refused under MDWE)."""
        address = self._map(mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)
        ctypes.memmove(address, blob, len(blob))
        if self._mprotect(address, self._size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            errno = ctypes.get_errno()
            self._munmap(address, self._size)
            raise OSError(errno, "mprotect(PROT_EXEC) of the vmexit loop failed (noexec policy?)")
        return address

    def close(self) -> None:
        if self._address is not None:
            self._munmap(self._address, self._size)
            self._address = None

    def __enter__(self) -> MachineCode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def workload_cpus() -> frozenset[int]:
    """The CPUs a workload may use here: the set this process had before it pinned itself.

    The agent pins its threads to one CPU (:func:`cvmcore.affinity.pin_process`) and gives
    its children the set it was started with back (:func:`cvmcore.affinity.restore_in_child`).
    An in-process workload gets that same set: a short-lived thread applies the restore to
    itself (affinity is per thread) and reads it. Unpinned (the CLI, a local run), the set is
    this thread's.
    """
    restore = child_preexec()
    if restore is None:
        return frozenset(os.sched_getaffinity(0))
    found: list[frozenset[int]] = []
    failed: list[BaseException] = []

    def probe() -> None:
        try:
            restore()
            found.append(frozenset(os.sched_getaffinity(0)))
        except BaseException as exc:  # handed to the caller
            failed.append(exc)

    thread = threading.Thread(target=probe, name="cvmctl-cpu-probe")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return found[0]


def choose_cpu(choice: str, usable: Set[int], busy: Set[int] = frozenset()) -> int:
    """The CPU the loops run on for ``cpu=choice``: ``auto`` or a number from ``usable``.

    ``auto`` is the lowest usable CPU outside ``busy`` (the agent's own, when it pinned
    itself), or the lowest usable one when every usable CPU is busy.
    """
    if not usable:
        raise UsageError("vmexit: this process may use no CPU")
    if choice == "auto":
        return min(set(usable) - set(busy) or usable)
    cpu = int(choice)
    if cpu not in usable:
        raise UsageError(
            f"parameter cpu: {cpu} is not allowed (expected auto or one of the CPUs workloads may use "
            f"here: {format_cpu_list(usable)})"
        )
    return cpu


def resolve_cpu(choice: str) -> int:
    """:func:`choose_cpu` among :func:`workload_cpus`, avoiding the CPUs the caller is pinned to."""
    usable = workload_cpus()
    own = frozenset(os.sched_getaffinity(0))
    return choose_cpu(choice, usable, own if own != usable else frozenset())


@contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run the block on ``cpu`` only (the TSC and /dev/cpu/N/msr are per CPU), then restore.

    Only the calling thread moves (the loops run on a worker thread of their own): the
    agent's other threads stay where it pinned them.
    """
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def each_into(fn: Any, leaf: int, buffer: ctypes.Array[ctypes.c_uint64], stop: StopFlag) -> None:
    """Fill ``buffer`` with ``fn`` (an ``each`` loop), :data:`CHUNK` entries per call."""
    base = ctypes.addressof(buffer)
    for offset, count in _chunks(len(buffer), stop):
        fn(leaf, count, ctypes.cast(base + offset * 8, ctypes.POINTER(ctypes.c_uint64)))


def leaf_name(leaf: int) -> str:
    return f"cpuid_{leaf:#x}" if leaf > 9 else f"cpuid_{leaf}"


MAX_CPU = 4095
#: Bounds that fit a small CVM and the agent's time budget: ``iterations`` sizes the
#: per-iteration buffer (8 bytes each: 8 MB at most), and the longest run allowed,
#: 3 x 10^6 exits for each of 8 leaves plus 10^6 reads for each of 17 ports, MSRs and the
#: baseline, takes about 2 minutes at 3 us per exit (a CVM's) and stays within
#: :meth:`Vmexit.timeout` even at 100 us (an emulated guest's).
MAX_ITERATIONS = 1_000_000
MAX_LIST = 8
#: Iterations per call into the machine code: the loop polls its stop flag between calls,
#: so a cancelled run ends within one chunk (milliseconds in a CVM, about a second at 100 us
#: per exit).
CHUNK = 10_000
PORT_DEVICE = "/dev/port"
MSR_DEVICE = "/dev/cpu/{cpu}/msr"


def _device_problem(path: str, what: str) -> str | None:
    """Why ``path`` cannot be read here, or None when it can."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        hint = " (modprobe msr)" if "msr" in path else ""
        return f"{path} does not exist{hint}; {what} needs it"
    except PermissionError:
        return f"{path} is not readable by this user; {what} needs root (CAP_SYS_RAWIO)"
    except OSError as exc:
        return f"{path}: {exc.strerror}; {what} needs it"
    os.close(fd)
    return None


def _chunks(n: int, stop: StopFlag) -> Iterator[tuple[int, int]]:
    """(offset, count) pieces of ``n`` iterations, :data:`CHUNK` at a time, until ``stop`` is set."""
    for offset in range(0, n, CHUNK):
        if stop.is_set():
            raise WorkloadStopped()
        yield offset, min(CHUNK, n - offset)


def time_pread_ns(
    path: str, size: int, offset: int, iterations: int, warmup: int, stop: StopFlag = NEVER_STOP
) -> float:
    """Mean ns of ``pread(path, size, offset)`` over ``iterations`` after ``warmup`` calls."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for _, count in _chunks(warmup, stop):
            for _ in range(count):
                os.pread(fd, size, offset)
        elapsed = 0
        for _, count in _chunks(iterations, stop):
            start = time.perf_counter_ns()
            for _ in range(count):
                os.pread(fd, size, offset)
            elapsed += time.perf_counter_ns() - start
        return elapsed / iterations
    finally:
        os.close(fd)


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return float(sorted_values[index])


class Vmexit(Workload):
    """cpuid / port I/O / rdmsr exit latency, in process, on one pinned CPU."""

    name = "vmexit"
    summary = "VMEXIT latency: user-space cpuid (leaves 0, 1, 0x40000000), inb via /dev/port, rdmsr via msr"
    in_process = True
    params = (
        Param(
            "leaves",
            "list[int]",
            [0, 1, 0x40000000],
            "cpuid leaves (the study: 0, 1, 0x40000000)",
            minimum=0,
            maximum=0xFFFFFFFF,
            hex=True,
            max_items=MAX_LIST,
        ),
        Param(
            "iterations",
            "int",
            100_000,
            "timed iterations per instruction (the study: 100000; 8 bytes of memory each)",
            minimum=1,
            maximum=MAX_ITERATIONS,
        ),
        Param(
            "warmup",
            "int",
            1000,
            "untimed iterations first (the study: 1000)",
            minimum=0,
            maximum=MAX_ITERATIONS,
        ),
        Param(
            "io_iterations",
            "int",
            100_000,
            "iterations per port / MSR (each is a system call)",
            minimum=1,
            maximum=MAX_ITERATIONS,
        ),
        Param(
            "ports",
            "list[int]",
            [0x40, 0x70, 0xA0],
            "I/O ports read with inb (the study: 0x40, 0x70, 0xA0)",
            minimum=0,
            maximum=0xFFFF,
            hex=True,
            max_items=MAX_LIST,
        ),
        Param(
            "msrs",
            "list[int]",
            [0x1B, 0xC0000100],
            "MSRs read (the study: 0x1b APIC_BASE, 0xC0000100 FS_BASE)",
            minimum=0,
            maximum=0xFFFFFFFF,
            hex=True,
            max_items=MAX_LIST,
        ),
        Param(
            "cpu",
            "str",
            "auto",
            "CPU to pin the loops to while measuring; auto: the lowest one workloads may use, "
            "other than the agent's own (checked where the loops run)",
        ),
    )
    guest_tools: ClassVar[dict[str, str]] = {}

    def check(self, params: dict[str, Any]) -> None:
        # The CPU set is checked where the loops run (the guest's, not the host's): here
        # only the form. Both sides call this.
        cpu = params["cpu"]
        if cpu != "auto" and not (cpu.isdigit() and int(cpu) <= MAX_CPU):
            raise UsageError(
                f"parameter cpu: {cpu!r} is not allowed (expected auto or a CPU number from 0 to {MAX_CPU})"
            )

    def scaled(self, params: dict[str, Any], duration_seconds: float) -> dict[str, Any]:
        # At ~1-50 us per exit, 10,000 iterations per instruction and second is conservative.
        budget = max(1000, int(duration_seconds * 10_000))
        n = min(params["iterations"], budget)
        return {**params, "iterations": n, "io_iterations": min(params["io_iterations"], n // 10 or 1)}

    def timeout(self, params: Mapping[str, Any]) -> float:
        n, warmup, io_n = params["iterations"], params["warmup"], params["io_iterations"]
        exits = n + (2 * n + warmup) * len(params["leaves"])
        exits += (io_n + min(warmup, io_n)) * (len(params["ports"]) + len(params["msrs"]) + 1)
        return float(60.0 + exits * 100e-6)  # 100 us per exit is far slower than any TCG guest measured

    def unavailable(self, params: Mapping[str, Any]) -> list[Unavailable]:
        notes = [
            Unavailable("hypercall", "vmcall/vmmcall needs kernel code (#UD in user space); not measured")
        ]
        port_problem = _device_problem(PORT_DEVICE, "port I/O")
        if port_problem and params["ports"]:
            notes += [Unavailable(f"pio_{port:#x}", port_problem) for port in params["ports"]]
        msr_problem = _device_problem(MSR_DEVICE.format(cpu=resolve_cpu(params["cpu"])), "rdmsr")
        if msr_problem and params["msrs"]:
            notes += [Unavailable(f"msr_{msr:#x}", msr_problem) for msr in params["msrs"]]
        return notes

    def run_in_process(self, params: Mapping[str, Any], stop: StopFlag = NEVER_STOP) -> list[Sample]:
        n, warmup = params["iterations"], params["warmup"]
        cpu = resolve_cpu(params["cpu"])
        samples: list[Sample] = []
        with MachineCode() as code, pinned(cpu):
            # rdtsc's own cost, to read the per-iteration figures against.
            buffer = (ctypes.c_uint64 * n)()
            each_into(code.each_empty, 0, buffer, stop)
            rdtsc_cycles = statistics.median(buffer)
            tsc_per_ns: list[float] = []
            for leaf in params["leaves"]:
                for _, count in _chunks(warmup, stop):
                    code.bulk(leaf, count)
                cycles, elapsed_ns = 0, 0
                for _, count in _chunks(n, stop):
                    start = time.perf_counter_ns()
                    cycles += code.bulk(leaf, count)
                    elapsed_ns += time.perf_counter_ns() - start
                tsc_per_ns.append(cycles / elapsed_ns)
                each_into(code.each, leaf, buffer, stop)
                each = sorted(buffer)
                meta = {"method": "cpuid-loop", "leaf": f"{leaf:#x}", "iterations": str(n)}
                name = leaf_name(leaf)
                samples += [
                    Sample(f"{name}_ns", elapsed_ns / n, "ns", "lower", meta),
                    Sample(f"{name}_cycles", cycles / n, "cycles", "lower", meta),
                    Sample(f"{name}_cycles_median", percentile(each, 0.5), "cycles", "lower", meta),
                    Sample(f"{name}_cycles_p99", percentile(each, 0.99), "cycles", "lower", meta),
                ]
            io_n = params["io_iterations"]
            io_warmup = min(warmup, io_n)
            base_meta = {"method": "pread", "iterations": str(io_n)}
            io_samples: list[Sample] = []
            if _device_problem(PORT_DEVICE, "port I/O") is None:
                for port in params["ports"]:
                    ns = time_pread_ns(PORT_DEVICE, 1, port, io_n, io_warmup, stop)
                    io_samples.append(
                        Sample(f"pio_{port:#x}_ns", ns, "ns", "lower", {**base_meta, "port": f"{port:#x}"})
                    )
            msr_path = MSR_DEVICE.format(cpu=cpu)
            if _device_problem(msr_path, "rdmsr") is None:
                for msr in params["msrs"]:
                    ns = time_pread_ns(msr_path, 8, msr, io_n, io_warmup, stop)
                    io_samples.append(
                        Sample(f"msr_{msr:#x}_ns", ns, "ns", "lower", {**base_meta, "msr": f"{msr:#x}"})
                    )
            if io_samples:
                baseline = time_pread_ns("/dev/zero", 1, 0, io_n, io_warmup, stop)
                samples += [*io_samples, Sample("syscall_pread_ns", baseline, "ns", "lower", base_meta)]
        tsc_ghz = statistics.median(tsc_per_ns) if tsc_per_ns else 0.0
        extra = {
            "tsc_ghz": f"{tsc_ghz:.4f}",
            "rdtsc_cycles": f"{rdtsc_cycles:g}",
            "cpu": str(cpu),
            "code_mapping": code.mapping,
        }
        return [s.with_metadata(**extra) for s in samples]


if __name__ == "__main__":
    print(listing())
