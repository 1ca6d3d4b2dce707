"""AMD Key Distribution Service (KDS) client: VCEKs and certificate chains, cached, politely.

AMD publishes every chip's VCEK at a URL built from the product, the chip id and the TCB
the report was signed under (AMD publication 57230, *VCEK Certificate and KDS Interface
Specification*, section "KDS Interface")::

    GET {base}/vcek/v1/{Milan|Genoa|Turin}/{hwid hex}?blSPL=B&teeSPL=T&snpSPL=S&ucodeSPL=U[&fmcSPL=F]
        -> the VCEK, DER (application/pkix-cert)
    GET {base}/vcek/v1/{product}/cert_chain   -> ASK then ARK, PEM
    GET {base}/vlek/v1/{product}/cert_chain   -> ASVK then ARK, PEM
    GET {base}/vcek/v1/{product}/crl          -> the ARK's CRL, DER (RSASSA-PSS SHA-384)

On Turin the hwid is the first 8 bytes of chip_id and ``fmcSPL`` is required; the SPLs are
those of the report's ``reported_tcb``. VLEKs are not published (the cloud provider
installs them), so only their chain can be fetched.

KDS rate-limits: it answers ``429 Too Many Requests`` (with ``Retry-After``) to clients
that ask too often, and a busy service answers 5xx. :class:`KdsClient` retries those with
exponential backoff, waiting exactly what ``Retry-After`` asks when it says, and keeps every
certificate it got in an on-disk cache keyed by (product, chip id, reported TCB) - a VCEK
never changes for that key, so the cache needs no expiry and a fleet of reports from one
host costs one request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from cvmattest.certs import CertificateError, load_certificate, load_certificates, load_crl
from cvmattest.polite_http import RETRYABLE_STATUS, PoliteClient, retry_after_seconds
from cvmattest.snp import Product, SnpReport, TcbVersion
from cvmcore.errors import RemoteError, UsageError

DEFAULT_KDS_URL = "https://kdsintf.amd.com"
__all__ = ["RETRYABLE_STATUS", "KdsClient", "KdsError", "retry_after_seconds"]


class KdsError(RemoteError):
    """KDS answered, but not with a certificate (404 for an unknown chip/TCB, or it kept refusing)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def vcek_path(product: Product, chip_id: bytes, tcb: TcbVersion) -> str:
    """The KDS path and query of a VCEK (without the base URL)."""
    hwid = chip_id[: product.hwid_length]
    if len(hwid) != product.hwid_length:
        raise UsageError(f"a {product.value} chip id is {product.hwid_length} bytes, got {len(hwid)}")
    query = f"blSPL={tcb.bootloader}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    if product is Product.TURIN:
        query += f"&fmcSPL={tcb.fmc}"
    return f"/vcek/v1/{product.value}/{hwid.hex()}?{query}"


def crl_path(product: Product) -> str:
    """The KDS path of AMD's CRL for a product: DER, signed by the product's ARK."""
    return f"/vcek/v1/{product.value}/crl"


def cert_chain_path(product: Product, *, vlek: bool = False) -> str:
    return f"/{'vlek' if vlek else 'vcek'}/v1/{product.value}/cert_chain"


@dataclass
class KdsClient(PoliteClient):
    """Fetches VCEKs and chains from KDS (or anything serving its URL layout at ``base_url``).

    Retries, backoff and the cache are :class:`~cvmattest.polite_http.PoliteClient`'s.
    """

    base_url: str = DEFAULT_KDS_URL
    SERVICE: ClassVar[str] = "KDS"

    def _error(self, message: str, status: int | None) -> RemoteError:
        return KdsError(message, status)

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        """The DER VCEK for a chip at a TCB, from the cache or KDS."""
        hwid = chip_id[: product.hwid_length].hex()
        cache = self._cache_file("vcek", product.value, hwid, f"{tcb.raw:016x}.der")
        cached = self._read_cache(cache)
        if cached is not None:
            return cached
        der = self._get(vcek_path(product, chip_id, tcb), "application/pkix-cert")[0]
        load_certificate(der, "VCEK from KDS")  # never cache something that is not a certificate
        self._write_cache(cache, der)
        return der

    def vcek_for_report(self, report: SnpReport, product: Product | None = None) -> bytes:
        """The VCEK that should have signed ``report`` (``product`` is needed for a v2 report)."""
        product = report.product or product
        if product is None:
            raise UsageError("a version-2 report does not name its product: say Milan or Genoa")
        if report.key_info.mask_chip_key or report.chip_id == bytes(64):
            raise UsageError("the report's chip_id is masked (zero): KDS cannot look its VCEK up")
        return self.vcek(product, report.chip_id, report.reported_tcb)

    def cert_chain(self, product: Product, *, vlek: bool = False) -> bytes:
        """The PEM ASK (or ASVK) + ARK chain of a product."""
        cache = self._cache_file("cert_chain", f"{product.value}-{'vlek' if vlek else 'vcek'}.pem")
        cached = self._read_cache(cache)
        if cached is not None:
            return cached
        pem = self._get(cert_chain_path(product, vlek=vlek), "application/x-pem-file")[0]
        load_certificates(pem, "cert_chain from KDS")
        self._write_cache(cache, pem)
        return pem

    def crl(self, product: Product, at: datetime) -> bytes:
        """AMD's CRL for a product (DER), from the cache while it is current at ``at``, else KDS."""
        cache = self._cache_file("crl", f"{product.value}.der")
        cached = self._read_cache(cache)
        if cached is not None:
            crl = load_crl(cached, str(cache))
            if crl.next_update_utc is not None and crl.last_update_utc <= at <= crl.next_update_utc:
                return cached
        der = self._get(crl_path(product), "application/pkix-crl")[0]
        load_crl(der, "CRL from KDS")  # never cache something that is not a CRL
        self._write_cache(cache, der)
        return der

    @staticmethod
    def _valid(data: bytes, source: str) -> bool:
        try:
            if source.endswith(".der") and "/crl/" in source:
                load_crl(data, source)
            else:
                load_certificates(data, source)
        except CertificateError:
            return False  # a damaged cache entry is fetched again
        return True
