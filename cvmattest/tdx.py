"""Intel TDX evidence: the DCAP quote (versions 4 and 5) and the raw TDREPORT.

A TD asks the TDX module for a **TDREPORT** (``TDG.MR.REPORT``, 1024 bytes, see
``include/uapi/linux/tdx-guest.h``). It is MAC'd with a key only the platform knows, so
nobody off the machine can check it. The **quoting enclave** (QE) on the host checks the
MAC and turns the report into a **quote** signed with an ECDSA P-256 *attestation key*;
the QE vouches for that key with its own SGX report, signed by the platform's **PCK**
(Provisioning Certification Key), whose certificate chains to Intel's SGX Root CA.

Quote layout (Intel TDX DCAP Quote Generation Library and Quote Verification Library
API, appendix "Quote Format" - version 4; version 5 from the TDX 1.5 update of the same
document; all integers little-endian)::

    header (48)          version u16, att_key_type u16 (2 = ECDSA-256), tee_type u32 (0x81 = TDX),
                         4 reserved bytes, qe_vendor_id (16), user_data (20)
    v4: body (584)       TD report body, TDX 1.0 layout, at 48
    v5: body_type u16    2 = TDX 1.0 (584 bytes), 3 = TDX 1.5 (648 bytes), at 48
        body_size u32    at 50
        body             at 54
    signature_data_len   u32, right after the body; the quote's signature covers header+body
    signature_data       ECDSA signature (r||s, 32+32, big-endian), attestation public key
                         (x||y, 32+32), certification data: u16 type, u32 size, data

    certification data type 6 (QE report certification data):
        QE report (384)           an SGX REPORT body
        QE report signature (64)  r||s by the PCK key, over the 384 bytes
        u16 auth data size, auth data
        inner certification data: u16 type (5 = PCK certificate chain, PEM), u32 size, data

    QE report: report_data[0:32] == SHA-256(attestation key || auth data); [32:64] zero.

TD report body (TDX 1.0, offsets relative to the body): tee_tcb_svn 0 (16), mr_seam 16 (48),
mr_signer_seam 64 (48), seam_attributes 112 (8), td_attributes 120 (8), xfam 128 (8),
mr_td 136 (48), mr_config_id 184 (48), mr_owner 232 (48), mr_owner_config 280 (48),
rtmr0-3 328 (4 x 48), report_data 520 (64). TDX 1.5 appends tee_tcb_svn2 584 (16) and
mr_servicetd 600 (48).

Parsing uses the length fields, never the size of the input: a quote may be followed by
padding or junk (one of the shared test vectors is), which :attr:`TdxQuote.trailing_bytes`
counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cvmattest.binary import FieldReader

QUOTE_HEADER_SIZE = 48
TEE_TYPE_TDX = 0x81
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
BODY_TYPE_TDX10 = 2
BODY_TYPE_TDX15 = 3
BODY_SIZE = {BODY_TYPE_TDX10: 584, BODY_TYPE_TDX15: 648}
CERT_DATA_QE_REPORT = 6
CERT_DATA_PCK_CHAIN = 5
QE_REPORT_SIZE = 384
TDREPORT_SIZE = 1024

_TD_BODY_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("tee_tcb_svn", 0, 16),
    ("mr_seam", 16, 48),
    ("mr_signer_seam", 64, 48),
    ("seam_attributes", 112, 8),
    ("td_attributes", 120, 8),
    ("xfam", 128, 8),
    ("mr_td", 136, 48),
    ("mr_config_id", 184, 48),
    ("mr_owner", 232, 48),
    ("mr_owner_config", 280, 48),
    ("rtmr0", 328, 48),
    ("rtmr1", 376, 48),
    ("rtmr2", 424, 48),
    ("rtmr3", 472, 48),
    ("report_data", 520, 64),
)
_TD15_EXTRA_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("tee_tcb_svn2", 584, 16),
    ("mr_servicetd", 600, 48),
)


@dataclass(frozen=True, slots=True)
class TdReportBody:
    """The TD's measurements as the quote carries them; ``fields`` maps name -> bytes."""

    body_type: int
    fields: dict[str, bytes]

    @property
    def report_data(self) -> bytes:
        return self.fields["report_data"]

    @property
    def mr_td(self) -> bytes:
        return self.fields["mr_td"]

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES bit 0 (TUD.DEBUG): the TD is debuggable, its memory readable by the host."""
        return bool(self.fields["td_attributes"][0] & 1)

    def to_dict(self) -> dict[str, str]:
        return {name: value.hex() for name, value in self.fields.items()}


def _parse_td_body(reader: FieldReader, offset: int, body_type: int) -> TdReportBody:
    fields = _TD_BODY_FIELDS + (_TD15_EXTRA_FIELDS if body_type == BODY_TYPE_TDX15 else ())
    values = {name: reader.bytes(offset + rel, size, f"body.{name}") for name, rel, size in fields}
    return TdReportBody(body_type, values)


@dataclass(frozen=True, slots=True)
class QeReport:
    """The quoting enclave's SGX report body (384 bytes), the PCK key's signature over it."""

    raw: bytes
    cpusvn: bytes
    miscselect: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpusvn": self.cpusvn.hex(),
            "miscselect": f"{self.miscselect:#x}",
            "attributes": self.attributes.hex(),
            "mr_enclave": self.mr_enclave.hex(),
            "mr_signer": self.mr_signer.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "report_data": self.report_data.hex(),
        }


def _parse_qe_report(reader: FieldReader, offset: int) -> QeReport:
    qe = reader.sub(offset, QE_REPORT_SIZE, "qe_report", "TDX quote QE report")
    return QeReport(
        raw=qe.data,
        cpusvn=qe.bytes(0, 16, "cpusvn"),
        miscselect=qe.u32(16, "miscselect"),
        attributes=qe.bytes(48, 16, "attributes"),
        mr_enclave=qe.bytes(64, 32, "mrenclave"),
        mr_signer=qe.bytes(128, 32, "mrsigner"),
        isv_prod_id=qe.u16(256, "isvprodid"),
        isv_svn=qe.u16(258, "isvsvn"),
        report_data=qe.bytes(320, 64, "reportdata"),
    )


@dataclass(frozen=True, slots=True)
class TdxQuote:
    """A parsed TDX quote. ``signed_bytes`` is what the attestation key signed."""

    raw: bytes
    version: int
    attestation_key_type: int
    tee_type: int
    header_reserved: bytes
    qe_vendor_id: bytes
    user_data: bytes
    body: TdReportBody
    body_size: int
    signed_bytes: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    used_bytes: int

    @property
    def trailing_bytes(self) -> int:
        """Bytes after the quote's last field (padding, or junk appended to the file)."""
        return len(self.raw) - self.used_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "tdx-quote",
            "version": self.version,
            "attestation_key_type": self.attestation_key_type,
            "tee_type": f"{self.tee_type:#x}",
            "qe_vendor_id": self.qe_vendor_id.hex(),
            "user_data": self.user_data.hex(),
            "body_type": self.body.body_type,
            "body_size": self.body_size,
            "body": self.body.to_dict(),
            "signed_bytes": f"0..{len(self.signed_bytes):#x}",
            "signature": self.signature.hex(),
            "attestation_key": self.attestation_key.hex(),
            "qe_report": self.qe_report.to_dict(),
            "qe_report_signature": self.qe_report_signature.hex(),
            "qe_auth_data": self.qe_auth_data.hex(),
            "pck_chain_bytes": len(self.pck_chain_pem),
            "used_bytes": self.used_bytes,
            "trailing_bytes": self.trailing_bytes,
        }


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Decode a TDX quote (v4, or v5 with body type 2 or 3).

    Only ECDSA-P256 attestation keys and certification data type 6 wrapping a type-5 PCK
    chain are accepted: that is what every TDX quoting enclave produces. Anything else is a
    :class:`MalformedEvidence` naming the field.
    """
    reader = FieldReader(data, "TDX quote")
    version = reader.u16(0, "version")
    if version not in (4, 5):
        raise reader.invalid(0, "version", f"is {version}; TDX quotes are version 4 or 5")
    key_type = reader.u16(2, "att_key_type")
    if key_type != ATTESTATION_KEY_TYPE_ECDSA_P256:
        raise reader.invalid(2, "att_key_type", f"is {key_type}; only 2 (ECDSA P-256) is defined for TDX")
    tee_type = reader.u32(4, "tee_type")
    if tee_type != TEE_TYPE_TDX:
        raise reader.invalid(4, "tee_type", f"is {tee_type:#x}, not 0x81 (TDX); an SGX quote?")
    header_reserved = reader.bytes(8, 4, "reserved")
    qe_vendor_id = reader.bytes(12, 16, "qe_vendor_id")
    user_data = reader.bytes(28, 20, "user_data")

    if version == 4:
        body_type, body_offset = BODY_TYPE_TDX10, QUOTE_HEADER_SIZE
        body_size = BODY_SIZE[BODY_TYPE_TDX10]
    else:
        body_type = reader.u16(48, "body_type")
        if body_type not in BODY_SIZE:
            raise reader.invalid(48, "body_type", f"is {body_type}; expected 2 (TDX 1.0) or 3 (TDX 1.5)")
        body_size = reader.u32(50, "body_size")
        if body_size != BODY_SIZE[body_type]:
            raise reader.invalid(
                50, "body_size", f"is {body_size}; body type {body_type} is {BODY_SIZE[body_type]} bytes"
            )
        body_offset = 54
    body = _parse_td_body(reader, body_offset, body_type)
    signed_end = body_offset + body_size

    sig_len_offset = signed_end
    sig_data_len = reader.u32(sig_len_offset, "signature_data_len")
    sig_offset = sig_len_offset + 4
    # Everything below must sit inside signature_data; read it through a window that ends there.
    sig_data = reader.sub(sig_offset, sig_data_len, "signature_data", "TDX quote")
    signature = sig_data.bytes(0, 64, "signature_data.signature")
    attestation_key = sig_data.bytes(64, 64, "signature_data.attestation_key")
    cert_type = sig_data.u16(128, "certification_data.type")
    if cert_type != CERT_DATA_QE_REPORT:
        raise sig_data.invalid(128, "certification_data.type", f"is {cert_type}; expected 6 (QE report)")
    cert_size = sig_data.u32(130, "certification_data.size")
    qe_data = sig_data.sub(134, cert_size, "certification_data", "TDX quote")
    qe_report = _parse_qe_report(qe_data, 0)
    qe_report_signature = qe_data.bytes(QE_REPORT_SIZE, 64, "qe_report_signature")
    auth_size = qe_data.u16(QE_REPORT_SIZE + 64, "qe_auth_data.size")
    auth_offset = QE_REPORT_SIZE + 66
    qe_auth_data = qe_data.bytes(auth_offset, auth_size, "qe_auth_data")
    inner_offset = auth_offset + auth_size
    inner_type = qe_data.u16(inner_offset, "pck_cert_data.type")
    if inner_type != CERT_DATA_PCK_CHAIN:
        raise qe_data.invalid(
            inner_offset, "pck_cert_data.type", f"is {inner_type}; expected 5 (PCK certificate chain)"
        )
    inner_size = qe_data.u32(inner_offset + 2, "pck_cert_data.size")
    pck_chain = qe_data.bytes(inner_offset + 6, inner_size, "pck_cert_data")

    used = sig_offset + sig_data_len
    return TdxQuote(
        raw=bytes(data),
        version=version,
        attestation_key_type=key_type,
        tee_type=tee_type,
        header_reserved=header_reserved,
        qe_vendor_id=qe_vendor_id,
        user_data=user_data,
        body=body,
        body_size=body_size,
        signed_bytes=bytes(data[:signed_end]),
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain_pem=pck_chain.rstrip(b"\x00"),
        used_bytes=used,
    )


# -- TDREPORT ----------------------------------------------------------------------------

_TDREPORT_FIELDS: tuple[tuple[str, int, int], ...] = (
    # REPORTMACSTRUCT (256 bytes at 0)
    ("report_type", 0, 4),
    ("cpusvn", 16, 16),
    ("tee_tcb_info_hash", 32, 48),
    ("tee_info_hash", 80, 48),
    ("report_data", 128, 64),
    ("mac", 224, 32),
    # TEE_TCB_INFO (239 bytes at 256)
    ("tee_tcb_info_valid", 256, 8),
    ("tee_tcb_svn", 264, 16),
    ("mr_seam", 280, 48),
    ("mr_signer_seam", 328, 48),
    ("seam_attributes", 376, 8),
    # TDINFO (512 bytes at 512)
    ("td_attributes", 512, 8),
    ("xfam", 520, 8),
    ("mr_td", 528, 48),
    ("mr_config_id", 576, 48),
    ("mr_owner", 624, 48),
    ("mr_owner_config", 672, 48),
    ("rtmr0", 720, 48),
    ("rtmr1", 768, 48),
    ("rtmr2", 816, 48),
    ("rtmr3", 864, 48),
    ("servtd_hash", 912, 48),
)
TEE_TCB_INFO_RANGE = (256, 256 + 239)
TDINFO_RANGE = (512, 1024)


@dataclass(frozen=True, slots=True)
class TdReport:
    """A TDREPORT_STRUCT (Intel TDX Module ABI spec, TDREPORT_STRUCT; 1024 bytes).

    REPORTMACSTRUCT at 0, TEE_TCB_INFO at 256, TDINFO at 512. ``fields`` maps name -> bytes.
    """

    raw: bytes
    fields: dict[str, bytes]

    @property
    def report_data(self) -> bytes:
        return self.fields["report_data"]

    @property
    def tee_tcb_info(self) -> bytes:
        return self.raw[TEE_TCB_INFO_RANGE[0] : TEE_TCB_INFO_RANGE[1]]

    @property
    def td_info(self) -> bytes:
        return self.raw[TDINFO_RANGE[0] : TDINFO_RANGE[1]]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "tdx-tdreport", **{name: value.hex() for name, value in self.fields.items()}}


def parse_tdreport(data: bytes) -> TdReport:
    """Decode a TDREPORT (1024 bytes; longer input is an error, since nothing can follow it)."""
    reader = FieldReader(data, "TDREPORT")
    fields = {name: reader.bytes(offset, size, name) for name, offset, size in _TDREPORT_FIELDS}
    reader.bytes(960, TDREPORT_SIZE - 960, "tdinfo.reserved")
    if len(data) > TDREPORT_SIZE:
        raise reader.invalid(TDREPORT_SIZE, "end", f"has {len(data) - TDREPORT_SIZE} bytes after the report")
    if fields["report_type"][0] != TEE_TYPE_TDX:
        raise reader.invalid(0, "report_type", f"type byte is {fields['report_type'][0]:#x}, not 0x81 (TDX)")
    return TdReport(bytes(data), fields)
