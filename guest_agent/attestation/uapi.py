"""The kernel's attestation ioctls: numbers, structure layouts and error codes, as bytes.

Everything here is transcribed from the Linux UAPI headers and must stay byte-identical to
them; ``tests/attestation/test_attest_uapi.py`` pins every size, offset and number.

``include/uapi/linux/sev-guest.h`` (the ``sev-guest`` driver, ``/dev/sev-guest``)::

    struct snp_report_req {            /* 96 bytes */
        __u8  user_data[64];           /* 0:  the report data: the caller's nonce */
        __u32 vmpl;                    /* 64: the VMPL the report is for */
        __u8  rsvd[28];                /* 68: zero */
    };
    struct snp_report_resp { __u8 data[4000]; };   /* MSG_REPORT_RSP, see below */
    struct snp_guest_request_ioctl {   /* 32 bytes */
        __u8  msg_version;             /* 0:  must be non-zero (1) */
        __u64 req_data;                /* 8:  user address of the request structure */
        __u64 resp_data;               /* 16: user address of the response structure */
        union { __u64 exitinfo2;       /* 24: out: bits 31:0 firmware error, */
                struct { __u32 fw_error; __u32 vmm_error; }; };  /* 63:32 VMM error */
    };
    struct snp_ext_report_req {        /* 112 bytes (108 padded to 8) */
        struct snp_report_req data;    /* 0 */
        __u64 certs_address;           /* 96:  user address of the certificate buffer */
        __u32 certs_len;               /* 104: its size, page-aligned; in/out */
    };
    SNP_GET_REPORT     _IOWR('S', 0x0, struct snp_guest_request_ioctl)
    SNP_GET_EXT_REPORT _IOWR('S', 0x2, struct snp_guest_request_ioctl)
    SNP_GUEST_VMM_ERR_INVALID_LEN 1, SNP_GUEST_VMM_ERR_BUSY 2

When the certificate buffer is too small, SNP_GET_EXT_REPORT fails with vmm_error
INVALID_LEN and writes the size it needs into ``certs_len``. The response buffer holds the
firmware's ``MSG_REPORT_RSP`` (SEV-SNP ABI spec, "MSG_REPORT_RSP Message Structure"):
u32 status at 0, u32 report_size at 4, 24 reserved bytes, the report at 0x20.

``include/uapi/linux/tdx-guest.h`` (``/dev/tdx_guest``)::

    struct tdx_report_req {            /* 1088 bytes */
        __u8 reportdata[64];           /* 0:  in: REPORTDATA */
        __u8 tdreport[1024];           /* 64: out: TDREPORT */
    };
    TDX_CMD_GET_REPORT0 _IOWR('T', 1, struct tdx_report_req)

``_IOWR(type, nr, size)`` is ``(3 << 30) | (size << 16) | (type << 8) | nr`` on x86
(``include/uapi/asm-generic/ioctl.h``: 2 direction bits, 14 size bits, 8 type, 8 number).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

_IOC_WRITE = 1
_IOC_READ = 2
_IOC_SIZEBITS = 14


def iowr(ioctl_type: str, number: int, size: int) -> int:
    """The ``_IOWR`` ioctl request number."""
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit in {_IOC_SIZEBITS} bits")
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (ord(ioctl_type) << 8) | number


SNP_USER_DATA_SIZE = 64
SNP_REPORT_REQ = struct.Struct("<64sI28x")
"""struct snp_report_req: user_data, vmpl, rsvd."""
SNP_EXT_REPORT_REQ = struct.Struct("<64sI28xQI4x")
"""struct snp_ext_report_req: snp_report_req, certs_address, certs_len, tail padding."""
SNP_GUEST_REQUEST_IOCTL = struct.Struct("<B7xQQII")
"""struct snp_guest_request_ioctl: msg_version, (padding), req_data, resp_data, fw_error, vmm_error."""
SNP_REPORT_RESP_SIZE = 4000
MSG_REPORT_RSP_HEADER = struct.Struct("<II24x")
"""MSG_REPORT_RSP: status, report_size, reserved; the report follows at 0x20."""
SNP_MSG_VERSION = 1

SNP_GET_REPORT = iowr("S", 0x0, SNP_GUEST_REQUEST_IOCTL.size)
SNP_GET_EXT_REPORT = iowr("S", 0x2, SNP_GUEST_REQUEST_IOCTL.size)

SNP_GUEST_VMM_ERR_INVALID_LEN = 1
SNP_GUEST_VMM_ERR_BUSY = 2
SNP_GUEST_VMM_ERR_GENERIC = 0xFFFFFFFF
PAGE_SIZE = 4096

TDX_REPORTDATA_LEN = 64
TDX_REPORT_LEN = 1024
TDX_REPORT_REQ_SIZE = TDX_REPORTDATA_LEN + TDX_REPORT_LEN
TDX_CMD_GET_REPORT0 = iowr("T", 1, TDX_REPORT_REQ_SIZE)

SNP_VMM_ERRORS: Mapping[int, str] = {
    SNP_GUEST_VMM_ERR_INVALID_LEN: "the certificate buffer is too small (INVALID_LEN)",
    SNP_GUEST_VMM_ERR_BUSY: "the host is busy or throttling guest requests (BUSY); retry later",
    SNP_GUEST_VMM_ERR_GENERIC: "the host failed the guest request (GENERIC)",
}
"""VMM error codes of exitinfo2 bits 63:32 (sev-guest.h; GHCB spec SNP Guest Request)."""

SNP_FIRMWARE_ERRORS: Mapping[int, str] = {
    0x00: "SUCCESS",
    0x01: "INVALID_PLATFORM_STATE",
    0x02: "INVALID_GUEST_STATE",
    0x03: "INVALID_CONFIG",
    0x04: "INVALID_LENGTH",
    0x05: "ALREADY_OWNED",
    0x06: "INVALID_CERTIFICATE",
    0x07: "POLICY_FAILURE",
    0x08: "INACTIVE",
    0x09: "INVALID_ADDRESS",
    0x0A: "BAD_SIGNATURE",
    0x0B: "BAD_MEASUREMENT",
    0x0C: "ASID_OWNED",
    0x0D: "INVALID_ASID",
    0x0E: "WBINVD_REQUIRED",
    0x0F: "DFFLUSH_REQUIRED",
    0x10: "INVALID_GUEST",
    0x11: "INVALID_COMMAND",
    0x12: "ACTIVE",
    0x13: "HWERROR_PLATFORM",
    0x14: "HWERROR_UNSAFE",
    0x15: "UNSUPPORTED",
    0x16: "INVALID_PARAM",
    0x17: "RESOURCE_LIMIT",
    0x18: "SECURE_DATA_INVALID",
    0x27: "INVALID_KEY",
}
"""SEV firmware status codes (SEV-SNP ABI spec, "Status Codes" table)."""

FIRMWARE_ERROR_HINTS: Mapping[int, str] = {
    0x16: "usually a VMPL lower than the guest's own: ask for the VMPL the guest runs at or higher",
    0x27: "the requested key selection is not available on this platform",
}


def describe_firmware_error(code: int) -> str:
    """``0x16 INVALID_PARAM (usually a VMPL ...)`` for a firmware status code."""
    name = SNP_FIRMWARE_ERRORS.get(code, "unknown status")
    hint = FIRMWARE_ERROR_HINTS.get(code)
    return f"{code:#x} {name}" + (f" ({hint})" if hint else "")


def describe_vmm_error(code: int) -> str:
    return f"{code:#x} " + SNP_VMM_ERRORS.get(code, "unknown VMM error")
