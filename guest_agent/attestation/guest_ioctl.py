"""Evidence through the guest drivers' ioctls: ``/dev/sev-guest`` and ``/dev/tdx_guest``.

These predate configfs-tsm and are what older guest kernels offer. Layouts and numbers are
in :mod:`guest_agent.attestation.uapi`. The structures hold *user addresses* of further
buffers (the SNP request, response and certificate buffers), so those live in ``ctypes``
buffers whose addresses we pack; the kernel reads and writes them in place.

The device is reached through a :class:`GuestDevice`, so tests substitute a fake device
that checks the packed request bytes and answers as the kernel would.

Errors are mapped to sentences: a firmware status (``fw_error``, or the ``status`` of
``MSG_REPORT_RSP``) by its name in the SEV-SNP ABI spec with a hint where one helps
(``0x16 INVALID_PARAM`` is nearly always a VMPL below the guest's own), a VMM error
(``vmm_error``) by its sev-guest.h name.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cvmcore.errors import UsageError
from guest_agent.attestation import uapi
from guest_agent.attestation.steps import EvidenceFetchError, InterfaceUnavailable, StepTimer

SEV_GUEST_DEVICE = Path("dev/sev-guest")
TDX_GUEST_DEVICE = Path("dev/tdx_guest")
INITIAL_CERTS_LEN = 4 * uapi.PAGE_SIZE
MAX_CERTS_LEN = 1 << 20


class GuestDevice(Protocol):
    """An open guest-driver device: ``ioctl`` mutates ``arg`` in place, raises ``OSError``."""

    def ioctl(self, request: int, arg: bytearray) -> None: ...

    def close(self) -> None: ...


DeviceOpener = Callable[[Path], GuestDevice]


class OsGuestDevice:
    """A real character device, opened read-write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, request: int, arg: bytearray) -> None:
        # mutate_flag=True: the kernel's writes (exitinfo2, the TDREPORT) land in ``arg``,
        # even when the call fails - CPython copies the buffer back before checking errors.
        fcntl.ioctl(self.fd, request, arg, True)

    def close(self) -> None:
        os.close(self.fd)


def open_os_device(path: Path) -> GuestDevice:
    return OsGuestDevice(path)


@dataclass(frozen=True, slots=True)
class SnpIoctlReport:
    report: bytes
    certificates: bytes | None
    certs_resizes: int


def _open(opener: DeviceOpener, path: Path, timer: StepTimer) -> GuestDevice:
    with timer.step("open"):
        try:
            return opener(path)
        except FileNotFoundError as exc:
            raise InterfaceUnavailable(f"no {path} (is the guest driver loaded?)") from exc
        except OSError as exc:
            raise EvidenceFetchError(f"cannot open {path}: {exc.strerror or exc}") from exc


def _snp_error(exc: OSError, ioctl_arg: bytearray, vmpl: int) -> EvidenceFetchError:
    _, _, _, fw_error, vmm_error = uapi.SNP_GUEST_REQUEST_IOCTL.unpack(ioctl_arg)
    parts = [f"SNP guest request failed: {exc.strerror or exc}"]
    if fw_error:
        parts.append(f"firmware error {uapi.describe_firmware_error(fw_error)}")
    if vmm_error:
        parts.append(f"VMM error {uapi.describe_vmm_error(vmm_error)}")
    if fw_error == 0x16:
        parts.append(f"requested VMPL {vmpl}")
    error = EvidenceFetchError("; ".join(parts))
    error.__cause__ = exc
    return error


def _check_vmpl(vmpl: int) -> None:
    if not 0 <= vmpl <= 3:
        raise UsageError(f"VMPL {vmpl} is out of range (0..3)")


def _report_from_response(response: bytes, vmpl: int) -> bytes:
    status, size = uapi.MSG_REPORT_RSP_HEADER.unpack_from(response)
    if status != 0:
        message = f"the firmware answered MSG_REPORT_REQ with {uapi.describe_firmware_error(status)}"
        if status == 0x16:
            message += f"; requested VMPL {vmpl}"
        raise EvidenceFetchError(message)
    start = uapi.MSG_REPORT_RSP_HEADER.size
    if size == 0 or start + size > len(response):
        raise EvidenceFetchError(f"MSG_REPORT_RSP claims a report of {size} bytes")
    return response[start : start + size]


def _guest_request(request: ctypes.Array[ctypes.c_char], response: ctypes.Array[ctypes.c_char]) -> bytearray:
    """A struct snp_guest_request_ioctl pointing at the request and response buffers."""
    return bytearray(
        uapi.SNP_GUEST_REQUEST_IOCTL.pack(
            uapi.SNP_MSG_VERSION, ctypes.addressof(request), ctypes.addressof(response), 0, 0
        )
    )


def snp_get_report(
    nonce: bytes,
    *,
    vmpl: int,
    want_certificates: bool,
    timer: StepTimer,
    root: Path = Path("/"),
    opener: DeviceOpener = open_os_device,
) -> SnpIoctlReport:
    """SNP_GET_EXT_REPORT (with the host's certificates) or SNP_GET_REPORT on ``/dev/sev-guest``.

    The certificate buffer starts at four pages; when the kernel answers INVALID_LEN it has
    written the size it needs into ``certs_len`` and we retry once with that size.
    """
    _check_vmpl(vmpl)
    device = _open(opener, root / SEV_GUEST_DEVICE, timer)
    try:
        response = ctypes.create_string_buffer(uapi.SNP_REPORT_RESP_SIZE)
        if not want_certificates:
            request = ctypes.create_string_buffer(
                uapi.SNP_REPORT_REQ.pack(nonce, vmpl), uapi.SNP_REPORT_REQ.size
            )
            arg = _guest_request(request, response)
            with timer.step("ioctl_SNP_GET_REPORT"):
                try:
                    device.ioctl(uapi.SNP_GET_REPORT, arg)
                except OSError as exc:
                    raise _snp_error(exc, arg, vmpl) from exc
            return SnpIoctlReport(_report_from_response(response.raw, vmpl), None, 0)

        certs_len = INITIAL_CERTS_LEN
        resizes = 0
        while True:
            certs = ctypes.create_string_buffer(certs_len)
            ext_request = ctypes.create_string_buffer(
                uapi.SNP_EXT_REPORT_REQ.pack(nonce, vmpl, ctypes.addressof(certs), certs_len),
                uapi.SNP_EXT_REPORT_REQ.size,
            )
            arg = _guest_request(ext_request, response)
            with timer.step("ioctl_SNP_GET_EXT_REPORT"):
                try:
                    device.ioctl(uapi.SNP_GET_EXT_REPORT, arg)
                    break
                except OSError as exc:
                    vmm_error = uapi.SNP_GUEST_REQUEST_IOCTL.unpack(arg)[4]
                    if vmm_error != uapi.SNP_GUEST_VMM_ERR_INVALID_LEN or resizes:
                        raise _snp_error(exc, arg, vmpl) from exc
                    needed = uapi.SNP_EXT_REPORT_REQ.unpack(ext_request.raw)[3]
                    if not certs_len < needed <= MAX_CERTS_LEN:
                        raise EvidenceFetchError(
                            f"the kernel wants a certificate buffer of {needed} bytes (had {certs_len})"
                        ) from exc
            certs_len = -(-needed // uapi.PAGE_SIZE) * uapi.PAGE_SIZE  # page-aligned, as the driver requires
            resizes += 1
        table = certs.raw
        return SnpIoctlReport(
            _report_from_response(response.raw, vmpl), table if any(table) else None, resizes
        )
    finally:
        device.close()


def tdx_get_report0(
    nonce: bytes,
    *,
    timer: StepTimer,
    root: Path = Path("/"),
    opener: DeviceOpener = open_os_device,
) -> bytes:
    """TDX_CMD_GET_REPORT0 on ``/dev/tdx_guest``: the 1024-byte TDREPORT for ``nonce``."""
    device = _open(opener, root / TDX_GUEST_DEVICE, timer)
    try:
        arg = bytearray(nonce) + bytearray(uapi.TDX_REPORT_LEN)
        with timer.step("ioctl_TDX_CMD_GET_REPORT0"):
            try:
                device.ioctl(uapi.TDX_CMD_GET_REPORT0, arg)
            except OSError as exc:
                hint = " (the TDCALL failed)" if exc.errno == errno.EIO else ""
                raise EvidenceFetchError(f"TDX_CMD_GET_REPORT0 failed: {exc.strerror or exc}{hint}") from exc
        return bytes(arg[uapi.TDX_REPORTDATA_LEN :])
    finally:
        device.close()
