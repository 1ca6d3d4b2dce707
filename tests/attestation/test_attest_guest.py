"""In-guest fetch: configfs-tsm over a fake tree with a stand-in kernel; ioctls with fake devices.

The stand-in kernel (:class:`FakeTsmKernel`) does what the real one does to a report entry:
creates the attributes on mkdir, bumps ``generation`` on every write, refuses a VMPL below
the floor, and produces ``outblob`` when it is read. The fake devices check the packed
ioctl structures byte for byte (reading the request through the user address the
structure carries, as the kernel does) and answer through the response addresses.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from cvmattest.certs import load_certificate_file, load_certificates
from cvmattest.detect import EvidenceKind, parse_evidence
from cvmattest.snp import build_cert_table, parse_cert_table, parse_snp_report
from cvmattest.tdx import parse_tdx_quote
from cvmattest.verify import verify_evidence
from cvmcore.errors import UsageError
from guest_agent.attestation import uapi
from guest_agent.attestation.configfs_tsm import TSM_REPORT_DIR, RealConfigfs
from guest_agent.attestation.guest import fetch_evidence
from guest_agent.attestation.guest_ioctl import SEV_GUEST_DEVICE, TDX_GUEST_DEVICE, GuestDevice
from guest_agent.attestation.steps import EvidenceFetchError, InterfaceUnavailable

VLEK_REPORT = "snp/milan_v3_vlek_aws_report.bin"


class FakeTsmKernel(RealConfigfs):
    """Real files in a temporary tree, with the kernel's side of configfs-tsm played here."""

    def __init__(self, provider: str, outblob: Callable[[bytes, int], bytes], *, floor: int = 0) -> None:
        self.provider = provider
        self.make_outblob = outblob
        self.floor = floor
        self.auxblob = b""
        self.racing_writes = 0  # how many outblob reads see another process write first
        self.entries: list[Path] = []

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        self.entries.append(path)
        attributes = {"provider": self.provider + "\n", "generation": "0\n", "inblob": "", "outblob": ""}
        if self.provider == "sev_guest":
            attributes |= {"privlevel": str(self.floor), "privlevel_floor": f"{self.floor}\n", "auxblob": ""}
        for name, text in attributes.items():
            (path / name).write_text(text)

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        os.rmdir(path)

    def _bump(self, entry: Path) -> None:
        generation = int((entry / "generation").read_text())
        (entry / "generation").write_text(f"{generation + 1}\n")

    def write(self, path: Path, data: bytes) -> None:
        if path.name == "privlevel" and int(data) < self.floor:
            raise OSError(errno.EINVAL, "Invalid argument")
        if path.name == "inblob" and self.provider == "sev_guest" and len(data) != 64:
            raise OSError(errno.EINVAL, "Invalid argument")
        super().write(path, data)
        self._bump(path.parent)

    def read(self, path: Path) -> bytes:
        if path.name == "outblob":
            entry = path.parent
            if self.racing_writes:
                self.racing_writes -= 1
                (entry / "inblob").write_bytes(b"\xee" * 64)  # someone else's nonce
                self._bump(entry)
            inblob = (entry / "inblob").read_bytes()
            privlevel = int((entry / "privlevel").read_text()) if (entry / "privlevel").exists() else 0
            (entry / "outblob").write_bytes(self.make_outblob(inblob, privlevel))
            if (entry / "auxblob").exists():
                (entry / "auxblob").write_bytes(self.auxblob)
        return super().read(path)


def _tree(tmp_path: Path) -> Path:
    (tmp_path / TSM_REPORT_DIR).mkdir(parents=True, exist_ok=True)
    return tmp_path


def _snp_outblob(template: bytes) -> Callable[[bytes, int], bytes]:
    """The firmware: the template report with the request's report data and VMPL put in."""

    def make(inblob: bytes, vmpl: int) -> bytes:
        report = bytearray(template)
        if inblob != template[0x50:0x90] or vmpl != int.from_bytes(template[0x30:0x34], "little"):
            report[0x30:0x34] = vmpl.to_bytes(4, "little")
            report[0x50:0x90] = inblob  # (the signature no longer matches: a fake firmware)
        return bytes(report)

    return make


def _vlek_cert_table(root: Path) -> bytes:
    vlek = load_certificates((root / "snp/milan_v3_vlek_aws_vlek.der").read_bytes())[0]
    asvk, ark = load_certificates((root / "snp/asvk_ark_milan.pem").read_bytes())
    table = build_cert_table(
        {
            kind: cert.public_bytes(Encoding.DER)
            for kind, cert in (("VLEK", vlek), ("ASK", asvk), ("ARK", ark))
        }
    )
    return table + bytes(-len(table) % 4096)


def test_configfs_snp_end_to_end_verifies(attestation_testdata: Path, tmp_path: Path) -> None:
    """The fetched report and auxblob certificates verify (the fake serves a real report)."""
    template = (attestation_testdata / VLEK_REPORT).read_bytes()
    kernel = FakeTsmKernel("sev_guest", _snp_outblob(template), floor=1)
    kernel.auxblob = _vlek_cert_table(attestation_testdata)
    nonce = template[0x50:0x90]  # the report was made for this report data
    evidence = fetch_evidence(nonce, vmpl=1, root=_tree(tmp_path), configfs=kernel)

    assert (evidence.tee, evidence.kind, evidence.interface) == (
        "sev-snp",
        EvidenceKind.SNP_REPORT,
        "configfs-tsm",
    )
    assert evidence.data == template and evidence.vmpl == 1 and evidence.provider == "sev_guest"
    assert [t.step for t in evidence.timings] == [
        "mkdir",
        "read_provider",
        "write_privlevel",
        "write_inblob",
        "read_outblob",
        "read_auxblob",
        "rmdir",
    ]
    assert all(t.seconds >= 0 for t in evidence.timings)
    assert evidence.attempts == 1
    assert [e.kind for e in parse_cert_table(evidence.certificates or b"")] == ["VLEK", "ASK", "ARK"]
    certificates = load_certificate_file(evidence.certificates or b"", "auxblob")
    result = verify_evidence(
        parse_evidence(evidence.data), certificates, at=datetime(2025, 6, 1, tzinfo=UTC), nonce=nonce
    )
    assert result.verified, result.summary()
    assert list((tmp_path / TSM_REPORT_DIR).iterdir()) == []  # the entry was removed


def test_configfs_generation_race_is_retried(attestation_testdata: Path, tmp_path: Path) -> None:
    template = (attestation_testdata / "snp/genoa_v3_msft_report.bin").read_bytes()
    kernel = FakeTsmKernel("sev_guest", _snp_outblob(template))
    kernel.racing_writes = 2
    nonce = bytes(range(64))
    evidence = fetch_evidence(nonce, root=_tree(tmp_path), configfs=kernel, want_certificates=False)
    assert evidence.attempts == 3
    assert parse_snp_report(evidence.data).report_data == nonce
    assert [t.step for t in evidence.timings].count("write_inblob") == 3
    assert "read_auxblob" not in [t.step for t in evidence.timings]


def test_configfs_persistent_race_fails(attestation_testdata: Path, tmp_path: Path) -> None:
    template = (attestation_testdata / "snp/genoa_v3_msft_report.bin").read_bytes()
    kernel = FakeTsmKernel("sev_guest", _snp_outblob(template))
    kernel.racing_writes = 10
    with pytest.raises(EvidenceFetchError, match="another process kept writing"):
        fetch_evidence(bytes(64), root=_tree(tmp_path), configfs=kernel)
    assert list((tmp_path / TSM_REPORT_DIR).iterdir()) == []


def test_configfs_vmpl_below_floor(attestation_testdata: Path, tmp_path: Path) -> None:
    template = (attestation_testdata / VLEK_REPORT).read_bytes()
    kernel = FakeTsmKernel("sev_guest", _snp_outblob(template), floor=2)
    with pytest.raises(UsageError, match="VMPL 1 is below this guest's privlevel_floor 2"):
        fetch_evidence(bytes(64), vmpl=1, root=_tree(tmp_path), configfs=kernel)
    # without an explicit VMPL the kernel's default (the floor) is used and reported back
    evidence = fetch_evidence(bytes(64), root=_tree(tmp_path), configfs=kernel)
    assert parse_snp_report(evidence.data).vmpl == 2 and evidence.vmpl is None


def test_configfs_tdx_quote(attestation_testdata: Path, tmp_path: Path) -> None:
    quote = (attestation_testdata / "tdx/quote_v4_trustee.dat").read_bytes()
    nonce = parse_tdx_quote(quote).body.report_data
    kernel = FakeTsmKernel("tdx_guest", lambda inblob, _vmpl: quote)
    evidence = fetch_evidence(nonce, root=_tree(tmp_path), configfs=kernel)
    assert (evidence.tee, evidence.kind, evidence.data) == ("tdx", EvidenceKind.TDX_QUOTE, quote)
    assert evidence.certificates is None
    assert verify_evidence(
        parse_evidence(evidence.data), at=datetime(2026, 11, 26, tzinfo=UTC), nonce=nonce
    ).verified
    with pytest.raises(UsageError, match="VMPL applies to SEV-SNP only"):
        fetch_evidence(nonce, vmpl=0, root=_tree(tmp_path), configfs=kernel)


def test_configfs_foreign_nonce_in_quote_is_a_race(attestation_testdata: Path, tmp_path: Path) -> None:
    quote = (attestation_testdata / "tdx/quote_v4_trustee.dat").read_bytes()
    kernel = FakeTsmKernel("tdx_guest", lambda inblob, _vmpl: quote)  # always the same, foreign, report data
    with pytest.raises(EvidenceFetchError, match="foreign nonce"):
        fetch_evidence(bytes(64), root=_tree(tmp_path), configfs=kernel)


def test_nonce_must_be_64_bytes(tmp_path: Path) -> None:
    for bad in (b"", bytes(32), bytes(65)):
        with pytest.raises(UsageError, match="exactly 64 bytes"):
            fetch_evidence(bad, root=tmp_path)


def test_nothing_available(tmp_path: Path) -> None:
    with pytest.raises(InterfaceUnavailable, match="no attestation interface"):
        fetch_evidence(bytes(64), root=tmp_path)
    with pytest.raises(UsageError, match="unknown attestation interface 'tpm'"):
        fetch_evidence(bytes(64), interface="tpm", root=tmp_path)


def test_a_report_directory_that_is_not_configfs_is_a_fetch_error(tmp_path: Path) -> None:
    """Found by the storm (issue 13): a plain directory where configfs-tsm should be (a
    recorded guest tree) let FileNotFoundError out of the agent as INTERNAL."""
    with pytest.raises(EvidenceFetchError, match=r"configfs-tsm: .*/provider: No such file or directory"):
        fetch_evidence(bytes(64), interface="configfs-tsm", root=_tree(tmp_path))
    assert list((tmp_path / TSM_REPORT_DIR).iterdir()) == []  # the entry it made is gone


# -- ioctls ------------------------------------------------------------------------------


class FakeSevGuest:
    """/dev/sev-guest as the kernel answers it, checking every packed byte it is given."""

    def __init__(self, report: bytes, certs: bytes, nonce: bytes, vmpl: int) -> None:
        self.report = report
        self.certs = certs
        self.nonce = nonce
        self.vmpl = vmpl
        self.calls: list[tuple[int, int]] = []  # (request, certs_len)
        self.fw_error = 0
        self.status = 0
        self.closed = False

    def ioctl(self, request: int, arg: bytearray) -> None:
        assert len(arg) == 32
        version, req_addr, resp_addr, fw_error, vmm_error = uapi.SNP_GUEST_REQUEST_IOCTL.unpack(arg)
        assert (version, fw_error, vmm_error) == (1, 0, 0)
        assert arg[1:8] == bytes(7)
        if request == uapi.SNP_GET_EXT_REPORT:
            raw = ctypes.string_at(req_addr, 112)
            _, _, certs_addr, certs_len = uapi.SNP_EXT_REPORT_REQ.unpack(raw)
            assert raw == self.nonce + self.vmpl.to_bytes(4, "little") + bytes(28) + raw[96:104] + raw[
                104:108
            ] + bytes(4)
            assert certs_len % 4096 == 0
            self.calls.append((request, certs_len))
            if certs_len < len(self.certs):
                ctypes.memmove(req_addr + 104, len(self.certs).to_bytes(4, "little"), 4)
                arg[28:32] = uapi.SNP_GUEST_VMM_ERR_INVALID_LEN.to_bytes(4, "little")
                raise OSError(errno.EIO, "Input/output error")
            ctypes.memmove(certs_addr, self.certs, len(self.certs))
        else:
            assert request == uapi.SNP_GET_REPORT
            raw = ctypes.string_at(req_addr, 96)
            assert raw == self.nonce + self.vmpl.to_bytes(4, "little") + bytes(28)
            self.calls.append((request, 0))
        if self.fw_error:
            arg[24:28] = self.fw_error.to_bytes(4, "little")
            raise OSError(errno.EIO, "Input/output error")
        response = uapi.MSG_REPORT_RSP_HEADER.pack(self.status, len(self.report)) + self.report
        ctypes.memmove(resp_addr, response, len(response))

    def close(self) -> None:
        self.closed = True


def _opener(device: GuestDevice, expected: Path) -> Callable[[Path], GuestDevice]:
    def open_device(path: Path) -> GuestDevice:
        assert path == expected
        return device

    return open_device


def test_sev_guest_ext_report_resizes_the_cert_buffer(attestation_testdata: Path, tmp_path: Path) -> None:
    report = (attestation_testdata / VLEK_REPORT).read_bytes()
    certs = _vlek_cert_table(attestation_testdata) + bytes(4 * 4096)  # bigger than the first buffer
    nonce = report[0x50:0x90]
    device = FakeSevGuest(report, certs, nonce, vmpl=1)
    (tmp_path / "dev").mkdir()
    (tmp_path / SEV_GUEST_DEVICE).touch()
    evidence = fetch_evidence(
        nonce, vmpl=1, root=tmp_path, open_device=_opener(device, tmp_path / SEV_GUEST_DEVICE)
    )
    assert evidence.interface == "sev-guest" and evidence.data == report
    assert device.calls == [(uapi.SNP_GET_EXT_REPORT, 4 * 4096), (uapi.SNP_GET_EXT_REPORT, len(certs))]
    assert evidence.certificates is not None and evidence.certificates[: len(certs)] == certs
    assert [t.step for t in evidence.timings] == [
        "open",
        "ioctl_SNP_GET_EXT_REPORT",
        "ioctl_SNP_GET_EXT_REPORT",
    ]
    assert evidence.attempts == 2 and device.closed


def test_sev_guest_plain_report_and_firmware_errors(attestation_testdata: Path, tmp_path: Path) -> None:
    report = (attestation_testdata / "snp/milan_v3_msft_report.bin").read_bytes()
    device = FakeSevGuest(report, b"", bytes(64), vmpl=0)
    opener = _opener(device, tmp_path / SEV_GUEST_DEVICE)
    evidence = fetch_evidence(
        bytes(64), interface="sev-guest", root=tmp_path, want_certificates=False, open_device=opener
    )
    assert evidence.data == report and evidence.vmpl == 0 and evidence.certificates is None
    assert device.calls == [(uapi.SNP_GET_REPORT, 0)]

    device.fw_error = 0x16
    with pytest.raises(
        EvidenceFetchError, match=r"firmware error 0x16 INVALID_PARAM \(usually a VMPL.*requested VMPL 0"
    ):
        fetch_evidence(
            bytes(64), interface="sev-guest", root=tmp_path, want_certificates=False, open_device=opener
        )
    device.fw_error = 0
    device.status = 0x16  # the firmware's MSG_REPORT_RSP status, the ioctl itself succeeded
    with pytest.raises(EvidenceFetchError, match="answered MSG_REPORT_REQ with 0x16 INVALID_PARAM"):
        fetch_evidence(
            bytes(64), interface="sev-guest", root=tmp_path, want_certificates=False, open_device=opener
        )


def test_sev_guest_busy_host(attestation_testdata: Path, tmp_path: Path) -> None:
    class Busy(FakeSevGuest):
        def ioctl(self, request: int, arg: bytearray) -> None:
            arg[28:32] = uapi.SNP_GUEST_VMM_ERR_BUSY.to_bytes(4, "little")
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    device = Busy(b"", b"", bytes(64), 0)
    with pytest.raises(EvidenceFetchError, match=r"VMM error 0x2 the host is busy"):
        fetch_evidence(
            bytes(64),
            interface="sev-guest",
            root=tmp_path,
            open_device=_opener(device, tmp_path / SEV_GUEST_DEVICE),
        )


def test_missing_device_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(InterfaceUnavailable, match="dev/sev-guest"):
        fetch_evidence(bytes(64), interface="sev-guest", root=tmp_path)


class FakeTdxGuest:
    def __init__(self, tdreport: bytes, nonce: bytes) -> None:
        self.tdreport = tdreport
        self.nonce = nonce
        self.closed = False

    def ioctl(self, request: int, arg: bytearray) -> None:
        assert request == 0xC4405401
        assert len(arg) == 1088 and bytes(arg[:64]) == self.nonce and bytes(arg[64:]) == bytes(1024)
        arg[64:] = self.tdreport

    def close(self) -> None:
        self.closed = True


def test_tdx_guest_get_report0(attestation_testdata: Path, tmp_path: Path) -> None:
    tdreport = (attestation_testdata / "tdx/tdreport_guestcomponents.bin").read_bytes()
    nonce = bytes(range(64))
    device = FakeTdxGuest(tdreport, nonce)
    (tmp_path / "dev").mkdir()
    (tmp_path / TDX_GUEST_DEVICE).touch()
    evidence = fetch_evidence(nonce, root=tmp_path, open_device=_opener(device, tmp_path / TDX_GUEST_DEVICE))
    assert (evidence.interface, evidence.kind, evidence.data) == (
        "tdx-guest",
        EvidenceKind.TDREPORT,
        tdreport,
    )
    assert [t.step for t in evidence.timings] == ["open", "ioctl_TDX_CMD_GET_REPORT0"]
    assert device.closed
    with pytest.raises(UsageError, match="VMPL applies to SEV-SNP only"):
        fetch_evidence(nonce, vmpl=0, root=tmp_path, open_device=_opener(device, tmp_path / TDX_GUEST_DEVICE))


def test_timings_use_the_given_clock(attestation_testdata: Path, tmp_path: Path) -> None:
    ticks = iter(range(0, 1000, 5))
    tdreport = (attestation_testdata / "tdx/tdreport_guestcomponents.bin").read_bytes()
    device = FakeTdxGuest(tdreport, bytes(64))
    evidence = fetch_evidence(
        bytes(64),
        interface="tdx-guest",
        root=tmp_path,
        open_device=_opener(device, tmp_path / TDX_GUEST_DEVICE),
        clock=lambda: float(next(ticks)),
    )
    assert [(t.step, t.seconds) for t in evidence.timings] == [
        ("open", 5.0),
        ("ioctl_TDX_CMD_GET_REPORT0", 5.0),
    ]
    assert evidence.total_seconds == 10.0
    assert evidence.to_dict()["timings"][0] == {"step": "open", "seconds": 5.0}
