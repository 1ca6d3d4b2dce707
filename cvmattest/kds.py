"""AMD Key Distribution Service (KDS) client: VCEKs and certificate chains, cached, politely.

AMD publishes every chip's VCEK at a URL built from the product, the chip id and the TCB
the report was signed under (AMD publication 57230, *VCEK Certificate and KDS Interface
Specification*, section "KDS Interface")::

    GET {base}/vcek/v1/{Milan|Genoa|Turin}/{hwid hex}?blSPL=B&teeSPL=T&snpSPL=S&ucodeSPL=U[&fmcSPL=F]
        -> the VCEK, DER (application/pkix-cert)
    GET {base}/vcek/v1/{product}/cert_chain   -> ASK then ARK, PEM
    GET {base}/vlek/v1/{product}/cert_chain   -> ASVK then ARK, PEM

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

import email.utils
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cvmattest.certs import CertificateError, load_certificate, load_certificates
from cvmattest.snp import Product, SnpReport, TcbVersion
from cvmcore.durable import write_durably
from cvmcore.errors import ConnectError, RemoteError, UsageError

DEFAULT_KDS_URL = "https://kdsintf.amd.com"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


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


def cert_chain_path(product: Product, *, vlek: bool = False) -> str:
    return f"/{'vlek' if vlek else 'vcek'}/v1/{product.value}/cert_chain"


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass
class KdsClient:
    """Fetches VCEKs and chains from KDS (or anything serving its URL layout at ``base_url``).

    ``cache_dir`` (optional) keeps what was fetched; ``sleep`` is how backoff waits, so a
    caller on an event loop can pass its own. ``max_retry_after`` caps how long one wait may
    be: a server asking for longer makes the request fail with its answer, not hang.
    """

    base_url: str = DEFAULT_KDS_URL
    cache_dir: Path | None = None
    timeout: float = 10.0
    max_attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 30.0
    max_retry_after: float = 300.0
    sleep: Callable[[float], None] = time.sleep
    requests_made: int = field(default=0, init=False)

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        """The DER VCEK for a chip at a TCB, from the cache or KDS."""
        hwid = chip_id[: product.hwid_length].hex()
        cache = self._cache_file("vcek", product.value, hwid, f"{tcb.raw:016x}.der")
        cached = self._read_cache(cache)
        if cached is not None:
            return cached
        der = self._get(vcek_path(product, chip_id, tcb), "application/pkix-cert")
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
        pem = self._get(cert_chain_path(product, vlek=vlek), "application/x-pem-file")
        load_certificates(pem, "cert_chain from KDS")
        self._write_cache(cache, pem)
        return pem

    # -- HTTP ---------------------------------------------------------------------------

    def _get(self, path: str, accept: str) -> bytes:
        url = self.base_url.rstrip("/") + path
        backoff = self.initial_backoff
        for attempt in range(1, self.max_attempts + 1):
            request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "cvmctl"})
            self.requests_made += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body: bytes = response.read()
                    return body
            except urllib.error.HTTPError as exc:
                status = exc.code
                retry_after = retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
                exc.close()
                if status not in RETRYABLE_STATUS:
                    raise KdsError(f"KDS answered {status} {exc.reason} for {url}", status) from exc
                if attempt == self.max_attempts:
                    raise KdsError(
                        f"KDS answered {status} {exc.reason} for {url} {attempt} times; giving up", status
                    ) from exc
                if retry_after is not None and retry_after > self.max_retry_after:
                    raise KdsError(
                        f"KDS answered {status} and asks to retry after {retry_after:.0f} s (more than "
                        f"{self.max_retry_after:.0f} s): try again later",
                        status,
                    ) from exc
                wait = retry_after if retry_after is not None else backoff
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt == self.max_attempts:
                    raise ConnectError(f"cannot reach KDS at {self.base_url}: {reason}") from exc
                wait = backoff
            self.sleep(wait)
            backoff = min(backoff * 2, self.max_backoff)
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt

    # -- cache --------------------------------------------------------------------------

    def _cache_file(self, *parts: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir.joinpath(*parts)

    @staticmethod
    def _read_cache(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            load_certificates(data, str(path))
        except CertificateError:
            return None  # a damaged cache entry is fetched again
        return data

    @staticmethod
    def _write_cache(path: Path | None, data: bytes) -> None:
        if path is None:
            return
        write_durably(path, data, mode=0o644)  # readers see the old file or the whole new one
