"""The UAPI layouts: sizes, offsets, ioctl numbers and packed bytes, pinned.

The C declarations of include/uapi/linux/sev-guest.h and tdx-guest.h are restated as
ctypes structures, whose layout the C ABI rules decide; the struct-module formats that
cvmctl packs with must agree with them byte for byte.
"""

from __future__ import annotations

import ctypes

from guest_agent.attestation import uapi


class CSnpReportReq(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_uint8 * 64), ("vmpl", ctypes.c_uint32), ("rsvd", ctypes.c_uint8 * 28)]


class CSnpGuestRequestIoctl(ctypes.Structure):
    _fields_ = [
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("fw_error", ctypes.c_uint32),
        ("vmm_error", ctypes.c_uint32),
    ]


class CSnpExtReportReq(ctypes.Structure):
    _fields_ = [("data", CSnpReportReq), ("certs_address", ctypes.c_uint64), ("certs_len", ctypes.c_uint32)]


class CTdxReportReq(ctypes.Structure):
    _fields_ = [("reportdata", ctypes.c_uint8 * 64), ("tdreport", ctypes.c_uint8 * 1024)]


def test_sizes_match_the_c_layouts() -> None:
    assert uapi.SNP_REPORT_REQ.size == ctypes.sizeof(CSnpReportReq) == 96
    assert uapi.SNP_GUEST_REQUEST_IOCTL.size == ctypes.sizeof(CSnpGuestRequestIoctl) == 32
    assert uapi.SNP_EXT_REPORT_REQ.size == ctypes.sizeof(CSnpExtReportReq) == 112
    assert uapi.TDX_REPORT_REQ_SIZE == ctypes.sizeof(CTdxReportReq) == 1088
    assert uapi.MSG_REPORT_RSP_HEADER.size == 0x20


def test_offsets_match_the_c_layouts() -> None:
    assert CSnpReportReq.vmpl.offset == 64
    assert CSnpGuestRequestIoctl.req_data.offset == 8
    assert CSnpGuestRequestIoctl.resp_data.offset == 16
    assert CSnpGuestRequestIoctl.fw_error.offset == 24
    assert CSnpGuestRequestIoctl.vmm_error.offset == 28
    assert CSnpExtReportReq.certs_address.offset == 96
    assert CSnpExtReportReq.certs_len.offset == 104
    assert CTdxReportReq.tdreport.offset == 64


def test_ioctl_numbers() -> None:
    assert uapi.SNP_GET_REPORT == 0xC0205300
    assert uapi.SNP_GET_EXT_REPORT == 0xC0205302
    assert uapi.iowr("S", 1, 32) == 0xC0205301  # SNP_GET_DERIVED_KEY, for completeness
    assert uapi.TDX_CMD_GET_REPORT0 == 0xC4405401


def test_packed_bytes_equal_the_c_structures() -> None:
    nonce = bytes(range(64))
    packed = uapi.SNP_REPORT_REQ.pack(nonce, 2)
    c_req = CSnpReportReq()
    c_req.user_data[:] = list(nonce)
    c_req.vmpl = 2
    assert packed == bytes(c_req) == nonce + b"\x02\x00\x00\x00" + bytes(28)

    ext = uapi.SNP_EXT_REPORT_REQ.pack(nonce, 1, 0x1122334455667788, 0x4000)
    c_ext = CSnpExtReportReq()
    c_ext.data.user_data[:] = list(nonce)
    c_ext.data.vmpl = 1
    c_ext.certs_address = 0x1122334455667788
    c_ext.certs_len = 0x4000
    assert ext == bytes(c_ext)
    assert ext[96:112] == bytes.fromhex("8877665544332211") + bytes.fromhex("00400000") + bytes(4)

    ioctl = uapi.SNP_GUEST_REQUEST_IOCTL.pack(1, 0xAAAA, 0xBBBB, 0x16, 2)
    c_ioctl = CSnpGuestRequestIoctl(
        msg_version=1, req_data=0xAAAA, resp_data=0xBBBB, fw_error=0x16, vmm_error=2
    )
    assert ioctl == bytes(c_ioctl)
    assert ioctl[:8] == b"\x01" + bytes(7)
    # exitinfo2 as one u64: VMM error in bits 63:32, firmware error in bits 31:0
    assert int.from_bytes(ioctl[24:32], "little") == (2 << 32) | 0x16


def test_error_descriptions() -> None:
    assert uapi.describe_firmware_error(0x16).startswith("0x16 INVALID_PARAM (usually a VMPL")
    assert (
        uapi.describe_vmm_error(2) == "0x2 the host is busy or throttling guest requests (BUSY); retry later"
    )
    assert uapi.describe_firmware_error(0x99) == "0x99 unknown status"
