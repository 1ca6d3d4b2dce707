"""Intel Provisioning Certification Service (PCS) client: a TDX quote's collateral, cached.

The collateral :mod:`cvmattest.intel_tcb` evaluates comes from four requests (Intel PCS
API v4, "Get TDX TCB Info", "Get TDX QE Identity", "Get PCK Cert CRL"; the Root CA CRL
from the distribution point in Intel's SGX Root CA certificate)::

    GET {base}/tdx/certification/v4/tcb?fmspc={FMSPC hex}
        body    {"tcbInfo": {...}, "signature": "<r||s hex>"}
        header  TCB-Info-Issuer-Chain: URL-encoded PEM, TCB Signing then Root CA
    GET {base}/tdx/certification/v4/qe/identity
        body    {"enclaveIdentity": {...}, "signature": "<r||s hex>"}
        header  SGX-Enclave-Identity-Issuer-Chain
    GET {base}/sgx/certification/v4/pckcrl?ca={platform|processor}&encoding=der
        body    the CRL, DER;  header SGX-PCK-CRL-Issuer-Chain
    GET https://certificates.trustedservices.intel.com/IntelSGXRootCA.der
        body    the Root CA CRL, DER

The signatures cover the exact bytes of the ``tcbInfo`` / ``enclaveIdentity`` value as the
body carries it, so that text is cut out of the body, never re-serialised.

The four answers are stored together as one JSON file in dcap-qvl's ``QuoteCollateralV3``
layout (the same file ``cvmctl attest verify --collateral`` reads), under
``{cache}/tdx/{fmspc}-{ca}.json``. Unlike a VCEK, collateral expires: a cached file is used
only while every document in it is current at the verification time, and fetched again
after that. Retries, backoff and ``Retry-After`` are :class:`~cvmattest.polite_http.PoliteClient`'s.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from cvmattest.intel_tcb import Collateral, CollateralError, parse_collateral
from cvmattest.polite_http import PoliteClient
from cvmcore.errors import RemoteError, UsageError

DEFAULT_PCS_URL = "https://api.trustedservices.intel.com"
ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
QE_IDENTITY_PATH = "/tdx/certification/v4/qe/identity"
PCK_CA_NAMES = {"Intel SGX PCK Platform CA": "platform", "Intel SGX PCK Processor CA": "processor"}
"""The ``ca`` parameter of the PCK CRL request, by the common name of the PCK's issuer."""


class PcsError(RemoteError):
    """PCS answered, but not with the document (404 for an unknown FMSPC, or it kept refusing)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def signed_member(body: bytes, key: str) -> tuple[str, str]:
    """The exact text of ``body``'s member ``key`` (a JSON object) and its ``signature``.

    The text is cut out where the parser found it, so it is byte for byte what was signed.
    """
    try:
        text = body.decode()
        document = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CollateralError(f"PCS answer for {key}: not JSON: {str(exc)[:80]}") from None
    if not isinstance(document, dict) or not isinstance(document.get(key), dict):
        raise CollateralError(f"PCS answer has no {key!r} object")
    signature = document.get("signature")
    if not isinstance(signature, str):
        raise CollateralError(f"PCS answer for {key} has no signature")
    decoder = json.JSONDecoder()
    needle = json.dumps(key)
    position = 0
    while (index := text.find(needle, position)) >= 0:
        position = index + 1
        colon = _skip_space(text, index + len(needle))
        if not text.startswith(":", colon):
            continue
        start = _skip_space(text, colon + 1)
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if value == document[key]:
            return text[start:end], signature
    raise CollateralError(f"PCS answer: the {key!r} text could not be located")


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


@dataclass
class PcsClient(PoliteClient):
    """Fetches TDX collateral from PCS (or anything serving its URL layout at ``base_url``)."""

    base_url: str = DEFAULT_PCS_URL
    root_ca_crl_url: str = ROOT_CA_CRL_URL
    SERVICE: ClassVar[str] = "Intel PCS"

    def _error(self, message: str, status: int | None) -> RemoteError:
        return PcsError(message, status)

    @staticmethod
    def _valid(data: bytes, source: str) -> bool:
        try:
            parse_collateral(data)
        except CollateralError:
            return False
        return True

    def collateral(self, fmspc: bytes, ca: str, at: datetime) -> bytes:
        """The collateral JSON for a platform type and PCK CA, current at ``at`` (cached)."""
        if ca not in PCK_CA_NAMES.values():
            raise UsageError(f"the PCK CA is {ca!r}; PCS knows 'platform' and 'processor'")
        cache = self._cache_file("tdx", f"{fmspc.hex()}-{ca}.json")
        cached = self._read_cache(cache)
        if cached is not None and current_at(parse_collateral(cached), at):
            return cached
        tcb_body, tcb_headers = self._get(
            f"/tdx/certification/v4/tcb?fmspc={fmspc.hex()}", "application/json"
        )
        qe_body, qe_headers = self._get("/tdx/certification/v4/qe/identity", "application/json")
        crl, crl_headers = self._get(
            f"/sgx/certification/v4/pckcrl?ca={ca}&encoding=der", "application/pkix-crl"
        )
        root_crl, _ = self._get(self.root_ca_crl_url, "application/pkix-crl")
        tcb_info, tcb_signature = signed_member(tcb_body, "tcbInfo")
        qe_identity, qe_signature = signed_member(qe_body, "enclaveIdentity")
        document: dict[str, Any] = {
            "pck_crl_issuer_chain": _header_chain(crl_headers.get("SGX-PCK-CRL-Issuer-Chain")),
            "root_ca_crl": root_crl.hex(),
            "pck_crl": crl.hex(),
            "tcb_info_issuer_chain": _header_chain(tcb_headers.get("TCB-Info-Issuer-Chain")),
            "tcb_info": tcb_info,
            "tcb_info_signature": tcb_signature,
            "qe_identity_issuer_chain": _header_chain(qe_headers.get("SGX-Enclave-Identity-Issuer-Chain")),
            "qe_identity": qe_identity,
            "qe_identity_signature": qe_signature,
        }
        data = json.dumps(document).encode()
        parse_collateral(data)  # never cache what would not parse
        self._write_cache(cache, data)
        return data


def tcb_info_path(fmspc: bytes) -> str:
    return f"/tdx/certification/v4/tcb?fmspc={fmspc.hex()}"


def pck_crl_path(ca: str) -> str:
    return f"/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"


def _header_chain(value: str | None) -> str:
    if not value:
        raise CollateralError("PCS answer has no issuer chain header")
    return urllib.parse.unquote(value)


def current_at(collateral: Collateral, at: datetime) -> bool:
    """Whether every document of ``collateral`` is still current at ``at``."""
    deadlines = [collateral.tcb_info.next_update, collateral.qe_identity.next_update]
    for crl in (collateral.pck_crl, collateral.root_ca_crl):
        if crl is not None and crl.next_update_utc is not None:
            deadlines.append(crl.next_update_utc)
    return at <= min(deadlines)
