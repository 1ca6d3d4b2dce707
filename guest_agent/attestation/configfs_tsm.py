"""Evidence through configfs-tsm: the kernel's one interface for every TEE (Linux >= 6.7).

Documented in the kernel's ``Documentation/ABI/testing/configfs-tsm``. A process makes a
directory under ``/sys/kernel/config/tsm/report/``; the kernel fills it with attributes::

    provider         read   which driver answers: "sev_guest", "tdx_guest", ...
    privlevel        write  SNP: the VMPL to report for (must be >= privlevel_floor)
    privlevel_floor  read   SNP: the lowest VMPL this guest may ask for
    inblob           write  the report data: the verifier's nonce (SNP requires exactly 64 bytes)
    outblob          read   the evidence: SNP report, or the complete TDX quote
    auxblob          read   SNP: the certificate table the host supplied (may be empty)
    generation       read   counts writes to the directory's attributes

Reading ``outblob`` is what makes the kernel ask the firmware (or, for TDX, the host's
quoting enclave). The directory is shared by name, so another process could write
``inblob`` between our write and our read: the kernel's answer to that is ``generation``.
We read it after our last write and again after reading the blobs; if it moved, someone
wrote in between and we try again. We also check that the evidence carries our nonce,
which catches a writer that slipped in before our first ``generation`` read.

All file-system calls go through a :class:`ConfigfsOps`, so tests run the same code over a
temporary directory with a stand-in for the kernel.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cvmattest.binary import MalformedEvidence
from cvmattest.snp import parse_snp_report
from cvmattest.tdx import parse_tdx_quote
from cvmcore.errors import UsageError
from guest_agent.attestation.steps import EvidenceFetchError, InterfaceUnavailable, StepTimer

TSM_REPORT_DIR = Path("sys/kernel/config/tsm/report")
PROVIDER_TEES = {"sev_guest": "sev-snp", "tdx_guest": "tdx"}
MAX_VMPL = 3


class ConfigfsOps(Protocol):
    """The file-system calls configfs-tsm needs; :class:`RealConfigfs` makes them for real."""

    def mkdir(self, path: Path) -> None: ...

    def rmdir(self, path: Path) -> None: ...

    def read(self, path: Path) -> bytes: ...

    def write(self, path: Path, data: bytes) -> None: ...


class RealConfigfs:
    """configfs attributes are read and written whole, each write in one ``write(2)``."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        with open(path, "rb", buffering=0) as attribute:
            chunks = []
            while chunk := attribute.read(1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise EvidenceFetchError(f"short write to {path}: {written} of {len(data)} bytes")


@dataclass(frozen=True, slots=True)
class TsmReport:
    """What one configfs-tsm request returned."""

    tee: str
    provider: str
    outblob: bytes
    auxblob: bytes | None
    vmpl: int | None
    generation: int
    attempts: int


def report_dir(root: Path) -> Path:
    return root / TSM_REPORT_DIR


def _report_data_of(tee: str, outblob: bytes) -> bytes:
    try:
        if tee == "sev-snp":
            return parse_snp_report(outblob).report_data
        return parse_tdx_quote(outblob).body.report_data
    except MalformedEvidence as exc:
        raise EvidenceFetchError(f"configfs-tsm outblob is not valid evidence: {exc}") from exc


def _read_int(ops: ConfigfsOps, path: Path) -> int:
    text = ops.read(path).decode("ascii", "replace").strip()
    try:
        return int(text, 0)
    except ValueError:
        raise EvidenceFetchError(f"{path} holds {text!r}, not a number") from None


def tsm_get_report(
    nonce: bytes,
    *,
    root: Path,
    vmpl: int | None,
    want_auxblob: bool,
    timer: StepTimer,
    ops: ConfigfsOps | None = None,
    max_attempts: int = 3,
) -> TsmReport:
    """Request evidence through configfs-tsm under ``root`` (``/`` in a real guest).

    ``vmpl`` (SNP only) is written to ``privlevel``; ``None`` leaves the kernel's default,
    the floor. Raises :class:`InterfaceUnavailable` if there is no configfs-tsm,
    :class:`UsageError` for a VMPL the guest may not ask for, and
    :class:`EvidenceFetchError` if racing writers defeat ``max_attempts`` attempts.
    """
    ops = ops or RealConfigfs()
    base = report_dir(root)
    if not base.is_dir():
        raise InterfaceUnavailable(f"no configfs-tsm at {base} (Linux >= 6.7 with configfs mounted)")
    entry = base / f"cvmctl-{os.getpid()}-{secrets.token_hex(4)}"
    with timer.step("mkdir"):
        try:
            ops.mkdir(entry)
        except OSError as exc:
            raise EvidenceFetchError(f"cannot create {entry}: {exc.strerror or exc}") from exc
    try:
        with timer.step("read_provider"):
            provider = ops.read(entry / "provider").decode("ascii", "replace").strip()
        tee = PROVIDER_TEES.get(provider)
        if tee is None:
            raise InterfaceUnavailable(
                f"configfs-tsm provider {provider!r} is not one cvmctl knows (sev_guest, tdx_guest)"
            )
        if vmpl is not None:
            _set_vmpl(ops, entry, tee, vmpl, timer)
        for attempt in range(1, max_attempts + 1):
            with timer.step("write_inblob"):
                ops.write(entry / "inblob", nonce)
            generation = _read_int(ops, entry / "generation")
            with timer.step("read_outblob"):
                try:
                    outblob = ops.read(entry / "outblob")
                except OSError as exc:
                    raise EvidenceFetchError(
                        f"reading {entry / 'outblob'} failed: {exc.strerror or exc} "
                        "(the firmware or the host's quoting service refused; see the kernel log)"
                    ) from exc
            auxblob = None
            if want_auxblob and tee == "sev-snp":
                with timer.step("read_auxblob"), contextlib.suppress(OSError):
                    # Empty, or unreadable on kernels without auxblob: no host certificates,
                    # and the verifier gets the VCEK elsewhere (KDS).
                    auxblob = ops.read(entry / "auxblob") or None
            if _read_int(ops, entry / "generation") == generation and _report_data_of(tee, outblob) == nonce:
                return TsmReport(tee, provider, outblob, auxblob, vmpl, generation, attempt)
        raise EvidenceFetchError(
            f"another process kept writing to {entry} ({max_attempts} attempts saw generation move "
            "or a foreign nonce in the report)"
        )
    except OSError as exc:  # an attribute a report entry has is missing or refused: not our caller's fault
        raise EvidenceFetchError(
            f"configfs-tsm: {exc.filename or entry}: {exc.strerror or exc} (is {base} configfs-tsm?)"
        ) from exc
    finally:
        # Leaving an entry behind is harmless; an error that got us here matters more.
        with timer.step("rmdir"), contextlib.suppress(OSError):
            ops.rmdir(entry)


def _set_vmpl(ops: ConfigfsOps, entry: Path, tee: str, vmpl: int, timer: StepTimer) -> None:
    if tee != "sev-snp":
        raise UsageError(f"a VMPL applies to SEV-SNP only; this guest's provider is {tee}")
    if not 0 <= vmpl <= MAX_VMPL:
        raise UsageError(f"VMPL {vmpl} is out of range (0..{MAX_VMPL})")
    floor_path = entry / "privlevel_floor"
    floor = _read_int(ops, floor_path) if floor_path.exists() else 0
    if vmpl < floor:
        raise UsageError(
            f"VMPL {vmpl} is below this guest's privlevel_floor {floor}: ask for {floor} or higher"
        )
    with timer.step("write_privlevel"):
        try:
            ops.write(entry / "privlevel", str(vmpl).encode())
        except OSError as exc:
            raise UsageError(f"the kernel refused VMPL {vmpl}: {exc.strerror or exc}") from exc
