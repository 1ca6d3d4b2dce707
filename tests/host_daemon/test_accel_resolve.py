"""Accelerator and agent-channel resolution: the pure decisions, and the probes on a fake root."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmcore.cpuinfo import cpu_flags as cpu_flags_from_cpuinfo
from host_daemon.accel import (
    AccelUnavailable,
    ChannelProbe,
    KvmProbe,
    decide_accel,
    decide_channel,
    probe_channel,
    probe_kvm,
    resolve_accel,
)

SVM = KvmProbe(dev_kvm_opens=True, cpu_flags=frozenset({"fpu", "svm", "sev_snp"}))
PVM = KvmProbe(dev_kvm_opens=True, cpu_flags=frozenset({"fpu", "hypervisor"}))  # like the CI machines
NO_KVM = KvmProbe(dev_kvm_opens=False, dev_kvm_error="No such file or directory")


def test_auto_uses_kvm_only_with_a_device_and_virt_flags() -> None:
    assert decide_accel("auto", SVM).accel == "kvm"
    assert decide_accel("auto", KvmProbe(True, cpu_flags=frozenset({"vmx"}))).accel == "kvm"
    pvm = decide_accel("auto", PVM)
    assert pvm.accel == "tcg" and "neither vmx nor svm" in pvm.reason
    absent = decide_accel("auto", NO_KVM)
    assert absent.accel == "tcg" and "No such file or directory" in absent.reason


def test_explicit_choices() -> None:
    assert decide_accel("tcg", SVM).accel == "tcg"
    assert decide_accel("kvm", PVM).accel == "kvm"  # taken at its word; the daemon bounds the start
    with pytest.raises(AccelUnavailable, match="/dev/kvm does not open"):
        decide_accel("kvm", NO_KVM)


def test_a_tee_needs_kvm() -> None:
    assert decide_accel("auto", SVM, tee="sev-snp").accel == "kvm"
    for probe in (PVM, NO_KVM):
        with pytest.raises(AccelUnavailable, match="sev-snp guest needs KVM"):
            decide_accel("auto", probe, tee="sev-snp")
    with pytest.raises(AccelUnavailable, match="tcg"):
        decide_accel("tcg", SVM, tee="tdx")
    assert AccelUnavailable("x").exit_code == 2


def test_cpuinfo_flags() -> None:
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme svm\n\nprocessor\t: 1\nflags\t: x\n"
    assert cpu_flags_from_cpuinfo(text) == frozenset({"fpu", "vme", "svm"})
    assert cpu_flags_from_cpuinfo("") == frozenset()


def _fake_root(tmp_path: Path, *, kvm: bool, flags: str) -> Path:
    (tmp_path / "dev").mkdir()
    (tmp_path / "proc").mkdir()
    if kvm:
        (tmp_path / "dev" / "kvm").write_bytes(b"")  # a plain file opens read-write like the device
    (tmp_path / "proc" / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    return tmp_path


def test_probe_on_a_fake_root(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, kvm=True, flags="fpu vmx")
    assert probe_kvm(root) == KvmProbe(True, "", frozenset({"fpu", "vmx"}))
    assert resolve_accel("auto", root=root).accel == "kvm"


def test_probe_without_dev_kvm(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, kvm=False, flags="fpu hypervisor")
    probe = probe_kvm(root)
    assert not probe.dev_kvm_opens and probe.dev_kvm_error
    assert resolve_accel("auto", root=root).accel == "tcg"


def test_probe_this_host() -> None:
    """Whatever this machine is, the probe answers and auto resolves without raising."""
    assert resolve_accel("auto").accel in ("kvm", "tcg")


def test_channel_decisions() -> None:
    assert decide_channel("auto", ChannelProbe(True, "/usr/bin/vhost-device-vsock")).channel == "vhost-vsock"
    assert (
        decide_channel("auto", ChannelProbe(False, "/usr/bin/vhost-device-vsock")).channel
        == "vhost-user-vsock"
    )
    assert decide_channel("auto", ChannelProbe(False, None)).channel == "virtio-serial"
    assert decide_channel("vhost-vsock", ChannelProbe(False, None)).channel == "vhost-vsock"


def test_channel_probe_on_a_fake_root(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "bin").mkdir()
    assert probe_channel(tmp_path, path=str(tmp_path / "bin")) == ChannelProbe(False, None)
    (tmp_path / "dev" / "vhost-vsock").write_bytes(b"")
    tool = tmp_path / "bin" / "vhost-device-vsock"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert probe_channel(tmp_path, path=str(tmp_path / "bin")) == ChannelProbe(True, str(tool))
