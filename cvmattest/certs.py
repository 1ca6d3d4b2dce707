"""Certificates for attestation: loading them, AMD's extensions, and the pinned trust anchors.

**Serial number 0.** Every AMD VCEK and VLEK has serial number 0, which RFC 5280 forbids.
``cryptography`` (>= 43) loads such a certificate but emits a
``CryptographyDeprecationWarning`` and says a later release will refuse it. We load AMD
certificates on purpose and know about the defect, so :func:`load_certificate` silences
exactly that warning (matched by category *and* message) and nothing else. Should a future
``cryptography`` refuse to load them, :func:`load_certificate` raises
:class:`CertificateError` saying so rather than a bare ``ValueError``.

**AMD certificate chain** (AMD publication 57230, *Versioned Chip Endorsement Key (VCEK)
Certificate and KDS Interface Specification*): ARK (AMD Root Key, self-signed) -> ASK (AMD
SEV Key) -> VCEK, or ARK -> ASVK (AMD SEV VLEK Key) -> VLEK. Every link is RSASSA-PSS with
SHA-384, MGF1-SHA-384 and a 48-byte salt. The VCEK/VLEK carries AMD extensions under
``1.3.6.1.4.1.3704.1``: ``.1`` structVersion, ``.2`` productName (IA5String such as
"Milan-B0"), ``.3.1`` blSPL, ``.3.2`` teeSPL, ``.3.3`` snpSPL, ``.3.8`` ucodeSPL, ``.3.9``
fmcSPL (Turin) as DER INTEGERs, and ``.4`` hwID, the raw chip id bytes (64, or 8 on Turin).

**Pinned anchors** live in ``trust/`` beside this module: AMD's ARKs for Milan, Genoa and
Turin, their ASKs and the Milan ASVK (public certificates; intermediates are still checked
against the ARK every time) and Intel's SGX Root CA.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.utils import CryptographyDeprecationWarning

from cvmattest.binary import MalformedEvidence
from cvmattest.snp import Product, parse_cert_table
from cvmcore.errors import UsageError

AMD_OID_PREFIX = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = x509.ObjectIdentifier(f"{AMD_OID_PREFIX}.1")
OID_PRODUCT_NAME = x509.ObjectIdentifier(f"{AMD_OID_PREFIX}.2")
OID_HWID = x509.ObjectIdentifier(f"{AMD_OID_PREFIX}.4")
OID_CSP_ID = x509.ObjectIdentifier(f"{AMD_OID_PREFIX}.5")
AMD_TCB_OIDS: dict[str, x509.ObjectIdentifier] = {
    "bootloader": x509.ObjectIdentifier(f"{AMD_OID_PREFIX}.3.1"),
    "tee": x509.ObjectIdentifier(f"{AMD_OID_PREFIX}.3.2"),
    "snp": x509.ObjectIdentifier(f"{AMD_OID_PREFIX}.3.3"),
    "microcode": x509.ObjectIdentifier(f"{AMD_OID_PREFIX}.3.8"),
    "fmc": x509.ObjectIdentifier(f"{AMD_OID_PREFIX}.3.9"),
}

_SERIAL_WARNING = r"Parsed a serial number which wasn't positive"


class CertificateError(UsageError):
    """A certificate that cannot be read (not PEM, not DER, or refused by the library)."""


#: What cryptography raises for a malformed certificate, at load or (it parses lazily) when
#: a field is first read: ValueError for ASN.1 errors, InvalidVersion for a version field
#: that is not v1-v3, DuplicateExtension for an extension listed twice, TypeError for a
#: name attribute of the wrong string type (all found by benchmarks/fuzz.py).
_MALFORMED = (ValueError, TypeError, x509.InvalidVersion, x509.DuplicateExtension)


def load_certificate(data: bytes, source: str = "certificate") -> x509.Certificate:
    """Load one certificate from DER or PEM; AMD's serial-0 warning is expected and silenced.

    The fields every caller reads (subject, issuer, extensions) are parsed here, so that a
    malformed certificate is a :class:`CertificateError` at load and never an undocumented
    exception later, wherever it is first read.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING, category=CryptographyDeprecationWarning)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
            cert.subject, cert.issuer, cert.extensions  # noqa: B018 (parsed now, not on first use)
        except _MALFORMED as exc:
            hint = " (AMD certificates have serial number 0, which this cryptography may refuse)"
            raise CertificateError(
                f"{source}: not a certificate: {exc}{hint if 'serial' in str(exc) else ''}"
            ) from exc
    return cert


def load_certificates(data: bytes, source: str = "certificate file") -> list[x509.Certificate]:
    """Load every certificate in ``data``: a PEM bundle (any number) or a single DER certificate."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return [load_certificate(data, source)]
    certs = []
    for index, block in enumerate(data.split(b"-----BEGIN CERTIFICATE-----")[1:]):
        end = block.find(b"-----END CERTIFICATE-----")
        if end < 0:
            raise CertificateError(f"{source}: PEM certificate #{index + 1} has no END line")
        pem = b"-----BEGIN CERTIFICATE-----" + block[: end + len(b"-----END CERTIFICATE-----")] + b"\n"
        certs.append(load_certificate(pem, f"{source} (certificate #{index + 1})"))
    return certs


def load_certificate_file(data: bytes, source: str) -> list[x509.Certificate]:
    """Certificates from a file: a PEM bundle, one DER certificate, or an SNP certificate table.

    The certificate table is what configfs-tsm's ``auxblob`` and ``SNP_GET_EXT_REPORT`` give.
    """
    if b"-----BEGIN" in data:
        return load_certificates(data, source)
    try:
        return [load_certificate(data, source)]
    except CertificateError as not_der:
        try:
            entries = parse_cert_table(data)
        except MalformedEvidence:
            raise not_der from None
        if not entries:
            raise CertificateError(f"{source}: an empty SNP certificate table") from None
        return [load_certificate(e.data, f"{source} ({e.kind} entry)") for e in entries]


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _extension_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _der_integer(data: bytes) -> int | None:
    """The value of a short DER INTEGER (tag 0x02, definite short length), else ``None``."""
    if len(data) < 3 or data[0] != 0x02 or data[1] != len(data) - 2:
        return None
    return int.from_bytes(data[2:], "big", signed=True)


def _der_ia5string(data: bytes) -> str | None:
    if len(data) < 2 or data[0] != 0x16 or data[1] != len(data) - 2:
        return None
    return data[2:].decode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class AmdKeyCertificate:
    """What a VCEK or VLEK certificate says about the chip and TCB it was issued for."""

    certificate: x509.Certificate
    is_vlek: bool
    product_name: str | None
    hwid: bytes | None
    tcb: dict[str, int]

    @property
    def product(self) -> Product | None:
        if self.product_name:
            try:
                return Product.from_name(self.product_name)
            except ValueError:
                return None
        issuer = self.certificate.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = str(issuer[0].value) if issuer else ""
        for product in Product:
            if name.endswith(product.value):
                return product
        return None


def read_amd_key_certificate(cert: x509.Certificate) -> AmdKeyCertificate:
    """Decode the AMD extensions of a VCEK or VLEK (absent ones become ``None`` / missing keys)."""
    tcb = {}
    for name, oid in AMD_TCB_OIDS.items():
        raw = _extension_bytes(cert, oid)
        value = _der_integer(raw) if raw is not None else None
        if value is not None:
            tcb[name] = value
    product_raw = _extension_bytes(cert, OID_PRODUCT_NAME)
    return AmdKeyCertificate(
        certificate=cert,
        is_vlek=common_name(cert) == "SEV-VLEK",
        product_name=_der_ia5string(product_raw) if product_raw is not None else None,
        hwid=_extension_bytes(cert, OID_HWID),
        tcb=tcb,
    )


def verify_amd_signature(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """Check that ``issuer`` signed ``cert`` the AMD way (RSASSA-PSS, SHA-384, salt 48).

    Returns ``None`` when it did, else why not (one line).
    """
    if cert.issuer != issuer.subject:
        return f"issuer name {cert.issuer.rfc4514_string()!r} is not {issuer.subject.rfc4514_string()!r}"
    if _amd_pss_verifies(issuer, cert.signature, cert.tbs_certificate_bytes):
        return None
    return f"RSASSA-PSS signature by {common_name(issuer)} does not verify"


def _amd_pss_verifies(signer: x509.Certificate, signature: bytes, signed: bytes) -> bool:
    """Whether ``signer``'s RSA key made ``signature`` over ``signed`` with AMD's PSS parameters."""
    key = signer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        key.verify(
            signature, signed, padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48), hashes.SHA384()
        )
    except InvalidSignature:
        return False
    return True


def load_crl(data: bytes, source: str = "CRL") -> x509.CertificateRevocationList:
    """Load an X.509 CRL from DER or PEM (AMD's KDS serves DER)."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CertificateError(f"{source}: not an X.509 CRL: {exc}") from exc


def amd_crl_problem(crl: x509.CertificateRevocationList, ark: x509.Certificate, at: datetime) -> str | None:
    """``None`` if the ARK signed ``crl`` (RSASSA-PSS, SHA-384, salt 48) and it is current at ``at``."""
    if crl.issuer != ark.subject:
        return f"the CRL is issued by {crl.issuer.rfc4514_string()!r}, not by {common_name(ark)}"
    if not _amd_pss_verifies(ark, crl.signature, crl.tbs_certlist_bytes):
        return f"the CRL's RSASSA-PSS signature does not verify with {common_name(ark)}"
    if at < crl.last_update_utc:
        return f"the CRL was issued {crl.last_update_utc.isoformat()}, after {at.isoformat()}"
    if crl.next_update_utc is not None and at > crl.next_update_utc:
        return f"the CRL expired {crl.next_update_utc.isoformat()}: get a current one"
    return None


def revoked_by(crl: x509.CertificateRevocationList, certs: Sequence[x509.Certificate]) -> list[str]:
    """Each certificate of ``certs`` that ``crl`` lists (matched by issuer and serial), said in words."""
    found = []
    for cert in certs:
        if cert.issuer != crl.issuer:
            continue
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            found.append(
                f"{common_name(cert)} (serial {cert.serial_number:x}) was revoked "
                f"{entry.revocation_date_utc.isoformat()}"
            )
    return found


def verify_x509_signature(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """Check that ``issuer`` signed ``cert`` with the algorithm ``cert`` names (Intel: ECDSA)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return f"the signature by {common_name(issuer)} does not verify"
    except (ValueError, TypeError) as exc:  # issuer name mismatch, unsupported algorithm
        return f"{common_name(cert)} is not issued by {common_name(issuer)}: {exc}"
    return None


def validity_problem(cert: x509.Certificate, at: datetime) -> str | None:
    """``None`` if ``at`` lies in the certificate's validity period, else how it misses."""
    if at < cert.not_valid_before_utc:
        return f"{common_name(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}"
    if at > cert.not_valid_after_utc:
        return f"{common_name(cert)} expired {cert.not_valid_after_utc.isoformat()}"
    return None


def same_certificate(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.fingerprint(hashes.SHA256()) == b.fingerprint(hashes.SHA256())


# -- pinned trust ------------------------------------------------------------------------


def _trust_file(name: str) -> bytes:
    return resources.files("cvmattest").joinpath("trust", name).read_bytes()


@functools.cache
def amd_ark(product: Product) -> x509.Certificate:
    """AMD's root key certificate for a product (pinned in the package)."""
    return load_certificate(
        _trust_file(f"amd_ark_{product.value.lower()}.pem"), f"pinned ARK-{product.value}"
    )


@functools.cache
def amd_intermediate(product: Product, vlek: bool) -> x509.Certificate | None:
    """The pinned ASK (or, for ``vlek``, ASVK) of a product, if the package carries it."""
    name = f"amd_{'asvk' if vlek else 'ask'}_{product.value.lower()}.pem"
    try:
        data = _trust_file(name)
    except FileNotFoundError:
        return None
    return load_certificate(data, f"pinned {name}")


@functools.cache
def intel_sgx_root_ca() -> x509.Certificate:
    """Intel's SGX Root CA (pinned in the package); every PCK chain must end at it."""
    return load_certificate(_trust_file("intel_sgx_root_ca.pem"), "pinned Intel SGX Root CA")


def classify_amd_certificates(
    certs: Sequence[x509.Certificate],
) -> tuple[list[x509.Certificate], list[x509.Certificate], list[x509.Certificate]]:
    """Split certificates into (VCEK/VLEK leaves, ASK/ASVK intermediates, ARKs) by common name."""
    leaves, intermediates, roots = [], [], []
    for cert in certs:
        name = common_name(cert)
        if name in ("SEV-VCEK", "SEV-VLEK"):
            leaves.append(cert)
        elif name.startswith("ARK-"):
            roots.append(cert)
        elif name.startswith("SEV-"):
            intermediates.append(cert)
    return leaves, intermediates, roots
