"""Which accelerator (and agent channel) a VM gets on this host.

Two questions are answered the same way: a *pure* decision function takes what was asked for
and a snapshot of the host (a probe), and returns the choice with a reason a person can read;
a thin *probe* function reads the host. Tests feed the decision any probe they like, and the
probe takes a ``root`` so that a fake ``/dev`` and ``/proc`` can stand in for the real ones.

Accelerator. ``accel = "auto"`` uses KVM only when both hold:

* ``/dev/kvm`` opens read-write (the device exists and we may use it), and
* ``/proc/cpuinfo`` lists the ``vmx`` (Intel VT-x) or ``svm`` (AMD-V) flag.

The second check matters on hosts that are themselves guests: a nested hypervisor may offer a
``/dev/kvm`` that cannot run a normal guest (on the CI machines it belongs to a "PVM"
hypervisor and QEMU hangs in the guest's decompressor), and such a host shows neither flag.
``accel = "kvm"`` is taken at its word when ``/dev/kvm`` opens, flags or not; the daemon
still bounds the start of such a VM with a deadline. A confidential VM (SEV-SNP, TDX) needs
KVM: with ``auto`` on a host without it, the decision is an error, not a silent TCG guest.

Agent channel. ``channel = "auto"`` picks, in order: ``vhost-vsock`` when ``/dev/vhost-vsock``
exists; ``vhost-user-vsock`` when the ``vhost-device-vsock`` backend is installed;
``virtio-serial`` otherwise.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cvmcore.cpuinfo import cpu_flags
from cvmcore.errors import UsageError

from .spec import Accel, Channel, Tee

ResolvedAccel = Literal["kvm", "tcg"]
ResolvedChannel = Literal["vhost-vsock", "vhost-user-vsock", "virtio-serial", "none"]

VIRT_FLAGS = frozenset({"vmx", "svm"})


class AccelUnavailable(UsageError):
    """The accelerator asked for (or needed by the VM's TEE) cannot be used on this host."""


@dataclass(frozen=True)
class KvmProbe:
    """What the host offers for KVM: whether ``/dev/kvm`` opened, why not, and the CPU flags."""

    dev_kvm_opens: bool
    dev_kvm_error: str = ""
    cpu_flags: frozenset[str] = frozenset()

    @property
    def virt_flags(self) -> frozenset[str]:
        return self.cpu_flags & VIRT_FLAGS


@dataclass(frozen=True)
class AccelDecision:
    accel: ResolvedAccel
    reason: str


def decide_accel(requested: Accel, probe: KvmProbe, tee: Tee = "none") -> AccelDecision:
    """Pure: the accelerator for a VM that asked for ``requested`` on a host that looks like ``probe``.

    Raises :class:`AccelUnavailable` when KVM is required (asked for, or by a TEE) and absent.
    """
    if requested == "tcg":
        if tee != "none":
            raise AccelUnavailable(f'accel: "tcg" cannot run a {tee} guest; it needs KVM')
        return AccelDecision("tcg", "accel = tcg was asked for")
    if not probe.dev_kvm_opens:
        why = f"/dev/kvm does not open ({probe.dev_kvm_error or 'unknown error'})"
        if requested == "kvm" or tee != "none":
            needed = "accel = kvm was asked for" if requested == "kvm" else f"a {tee} guest needs KVM"
            raise AccelUnavailable(f"accel: {needed}, but {why}")
        return AccelDecision("tcg", f"auto: {why}")
    flags = probe.virt_flags
    if requested == "kvm":
        note = f"CPU flags show {', '.join(sorted(flags))}" if flags else "CPU flags show neither vmx nor svm"
        return AccelDecision("kvm", f"accel = kvm was asked for and /dev/kvm opens ({note})")
    if flags:
        return AccelDecision("kvm", f"auto: /dev/kvm opens and CPU flags show {', '.join(sorted(flags))}")
    why = "/dev/kvm opens but the CPU flags show neither vmx nor svm (a nested or paravirtual KVM)"
    if tee != "none":
        raise AccelUnavailable(f"accel: a {tee} guest needs KVM, but {why}")
    return AccelDecision("tcg", f"auto: {why}")


def open_error(device: Path) -> str | None:
    """None when ``device`` opens read-write (as QEMU will open it), else why not.

    Opening a character device and closing it again is local and does not block.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{exc.strerror or exc}"
    os.close(fd)
    return None


def probe_kvm(root: Path = Path("/")) -> KvmProbe:
    """Read the host: try to open ``<root>/dev/kvm`` read-write and read ``<root>/proc/cpuinfo``."""
    error = open_error(root / "dev" / "kvm")
    opens = error is None
    try:
        flags = cpu_flags((root / "proc" / "cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        flags = frozenset()
    return KvmProbe(dev_kvm_opens=opens, dev_kvm_error=error or "", cpu_flags=flags)


def resolve_accel(requested: Accel, tee: Tee = "none", root: Path = Path("/")) -> AccelDecision:
    """Probe this host and decide (the thin I/O wrapper around :func:`decide_accel`)."""
    return decide_accel(requested, probe_kvm(root), tee)


@dataclass(frozen=True)
class ChannelProbe:
    have_vhost_vsock: bool  # /dev/vhost-vsock exists
    vhost_device_vsock: str | None  # path of the vhost-device-vsock binary, if installed


@dataclass(frozen=True)
class ChannelDecision:
    channel: ResolvedChannel
    reason: str


def decide_channel(requested: Channel, probe: ChannelProbe) -> ChannelDecision:
    """Pure: the agent channel for ``requested`` on a host that looks like ``probe``.

    An explicit choice is kept even when the host lacks it: QEMU (or the daemon starting the
    backend) then fails with its own precise error, which is more useful than a substitute.
    """
    if requested != "auto":
        return ChannelDecision(requested, f"channel = {requested} was asked for")
    if probe.have_vhost_vsock:
        return ChannelDecision("vhost-vsock", "auto: /dev/vhost-vsock exists")
    if probe.vhost_device_vsock:
        return ChannelDecision(
            "vhost-user-vsock",
            f"auto: no /dev/vhost-vsock; vhost-device-vsock found at {probe.vhost_device_vsock}",
        )
    return ChannelDecision("virtio-serial", "auto: neither /dev/vhost-vsock nor vhost-device-vsock")


def probe_channel(root: Path = Path("/"), path: str | None = None) -> ChannelProbe:
    """Read the host: does ``<root>/dev/vhost-vsock`` exist, is ``vhost-device-vsock`` on PATH.

    Only ``stat`` is used: the vsock devices are never opened here.
    """
    return ChannelProbe(
        have_vhost_vsock=(root / "dev" / "vhost-vsock").exists(),
        vhost_device_vsock=shutil.which("vhost-device-vsock", path=path),
    )
