"""TEE detection on every fixture variant, and the decision rules on synthetic signals."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmcore.cpuinfo import cpu_flags
from guest_agent.tee import (
    TeeKind,
    TeeVerdict,
    classify,
    detect_tee,
    parse_kmsg,
    read_boot_messages,
)

Sysroot = Callable[[str], Path]


def detect(root: Path) -> TeeVerdict:
    dmesg = root / "dmesg.txt"
    return detect_tee(root, dmesg.read_text() if dmesg.exists() else "")


def test_snp_guest(sysroot: Sysroot) -> None:
    verdict = detect(sysroot("snp-guest"))
    assert verdict == TeeVerdict(
        TeeKind.SEV_SNP, "cpu flag sev_snp, tsm provider sev_guest, /dev/sev-guest, boot message"
    )


def test_tdx_guest(sysroot: Sysroot) -> None:
    verdict = detect(sysroot("tdx-guest"))
    assert verdict == TeeVerdict(
        TeeKind.TDX, "cpu flag tdx_guest, tsm provider tdx_guest, /dev/tdx_guest, boot message"
    )


@pytest.mark.parametrize("tree", ["kvm-guest-6.18", "kvm-guest-default", "tcg-guest-6.12"])
def test_normal_kvm_guest(sysroot: Sysroot, tree: str) -> None:
    verdict = detect(sysroot(tree))
    assert verdict.tee is TeeKind.NONE
    assert verdict.evidence.startswith("no sev_snp/tdx_guest")


def test_this_machine_is_not_a_cvm() -> None:
    # Reads the real /proc/cpuinfo and /dev (read-only); the platform notes say: no TEE here.
    assert detect_tee().tee is TeeKind.NONE


def test_the_device_node_alone_is_enough(sysroot: Sysroot) -> None:
    root = sysroot("kvm-guest-default")
    (root / "dev").mkdir()
    (root / "dev/tdx_guest").touch()
    assert detect_tee(root) == TeeVerdict(TeeKind.TDX, "/dev/tdx_guest")


def test_an_snp_host_is_not_an_snp_guest() -> None:
    host_flags = cpu_flags("processor\t: 0\nflags\t\t: fpu sev sev_es sev_snp svm\n")
    assert classify(host_flags, frozenset(), [], "").tee is TeeKind.NONE


def test_boot_message_alone_is_a_weak_verdict() -> None:
    verdict = classify(frozenset(), frozenset(), [], "[0.1] tdx: Guest detected\n")
    assert verdict == TeeVerdict(TeeKind.TDX, "boot message 'tdx: Guest detected' only")


def test_conflicting_signals_give_none() -> None:
    verdict = classify(frozenset({"hypervisor", "sev_snp"}), frozenset({"tdx_guest"}), [], "")
    assert verdict.tee is TeeKind.NONE
    assert verdict.evidence == "conflicting signals (sev-snp: cpu flag sev_snp; tdx: tsm provider tdx_guest)"
    both = "Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP\ntdx: Guest detected"
    assert classify(frozenset(), frozenset(), [], both).tee is TeeKind.NONE


def test_missing_files_are_no_evidence(tmp_path: Path) -> None:
    assert detect_tee(tmp_path).tee is TeeKind.NONE


def test_kmsg_records_become_message_lines(tmp_path: Path) -> None:
    raw = (
        "6,1,0,-;Linux version 6.12.48\n"
        "6,2,170000,-;Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP\n"
        " SUBSYSTEM=platform\n"
        "6,3,180000,c;sev-guest sev-guest: Initialized SEV guest driver\n"
    )
    assert parse_kmsg(raw) == (
        "Linux version 6.12.48\n"
        "Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP\n"
        "sev-guest sev-guest: Initialized SEV guest driver"
    )
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kmsg").write_text(raw)
    messages = read_boot_messages(tmp_path)
    assert classify(frozenset(), frozenset(), [], messages).tee is TeeKind.SEV_SNP
    assert read_boot_messages(tmp_path / "missing") == ""


def test_this_machines_kmsg_reads_without_blocking() -> None:
    started = time.monotonic()
    text = read_boot_messages()  # O_NONBLOCK: returns at the end of the ring buffer
    assert time.monotonic() - started < 10
    if text:  # readable here (root, no dmesg_restrict problem): a normal KVM guest
        assert classify(frozenset(), frozenset(), [], text).tee is TeeKind.NONE
