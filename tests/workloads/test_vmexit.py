"""The vmexit loop: its encoding, a real (short) run on this CPU, and what is unavailable."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from cvmcore.errors import CvmError, UsageError
from workloads import vmexit
from workloads.catalogue import get
from workloads.execute import run_guest_request, run_stoppable, workload_limiter
from workloads.model import NEVER_STOP, Sample, StopFlag, WorkloadStopped

x86_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 machine code")


def test_encoding() -> None:
    code = vmexit.bulk_code()
    assert code.startswith(b"\x53\x41\x54\x41\x55\x41\x56")  # push rbx, r12, r13, r14
    assert code.endswith(b"\x41\x5e\x41\x5d\x41\x5c\x5b\xc3")  # pops in reverse, ret
    # the loop: mov eax, r13d; xor ecx, ecx; cpuid; dec r12; jnz -12
    assert b"\x44\x89\xe8\x31\xc9\x0f\xa2\x49\xff\xcc\x75\xf4" in code
    each = vmexit.each_code(True)
    assert each.count(b"\x0f\x31") == 2 and each.count(b"\x0f\xa2") == 1
    assert b"\x0f\xa2" not in vmexit.each_code(False)
    jnz = each.rindex(b"\x75")
    displacement = int.from_bytes(each[jnz + 1 : jnz + 2], "little", signed=True)
    assert each[jnz + 2 + displacement : jnz + 2 + displacement + 3] == b"\x0f\xae\xe8"  # back to the lfence
    assert "cpuid" in vmexit.listing()


@x86_only
def test_short_run_measures_every_leaf() -> None:
    workload = get("vmexit")
    params = workload.validate({"iterations": "2000", "warmup": "100", "leaves": "0,1,0x40000000"})
    samples = workload.run_in_process(params)
    metrics = {s.metric: s for s in samples}
    for leaf in ("cpuid_0", "cpuid_1", "cpuid_0x40000000"):
        assert metrics[f"{leaf}_ns"].value > 0
        assert metrics[f"{leaf}_cycles"].value > 0
        assert metrics[f"{leaf}_cycles_p99"].value >= metrics[f"{leaf}_cycles_median"].value
    assert float(metrics["cpuid_0_ns"].metadata["tsc_ghz"]) > 0.1
    assert metrics["cpuid_1_ns"].metadata["leaf"] == "0x1"


def test_hypercall_is_never_faked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(vmexit, "PORT_DEVICE", str(tmp_path / "port"))
    monkeypatch.setattr(vmexit, "MSR_DEVICE", str(tmp_path / "cpu{cpu}msr"))
    workload = get("vmexit")
    notes = {
        n.metric: n.reason for n in workload.unavailable(workload.validate({"ports": "0x80", "msrs": "0x1b"}))
    }
    assert set(notes) == {"hypercall", "pio_0x80", "msr_0x1b"}
    assert "kernel code" in notes["hypercall"]
    assert "modprobe msr" in notes["msr_0x1b"]


@x86_only
def test_pio_and_msr_paths_time_pread(monkeypatch: pytest.MonkeyPatch) -> None:
    # /dev/zero stands in for /dev/port and the msr device: the same pread loop, no privileges.
    monkeypatch.setattr(vmexit, "PORT_DEVICE", "/dev/zero")
    monkeypatch.setattr(vmexit, "MSR_DEVICE", "/dev/zero")
    workload = get("vmexit")
    params = workload.validate(
        {
            "iterations": "100",
            "warmup": "10",
            "io_iterations": "100",
            "leaves": "0",
            "ports": "0x80",
            "msrs": "0x1b",
        }
    )
    metrics = {s.metric for s in workload.run_in_process(params)}
    assert {"pio_0x80_ns", "msr_0x1b_ns", "syscall_pread_ns"} <= metrics
    assert {n.metric for n in workload.unavailable(params)} == {"hypercall"}


def test_cpu_must_be_usable() -> None:
    # The form is checked on both sides; the CPU set where the loops run (the guest's).
    for bad in ("x", "-1", "4096"):
        with pytest.raises(UsageError, match=f"parameter cpu: '{bad}' is not allowed"):
            get("vmexit").validate({"cpu": bad})
    params = get("vmexit").validate({"cpu": "4000", "iterations": "10"})
    with pytest.raises(UsageError, match=r"parameter cpu: 4000 is not allowed .* may use here"):
        get("vmexit").run_in_process(params)


def test_auto_avoids_the_agents_cpu() -> None:
    assert vmexit.choose_cpu("auto", {0, 1, 2, 3}, busy={3}) == 0
    assert vmexit.choose_cpu("auto", {2, 3}, busy={2}) == 3
    assert vmexit.choose_cpu("auto", {3}, busy={3}) == 3  # nothing else to choose
    assert vmexit.choose_cpu("1", {0, 1}, busy={1}) == 1  # an explicit CPU is taken as given
    with pytest.raises(UsageError, match="expected auto or one of the CPUs workloads may use here: 0-1"):
        vmexit.choose_cpu("5", {0, 1})


PINNED_AGENT = """
import os, sys
from cvmcore.affinity import pin_process
from workloads import vmexit
from workloads.catalogue import get

allowed = os.sched_getaffinity(0)
pin_process(max(allowed))  # what cvm-agent --cpu auto does
assert os.sched_getaffinity(0) == {max(allowed)}
assert vmexit.workload_cpus() == allowed, vmexit.workload_cpus()
workload = get("vmexit")
params = workload.validate({"iterations": "200", "warmup": "10", "leaves": "0"})
samples = workload.run_in_process(params)
print(samples[0].metadata["cpu"], sorted(os.sched_getaffinity(0)))
"""


@x86_only
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_default_cpu_is_the_workloads_not_the_pinned_agents() -> None:
    """The issue-15 failure: the agent pinned to its highest CPU, vmexit's default refused."""
    done = subprocess.run(
        [sys.executable, "-c", PINNED_AGENT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    cpu, agent_cpus = done.stdout.split(maxsplit=1)
    allowed = sorted(os.sched_getaffinity(0))
    assert int(cpu) == min(allowed) and agent_cpus.strip() == f"[{max(allowed)}]"


UNDER_MDWE = """
import ctypes
from workloads import vmexit

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("unsupported")
    raise SystemExit
with vmexit.MachineCode() as code:
    assert code.bulk(0, 10) > 0
    print(code.mapping)
"""


@x86_only
def test_runs_under_memory_deny_write_execute() -> None:
    """No writable+executable memory and no mprotect(PROT_EXEC): MemoryDenyWriteExecute's rules."""
    done = subprocess.run(
        [sys.executable, "-c", UNDER_MDWE], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "unsupported":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert done.stdout.strip() == "memfd"


def test_every_parameter_is_bounded() -> None:
    """Issue 13: iterations up to 10^9 allocated an 8 GB buffer in the agent."""
    vmexit_workload = get("vmexit")
    for name, value in (
        ("iterations", "1000000000"),
        ("warmup", "1000001"),
        ("io_iterations", "1000001"),
        ("leaves", ",".join(["1"] * 9)),
        ("ports", ",".join(["0x80"] * 9)),
        ("msrs", "1," * 8 + "1"),
        ("cpu", "1" * 5000),
    ):
        with pytest.raises(UsageError, match=f"parameter {name}: .* is not allowed"):
            vmexit_workload.validate({name: value})
    longest = vmexit_workload.validate(
        {
            "iterations": str(vmexit.MAX_ITERATIONS),
            "warmup": str(vmexit.MAX_ITERATIONS),
            "io_iterations": str(vmexit.MAX_ITERATIONS),
            "leaves": ",".join(["1"] * vmexit.MAX_LIST),
            "ports": ",".join(["0x80"] * vmexit.MAX_LIST),
            "msrs": ",".join(["0x1b"] * vmexit.MAX_LIST),
        }
    )
    assert vmexit_workload.timeout(longest) < 2 * 3600  # even at 100 us per exit
    # what `cvmctl bench --list` shows
    assert vmexit_workload.param("iterations").allowed() == "a whole number from 1 to 1000000"
    assert vmexit_workload.param("leaves").allowed().endswith("at most 8 of them")


def spin_until_stopped(stop: StopFlag) -> list[Sample]:
    while not stop.is_set():
        time.sleep(0.005)
    raise WorkloadStopped()


async def test_a_cancelled_run_is_stopped_not_abandoned() -> None:
    ended: list[float] = []

    def run(stop: StopFlag) -> list[Sample]:
        try:
            return spin_until_stopped(stop)
        finally:
            ended.append(time.monotonic())

    with trio.move_on_after(0.2):
        await run_stoppable(run)
    assert ended, "the thread still ran when the caller went on"
    await trio.sleep(0.1)  # the limiter's token comes back once trio hears of the thread's end
    assert workload_limiter().borrowed_tokens == 0


@x86_only
async def test_cancelled_vmexit_runs_never_starve_the_agents_threads() -> None:
    """Issue 13: 45 cancelled runs with a large warmup kept their threads, and trio's default
    thread limiter (40) had none left for GetMetrics, idle polling and /metrics."""
    heavy = {"iterations": "1000000", "warmup": "1000000", "io_iterations": "1000000", "leaves": "0"}
    async with trio.open_nursery() as nursery:
        for _ in range(45):
            nursery.start_soon(run_guest_request, "vmexit", heavy)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        assert await trio.to_thread.run_sync(lambda: 42) == 42
    await trio.sleep(0.1)
    assert workload_limiter().borrowed_tokens == 0  # the run that had started has stopped
    assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0


def test_each_into_fills_the_buffer_in_chunks() -> None:
    calls: list[tuple[int, int]] = []

    def fake_each(leaf: int, count: int, out: object) -> None:
        calls.append((leaf, count))

    buffer = (ctypes.c_uint64 * (vmexit.CHUNK * 2 + 5))()
    vmexit.each_into(fake_each, 7, buffer, NEVER_STOP)
    assert calls == [(7, vmexit.CHUNK), (7, vmexit.CHUNK), (7, 5)]


# A seccomp filter like systemd's MemoryDenyWriteExecute=yes (its
# seccomp_memory_deny_write_execute(): mmap with PROT_WRITE|PROT_EXEC, and mprotect or
# pkey_mprotect adding PROT_EXEC, fail with EPERM), or, with STRICT, one that refuses every
# executable mapping (as a stricter policy might). Classic BPF over struct seccomp_data:
# nr at offset 0, arch at 4, the low half of args[2] (prot) at 32.
UNDER_SECCOMP = """
import ctypes, errno, sys
from workloads import vmexit
from workloads.catalogue import get

STRICT = sys.argv[1] == "strict"
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, DENY = 0x7FFF0000, 0x00050000 | errno.EPERM
mmap_mask = 0x4 if STRICT else 0x6  # PROT_EXEC, or PROT_WRITE|PROT_EXEC
program = [  # (code, jt, jf, k); jumps count the instructions skipped
    (LD, 0, 0, 4), (JEQ, 0, 11, 0xC000003E),  # 0-1: not x86-64: allow
    (LD, 0, 0, 0),  # 2: the system call number
    (JEQ, 3, 0, 9), (JEQ, 5, 0, 10), (JEQ, 4, 0, 329),  # 3-5: mmap, mprotect, pkey_mprotect
    (RET, 0, 0, ALLOW),  # 6
    (LD, 0, 0, 32), (AND, 0, 0, mmap_mask), (JEQ, 4, 3, mmap_mask),  # 7-9: mmap's prot
    (LD, 0, 0, 32), (AND, 0, 0, 0x4), (JEQ, 1, 0, 0x4),  # 10-12: mprotect's prot
    (RET, 0, 0, ALLOW),  # 13
    (RET, 0, 0, DENY),  # 14
]

class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]

class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

filters = (Filter * len(program))(*[Filter(*f) for f in program])
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
prog = Program(len(program), filters)
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, *[ctypes.c_int] * 3, ctypes.c_long]
wx = libc.mmap(None, 4096, 0x7, 0x22, -1, 0)  # PROT_READ|WRITE|EXEC, MAP_PRIVATE|ANONYMOUS
print("wx-refused" if wx in (None, ctypes.c_void_p(-1).value) else "wx-allowed")
try:
    with vmexit.MachineCode() as code:
        assert code.bulk(0, 10) > 0
        print(code.mapping)
except vmexit.CodeNotExecutable as exc:
    print("refused:", exc)
"""


def under_seccomp(mode: str) -> str:
    """The stdout of :data:`UNDER_SECCOMP` in a fresh interpreter (the filter cannot be undone)."""
    done = subprocess.run(
        [sys.executable, "-c", UNDER_SECCOMP, mode], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@x86_only
def test_runs_under_a_seccomp_memory_deny_write_execute_filter() -> None:
    """The seccomp form of MemoryDenyWriteExecute: the memfd mapped read+execute is allowed."""
    assert under_seccomp("systemd").split() == ["wx-refused", "memfd"]  # the filter works; memfd passes


@x86_only
def test_a_policy_that_refuses_all_executable_memory_is_a_failed_precondition() -> None:
    """Issue 13: the executable page gave INTERNAL; now a CvmError (FAILED_PRECONDITION)."""
    out = under_seccomp("strict")
    assert out.startswith("wx-refused\nrefused: vmexit cannot run its machine code here")
    assert "Operation not permitted" in out
    assert issubclass(vmexit.CodeNotExecutable, CvmError)
