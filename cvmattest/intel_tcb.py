"""Intel's collateral for a TDX quote, and the TCB status it gives the platform.

A genuine quote proves only that *some* Intel platform made it. Whether that platform is
patched is told by **collateral** that Intel's Provisioning Certification Service (PCS)
publishes and signs:

``TCB Info`` (``GET /tdx/certification/v4/tcb?fmspc=...``, version 3, id ``TDX``)
    For one FMSPC (the platform type named in the PCK certificate), a list of TCB levels,
    newest first. Each level gives 16 SGX component SVNs, a PCESVN and 16 TDX component
    SVNs, with a status (``UpToDate``, ``SWHardeningNeeded``, ``ConfigurationNeeded``,
    ``ConfigurationAndSWHardeningNeeded``, ``OutOfDate``, ``OutOfDateConfigurationNeeded``,
    ``Revoked``) and the advisories (``INTEL-SA-...``) the platform is exposed to at that
    level. ``tdxModuleIdentities`` give per TDX module major version (``TDX_01``...) the
    module's signer and its own SVN levels.
``QE Identity`` (``GET /tdx/certification/v4/qe/identity``, version 2, id ``TD_QE``)
    What the TD quoting enclave must be (MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES
    under masks) and its ISVSVN levels.
``PCK CRL`` (``GET /sgx/certification/v4/pckcrl?ca=platform|processor``) and the **Root CA
CRL** (from the Root CA certificate's distribution point)
    Revoked PCK certificates and revoked intermediate CAs.

Both JSON documents are signed (ECDSA P-256 over the exact bytes of the JSON object, r||s
in hex) by the *Intel SGX TCB Signing* certificate, which the Root CA issues; the CRLs are
X.509 CRLs signed by the CA that issued what they revoke.

The **matching algorithm** is the one of Intel's Quote Verification Library
(``TcbLevelCheck.cpp``, ``TdxModuleCheck.cpp``), which dcap-qvl follows:

1. The SGX TCB level is the first level whose 16 SGX components are each <= the PCK
   certificate's (its SGX Extensions TCB) and whose PCESVN is <= the PCK's. None: the TCB
   is not supported (rejected).
2. Among the levels from there on, the TDX TCB level is the first whose TDX components are
   each <= the quote's TEE_TCB_SVN; bytes 0 and 1 (the module SVN and major version) are
   skipped when the major version is not 0, because the module identity judges them.
3. The TDX module status: major version 0 counts as up to date; otherwise the identity
   ``TDX_%02X`` of that version, whose first level with ISVSVN <= TEE_TCB_SVN[0] gives it.
4. The statuses converge: an out-of-date module or QE turns UpToDate/SWHardeningNeeded into
   OutOfDate and the Configuration ones into OutOfDateConfigurationNeeded; a revoked module
   or QE makes the whole Revoked.

dcap-qvl's own loop compares the SGX components as a whole array (lexicographically);
this module compares each component, as Intel's library does. Intel's TD relaunch advice
for TDX 1.5 bodies (``TDRelaunchCheck``) is not evaluated.

Everything here is pure: bytes and times in, results out. Fetching from PCS with a cache
is :mod:`cvmattest.pcs`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cvmattest import certs as certmod
from cvmattest.sgx_pck import PckPlatform
from cvmattest.tdx import TdxQuote
from cvmcore.errors import UsageError

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
"""Every status a TCB level may carry (Intel PCS TCB Info v3)."""

_OUT_OF_DATE_FOR = {
    "UpToDate": "OutOfDate",
    "SWHardeningNeeded": "OutOfDate",
    "ConfigurationNeeded": "OutOfDateConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded": "OutOfDateConfigurationNeeded",
}
"""What a level's status becomes when the TDX module or the QE is out of date."""


class CollateralError(UsageError):
    """Collateral that is not what Intel publishes: bad JSON, missing fields, wrong types."""


# -- the documents -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcbLevel:
    """One TCB level of a TCB Info: the SVNs a platform needs for ``status``."""

    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...]
    date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IsvLevel:
    """An ISVSVN level of a QE identity or TDX module identity."""

    isvsvn: int
    date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModuleIdentity:
    """A TDX module's signer and attributes (``tdxModule`` or one of ``tdxModuleIdentities``)."""

    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[IsvLevel, ...]


@dataclass(frozen=True, slots=True)
class TcbInfo:
    """A parsed TCB Info; ``signed`` is the exact JSON text its signature covers."""

    signed: bytes
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    evaluation_data_number: int
    tdx_module: ModuleIdentity | None
    module_identities: tuple[ModuleIdentity, ...]
    levels: tuple[TcbLevel, ...]


@dataclass(frozen=True, slots=True)
class QeIdentity:
    """A parsed QE identity (enclave identity v2); ``signed`` as for :class:`TcbInfo`."""

    signed: bytes
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: tuple[IsvLevel, ...]


@dataclass(frozen=True, slots=True)
class Collateral:
    """Everything a TDX quote's TCB evaluation needs, as dcap-qvl's ``QuoteCollateralV3`` holds it."""

    tcb_info: TcbInfo
    tcb_info_signature: bytes
    tcb_info_chain: tuple[x509.Certificate, ...]
    qe_identity: QeIdentity
    qe_identity_signature: bytes
    qe_identity_chain: tuple[x509.Certificate, ...]
    pck_crl: x509.CertificateRevocationList | None
    root_ca_crl: x509.CertificateRevocationList | None


class _Fields:
    """Typed reads from a JSON object, each failure a :class:`CollateralError` naming the path."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise CollateralError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is not ...:
                return default
            raise CollateralError(f"{self.where}: '{key}' is missing")
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CollateralError(f"{self.where}.{key}: {value!r:.60} is not of the expected type")
        return value

    def text(self, key: str, default: Any = ...) -> str:
        value: str = self._get(key, str, default)
        return value

    def integer(self, key: str, default: Any = ...) -> int:
        value: int = self._get(key, int, default)
        if not 0 <= value < 2**32:
            raise CollateralError(f"{self.where}.{key}: {value} is out of range")
        return value

    def array(self, key: str, default: Any = ...) -> list[Any]:
        value: list[Any] = self._get(key, list, default)
        return value

    def obj(self, key: str, default: Any = ...) -> _Fields | None:
        value = self._get(key, dict, default)
        return None if value is None else _Fields(value, f"{self.where}.{key}")

    def hex(self, key: str, size: int | None = None) -> bytes:
        text = self.text(key)
        try:
            value = bytes.fromhex(text)
        except ValueError:
            raise CollateralError(f"{self.where}.{key}: {text!r:.60} is not hex") from None
        if size is not None and len(value) != size:
            raise CollateralError(f"{self.where}.{key}: {len(value)} bytes, expected {size}")
        return value

    def time(self, key: str) -> datetime:
        text = self.text(key)
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise CollateralError(f"{self.where}.{key}: {text!r:.40} is not an ISO-8601 time") from None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _json_object(text: bytes, where: str) -> _Fields:
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CollateralError(f"{where}: not JSON: {str(exc)[:80]}") from None
    return _Fields(data, where)


def _advisories(level: _Fields) -> tuple[str, ...]:
    ids = level.array("advisoryIDs", [])
    if not all(isinstance(i, str) for i in ids):
        raise CollateralError(f"{level.where}.advisoryIDs: not a list of strings")
    return tuple(ids)


def _status(level: _Fields) -> str:
    status = level.text("tcbStatus")
    if status not in TCB_STATUSES:
        raise CollateralError(f"{level.where}.tcbStatus: {status!r:.40} is not a TCB status")
    return status


def _svns(level: _Fields, key: str, required: bool) -> tuple[int, ...]:
    items = level.array(key, ... if required else [])
    if items and len(items) != 16:
        raise CollateralError(f"{level.where}.{key}: {len(items)} components, expected 16")
    svns = []
    for index, item in enumerate(items):
        component = _Fields(item, f"{level.where}.{key}[{index}]")
        svn = component.integer("svn")
        if svn > 255:
            raise CollateralError(f"{component.where}.svn: {svn} does not fit a byte")
        svns.append(svn)
    return tuple(svns)


def _isv_levels(doc: _Fields, key: str = "tcbLevels") -> tuple[IsvLevel, ...]:
    levels = []
    for index, item in enumerate(doc.array(key)):
        level = _Fields(item, f"{doc.where}.{key}[{index}]")
        tcb = level.obj("tcb")
        assert tcb is not None
        isvsvn = tcb.integer("isvsvn")
        levels.append(IsvLevel(isvsvn, level.text("tcbDate"), _status(level), _advisories(level)))
    return tuple(levels)


def _module_identity(doc: _Fields, with_levels: bool) -> ModuleIdentity:
    return ModuleIdentity(
        id=doc.text("id", ""),
        mrsigner=doc.hex("mrsigner", 48),
        attributes=doc.hex("attributes", 8),
        attributes_mask=doc.hex("attributesMask", 8),
        levels=_isv_levels(doc) if with_levels else (),
    )


def parse_tcb_info(signed: bytes) -> TcbInfo:
    """Parse the ``tcbInfo`` JSON object (the signed text, not the PCS envelope around it)."""
    doc = _json_object(signed, "tcbInfo")
    levels = []
    for index, item in enumerate(doc.array("tcbLevels")):
        level = _Fields(item, f"tcbInfo.tcbLevels[{index}]")
        tcb = level.obj("tcb")
        assert tcb is not None
        levels.append(
            TcbLevel(
                sgx_components=_svns(tcb, "sgxtcbcomponents", required=True),
                pcesvn=tcb.integer("pcesvn"),
                tdx_components=_svns(tcb, "tdxtcbcomponents", required=False),
                date=level.text("tcbDate"),
                status=_status(level),
                advisory_ids=_advisories(level),
            )
        )
    module = doc.obj("tdxModule", None)
    identities = [
        _module_identity(_Fields(item, f"tcbInfo.tdxModuleIdentities[{index}]"), with_levels=True)
        for index, item in enumerate(doc.array("tdxModuleIdentities", []))
    ]
    return TcbInfo(
        signed=bytes(signed),
        id=doc.text("id"),
        version=doc.integer("version"),
        issue_date=doc.time("issueDate"),
        next_update=doc.time("nextUpdate"),
        fmspc=doc.hex("fmspc", 6),
        pce_id=doc.hex("pceId", 2),
        evaluation_data_number=doc.integer("tcbEvaluationDataNumber"),
        tdx_module=None if module is None else _module_identity(module, with_levels=False),
        module_identities=tuple(identities),
        levels=tuple(levels),
    )


def parse_qe_identity(signed: bytes) -> QeIdentity:
    """Parse the ``enclaveIdentity`` JSON object (the signed text)."""
    doc = _json_object(signed, "enclaveIdentity")
    miscselect = doc.hex("miscselect", 4)
    miscselect_mask = doc.hex("miscselectMask", 4)
    return QeIdentity(
        signed=bytes(signed),
        id=doc.text("id"),
        version=doc.integer("version"),
        issue_date=doc.time("issueDate"),
        next_update=doc.time("nextUpdate"),
        # The JSON writes these as big-endian hex of the 32-bit value; the report holds a u32.
        miscselect=int.from_bytes(miscselect, "big"),
        miscselect_mask=int.from_bytes(miscselect_mask, "big"),
        attributes=doc.hex("attributes", 16),
        attributes_mask=doc.hex("attributesMask", 16),
        mrsigner=doc.hex("mrsigner", 32),
        isvprodid=doc.integer("isvprodid"),
        levels=_isv_levels(doc),
    )


def _chain(pem: str, where: str) -> tuple[x509.Certificate, ...]:
    try:
        chain = certmod.load_certificates(pem.encode(), where)
    except certmod.CertificateError as exc:
        raise CollateralError(str(exc)) from None
    if not chain:
        raise CollateralError(f"{where}: no certificate")
    return tuple(chain)


def _crl(hex_der: str, where: str) -> x509.CertificateRevocationList | None:
    if not hex_der:
        return None
    text = hex_der.strip()
    try:
        if text.startswith("-----BEGIN"):
            return x509.load_pem_x509_crl(text.encode())
        return x509.load_der_x509_crl(bytes.fromhex(text))
    except ValueError as exc:
        raise CollateralError(f"{where}: not a CRL: {str(exc)[:80]}") from None


def _signature(doc: _Fields, key: str) -> bytes:
    return doc.hex(key, 64)


def parse_collateral(data: bytes) -> Collateral:
    """Collateral in dcap-qvl's ``QuoteCollateralV3`` JSON form (what ``cvmctl`` caches too).

    Keys: ``tcb_info`` and ``qe_identity`` (the signed JSON texts), ``tcb_info_signature``
    and ``qe_identity_signature`` (r||s hex), ``tcb_info_issuer_chain`` and
    ``qe_identity_issuer_chain`` (PEM), ``pck_crl`` and ``root_ca_crl`` (DER in hex, or
    PEM). Other keys are ignored.
    """
    doc = _json_object(data, "collateral")
    return Collateral(
        tcb_info=parse_tcb_info(doc.text("tcb_info").encode()),
        tcb_info_signature=_signature(doc, "tcb_info_signature"),
        tcb_info_chain=_chain(doc.text("tcb_info_issuer_chain"), "collateral.tcb_info_issuer_chain"),
        qe_identity=parse_qe_identity(doc.text("qe_identity").encode()),
        qe_identity_signature=_signature(doc, "qe_identity_signature"),
        qe_identity_chain=_chain(doc.text("qe_identity_issuer_chain"), "collateral.qe_identity_issuer_chain"),
        pck_crl=_crl(doc.text("pck_crl", ""), "collateral.pck_crl"),
        root_ca_crl=_crl(doc.text("root_ca_crl", ""), "collateral.root_ca_crl"),
    )


# -- signatures, dates, revocation ---------------------------------------------------------


def signature_problem(cert: x509.Certificate, signature: bytes, message: bytes) -> str | None:
    """``None`` if ``signature`` (r||s, 32+32 big-endian) over ``message`` verifies with ``cert``."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return f"{certmod.common_name(cert)} does not hold an EC key"
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return f"the ECDSA signature by {certmod.common_name(cert)} does not verify"
    return None


def dates_problem(what: str, issued: datetime, next_update: datetime | None, at: datetime) -> str | None:
    """``None`` if ``at`` lies between ``issued`` and ``next_update``."""
    if at < issued:
        return f"{what} was issued {issued.isoformat()}, after {at.isoformat()}"
    if next_update is not None and at > next_update:
        return f"{what} expired {next_update.isoformat()} (its next update was due then)"
    return None


def crl_problem(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, at: datetime, what: str
) -> str | None:
    """``None`` if ``issuer`` signed ``crl`` and the CRL is current at ``at``."""
    if crl.issuer != issuer.subject:
        return f"{what} is issued by {crl.issuer.rfc4514_string()!r}, not by {certmod.common_name(issuer)!r}"
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return f"{certmod.common_name(issuer)} holds no key that signs CRLs"
    if not crl.is_signature_valid(key):
        return f"{what}'s signature by {certmod.common_name(issuer)} does not verify"
    return dates_problem(what, crl.last_update_utc, crl.next_update_utc, at)


def revoked_in(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> str | None:
    """Why ``cert`` is revoked by ``crl`` (which must be its issuer's), or ``None``."""
    if crl.issuer != cert.issuer:
        return None
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return None
    reason = ""
    with contextlib.suppress(x509.ExtensionNotFound):
        reason = f", reason {entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value}"
    return (
        f"{certmod.common_name(cert)} serial {cert.serial_number:x} is revoked since "
        f"{entry.revocation_date_utc.isoformat()}{reason} (CRL of {crl.issuer.rfc4514_string()})"
    )


# -- evaluation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcbEvaluation:
    """The outcome of matching a platform against TCB Info and QE identity.

    ``status`` is one of :data:`TCB_STATUSES`, or ``None`` when no level matched
    (``problem`` says why: Intel's library calls that TCB_NOT_SUPPORTED).
    """

    status: str | None
    advisory_ids: tuple[str, ...] = ()
    problem: str | None = None
    sgx_level: TcbLevel | None = None
    tdx_level: TcbLevel | None = None
    module_status: str | None = None
    qe_status: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "advisory_ids": list(self.advisory_ids),
            "problem": self.problem,
            "sgx_level": None if self.sgx_level is None else self.sgx_level.date,
            "tdx_level": None if self.tdx_level is None else self.tdx_level.date,
            "tdx_module_status": self.module_status,
            "qe_status": self.qe_status,
        }


def _each_at_least(platform: Sequence[int], level: Sequence[int], start: int = 0) -> bool:
    return all(platform[i] >= level[i] for i in range(start, min(len(platform), len(level))))


def match_sgx_level(levels: Sequence[TcbLevel], components: Sequence[int], pcesvn: int) -> int | None:
    """Index of the first level the PCK's SGX components and PCESVN reach (Intel's rule)."""
    for index, level in enumerate(levels):
        if _each_at_least(components, level.sgx_components) and pcesvn >= level.pcesvn:
            return index
    return None


def match_tdx_level(levels: Sequence[TcbLevel], start: int, tee_tcb_svn: bytes) -> TcbLevel | None:
    """From ``start`` on, the first level whose TDX components ``tee_tcb_svn`` reaches.

    When the module major version (byte 1) is not 0, bytes 0 and 1 are the module identity's
    to judge and are skipped here (Intel's ``isTdxTcbHigherOrEqual``).
    """
    skip = 2 if tee_tcb_svn[1] > 0 else 0
    for level in levels[start:]:
        if level.tdx_components and _each_at_least(tee_tcb_svn, level.tdx_components, skip):
            return level
    return None


def _isv_level(levels: Sequence[IsvLevel], isvsvn: int) -> IsvLevel | None:
    return next((level for level in levels if isvsvn >= level.isvsvn), None)


def _converge(level_status: str, other: str | None) -> str:
    """A level status with a TDX module or QE status folded in (Intel's converge rules)."""
    if other == "OutOfDate":
        return _OUT_OF_DATE_FOR.get(level_status, level_status)
    if other == "Revoked":
        return "Revoked"
    return level_status


def module_identity_for(tcb_info: TcbInfo, tee_tcb_svn: bytes) -> ModuleIdentity | None:
    """The module identity that judges a TDX module of this major version (``None``: unknown)."""
    version = tee_tcb_svn[1]
    if version == 0:
        return tcb_info.tdx_module
    wanted = f"TDX_{version:02X}"
    return next((m for m in tcb_info.module_identities if m.id.upper() == wanted), None)


def qe_identity_problem(identity: QeIdentity, quote: TdxQuote) -> str | None:
    """``None`` if the quote's QE is the enclave the QE identity describes."""
    qe = quote.qe_report
    if qe.mr_signer != identity.mrsigner:
        return f"QE MRSIGNER {qe.mr_signer.hex()[:16]}... is not {identity.mrsigner.hex()[:16]}..."
    if qe.isv_prod_id != identity.isvprodid:
        return f"QE ISVPRODID {qe.isv_prod_id} is not {identity.isvprodid}"
    if qe.miscselect & identity.miscselect_mask != identity.miscselect:
        return (
            f"QE MISCSELECT {qe.miscselect:#x} under mask {identity.miscselect_mask:#x} "
            f"is not {identity.miscselect:#x}"
        )
    masked = bytes(a & m for a, m in zip(qe.attributes, identity.attributes_mask, strict=True))
    if masked != identity.attributes:
        return f"QE ATTRIBUTES {qe.attributes.hex()} under the mask are not {identity.attributes.hex()}"
    return None


def module_problem(module: ModuleIdentity, quote: TdxQuote) -> str | None:
    """``None`` if the TD report's SEAM signer and attributes are the module identity's."""
    body = quote.body.fields
    if body["mr_signer_seam"] != module.mrsigner:
        return f"MRSIGNERSEAM {body['mr_signer_seam'].hex()[:16]}... is not {module.mrsigner.hex()[:16]}..."
    masked = bytes(a & m for a, m in zip(body["seam_attributes"], module.attributes_mask, strict=True))
    if masked != module.attributes:
        seam = body["seam_attributes"].hex()
        return f"SEAMATTRIBUTES {seam} under the mask are not {module.attributes.hex()}"
    return None


def evaluate_tcb(
    tcb_info: TcbInfo, qe_identity: QeIdentity, platform: PckPlatform, quote: TdxQuote
) -> TcbEvaluation:
    """The platform's TCB status per Intel's algorithm (module docstring), with advisory IDs."""
    tee_tcb_svn = quote.body.fields["tee_tcb_svn"]
    sgx_index = match_sgx_level(tcb_info.levels, platform.sgx_tcb_components, platform.pcesvn)
    if sgx_index is None:
        return TcbEvaluation(
            None,
            problem=f"no TCB level of FMSPC {tcb_info.fmspc.hex()} has SGX components <= the PCK's "
            f"{list(platform.sgx_tcb_components)} with PCESVN <= {platform.pcesvn}",
        )
    sgx_level = tcb_info.levels[sgx_index]
    tdx_level = match_tdx_level(tcb_info.levels, sgx_index, tee_tcb_svn)
    if tdx_level is None:
        return TcbEvaluation(
            None,
            sgx_level=sgx_level,
            problem="no TCB level at or below the SGX match has TDX components <= TEE_TCB_SVN "
            + tee_tcb_svn.hex(),
        )
    advisories = list(tdx_level.advisory_ids)
    module_status: str | None = "UpToDate"
    if tee_tcb_svn[1] != 0:
        identity = module_identity_for(tcb_info, tee_tcb_svn)
        if identity is None:
            return TcbEvaluation(
                None,
                sgx_level=sgx_level,
                tdx_level=tdx_level,
                problem=f"the TCB Info has no identity TDX_{tee_tcb_svn[1]:02X} "
                f"for TDX module major version {tee_tcb_svn[1]}",
            )
        module_level = _isv_level(identity.levels, tee_tcb_svn[0])
        if module_level is None:
            return TcbEvaluation(
                None,
                sgx_level=sgx_level,
                tdx_level=tdx_level,
                problem=f"no level of {identity.id} covers TDX module SVN {tee_tcb_svn[0]}",
            )
        module_status = module_level.status
        advisories += module_level.advisory_ids
    status = _converge(tdx_level.status, module_status)
    qe_level = _isv_level(qe_identity.levels, quote.qe_report.isv_svn)
    if qe_level is None:
        return TcbEvaluation(
            None,
            sgx_level=sgx_level,
            tdx_level=tdx_level,
            module_status=module_status,
            problem=f"no level of the QE identity covers QE ISVSVN {quote.qe_report.isv_svn}",
        )
    advisories += qe_level.advisory_ids
    if status != "Revoked":
        status = _converge(status, qe_level.status)
    return TcbEvaluation(
        status,
        advisory_ids=tuple(sorted(set(advisories))),
        sgx_level=sgx_level,
        tdx_level=tdx_level,
        module_status=module_status,
        qe_status=qe_level.status,
    )
