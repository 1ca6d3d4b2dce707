"""The vmexit loop: its encoding, a real (short) run on this CPU, and what is unavailable."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

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
    from cvmcore.errors import UsageError

    with pytest.raises(UsageError, match="parameter cpu: 4000 is not allowed"):
        get("vmexit").validate({"cpu": "4000"})
