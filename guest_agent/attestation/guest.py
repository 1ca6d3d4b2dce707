"""Fetching evidence inside a confidential VM: one call over every kernel interface.

:func:`fetch_evidence` is what the guest agent's ``GetAttestationReport`` RPC calls. It
takes the verifier's 64-byte nonce as the report data - it never makes one up, and it does
not pad or hash: a caller with a longer or shorter value hashes it (SHA-512 is 64 bytes)
and says so to its verifier. The interfaces, in the order ``interface="auto"`` tries them:

``configfs-tsm``
    ``/sys/kernel/config/tsm/report`` (Linux >= 6.7): SNP reports with the host's
    certificates, and complete TDX quotes. See :mod:`guest_agent.attestation.configfs_tsm`.
``sev-guest``
    ``/dev/sev-guest`` ioctls SNP_GET_EXT_REPORT / SNP_GET_REPORT.
``tdx-guest``
    ``/dev/tdx_guest`` TDX_CMD_GET_REPORT0: only a TDREPORT, which must still be turned into
    a quote by the host's quoting enclave before anyone else can check it.

Every step is timed (:class:`~guest_agent.attestation.steps.StepTiming`) and the timings come
back in the :class:`Evidence`, to be exported as ``cvm_guest_attestation_*`` metrics.

On VMPL: configfs-tsm asks for the guest's floor unless ``vmpl`` is given; the ioctl has
no default in the kernel, so ``vmpl=None`` there means 0, which fails with firmware error
0x16 INVALID_PARAM in a guest running above VMPL 0 (under an SVSM) - ask for its VMPL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmattest.detect import EvidenceKind
from cvmcore.errors import UsageError
from guest_agent.attestation import configfs_tsm, guest_ioctl
from guest_agent.attestation.configfs_tsm import ConfigfsOps
from guest_agent.attestation.guest_ioctl import DeviceOpener, open_os_device
from guest_agent.attestation.steps import InterfaceUnavailable, StepTimer, StepTiming

NONCE_SIZE = 64
INTERFACES = ("auto", "configfs-tsm", "sev-guest", "tdx-guest")


@dataclass(frozen=True, slots=True)
class Evidence:
    """Evidence as fetched, with how it was fetched and how long each step took.

    ``data`` is the raw report, quote or TDREPORT (``kind`` says which); ``certificates`` the
    SNP certificate table the host supplied, if any (parse it with
    :func:`cvmattest.snp.parse_cert_table`).
    """

    tee: str
    kind: EvidenceKind
    interface: str
    data: bytes
    certificates: bytes | None
    nonce: bytes
    vmpl: int | None
    provider: str | None
    attempts: int
    timings: tuple[StepTiming, ...]

    @property
    def total_seconds(self) -> float:
        return sum(step.seconds for step in self.timings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (blobs as hex)."""
        return {
            "tee": self.tee,
            "kind": self.kind.value,
            "interface": self.interface,
            "data": self.data.hex(),
            "certificates": None if self.certificates is None else self.certificates.hex(),
            "nonce": self.nonce.hex(),
            "vmpl": self.vmpl,
            "provider": self.provider,
            "attempts": self.attempts,
            "timings": [{"step": t.step, "seconds": t.seconds} for t in self.timings],
            "total_seconds": self.total_seconds,
        }


def available_interface(root: Path) -> str:
    """The interface ``auto`` picks under ``root``; :class:`InterfaceUnavailable` if none."""
    if configfs_tsm.report_dir(root).is_dir():
        return "configfs-tsm"
    if (root / guest_ioctl.SEV_GUEST_DEVICE).exists():
        return "sev-guest"
    if (root / guest_ioctl.TDX_GUEST_DEVICE).exists():
        return "tdx-guest"
    raise InterfaceUnavailable(
        f"no attestation interface under {root}: no configfs-tsm ({configfs_tsm.TSM_REPORT_DIR}), "
        "no /dev/sev-guest, no /dev/tdx_guest (not a confidential VM, or its guest driver is not loaded)"
    )


def fetch_evidence(
    nonce: bytes,
    *,
    interface: str = "auto",
    vmpl: int | None = None,
    root: Path = Path("/"),
    want_certificates: bool = True,
    configfs: ConfigfsOps | None = None,
    open_device: DeviceOpener = open_os_device,
    clock: Callable[[], float] = time.perf_counter,
) -> Evidence:
    """Fetch attestation evidence bound to ``nonce`` (exactly 64 bytes).

    ``interface`` is ``auto``, ``configfs-tsm``, ``sev-guest`` or ``tdx-guest``; ``vmpl``
    applies to SEV-SNP; ``want_certificates`` asks for the SNP certificate table.
    ``root``, ``configfs`` and ``open_device`` let tests substitute the kernel.

    Raises :class:`UsageError` for a bad nonce, interface or VMPL,
    :class:`~guest_agent.attestation.steps.InterfaceUnavailable` when the interface is absent and
    :class:`~guest_agent.attestation.steps.EvidenceFetchError` when the request fails.
    """
    if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_SIZE:
        size = len(nonce) if isinstance(nonce, bytes | bytearray) else type(nonce).__name__
        raise UsageError(
            f"the nonce must be exactly {NONCE_SIZE} bytes (got {size}): it becomes the report data "
            "as is; hash a longer value (e.g. SHA-512) yourself"
        )
    nonce = bytes(nonce)
    if interface not in INTERFACES:
        raise UsageError(f"unknown attestation interface {interface!r} (one of {', '.join(INTERFACES)})")
    if vmpl is not None and not 0 <= vmpl <= 3:
        raise UsageError(f"VMPL {vmpl} is out of range (0..3)")
    timer = StepTimer(clock=clock)
    chosen = available_interface(root) if interface == "auto" else interface

    if chosen == "configfs-tsm":
        tsm = configfs_tsm.tsm_get_report(
            nonce, root=root, vmpl=vmpl, want_auxblob=want_certificates, timer=timer, ops=configfs
        )
        kind = EvidenceKind.SNP_REPORT if tsm.tee == "sev-snp" else EvidenceKind.TDX_QUOTE
        return Evidence(
            tee=tsm.tee,
            kind=kind,
            interface=chosen,
            data=tsm.outblob,
            certificates=tsm.auxblob,
            nonce=nonce,
            vmpl=tsm.vmpl,
            provider=tsm.provider,
            attempts=tsm.attempts,
            timings=tuple(timer.steps),
        )
    if chosen == "sev-guest":
        snp_vmpl = 0 if vmpl is None else vmpl
        snp = guest_ioctl.snp_get_report(
            nonce,
            vmpl=snp_vmpl,
            want_certificates=want_certificates,
            timer=timer,
            root=root,
            opener=open_device,
        )
        return Evidence(
            tee="sev-snp",
            kind=EvidenceKind.SNP_REPORT,
            interface=chosen,
            data=snp.report,
            certificates=snp.certificates,
            nonce=nonce,
            vmpl=snp_vmpl,
            provider=None,
            attempts=1 + snp.certs_resizes,
            timings=tuple(timer.steps),
        )
    if vmpl is not None:
        raise UsageError("a VMPL applies to SEV-SNP only, not to /dev/tdx_guest")
    tdreport = guest_ioctl.tdx_get_report0(nonce, timer=timer, root=root, opener=open_device)
    return Evidence(
        tee="tdx",
        kind=EvidenceKind.TDREPORT,
        interface=chosen,
        data=tdreport,
        certificates=None,
        nonce=nonce,
        vmpl=None,
        provider=None,
        attempts=1,
        timings=tuple(timer.steps),
    )
