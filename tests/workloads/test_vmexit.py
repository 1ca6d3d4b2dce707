"""The vmexit loop: its encoding, a real (short) run on this CPU, and what is unavailable."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cvmcore.errors import UsageError
from workloads import vmexit
from workloads.catalogue import get

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
