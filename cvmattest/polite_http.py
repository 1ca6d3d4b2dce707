"""A polite HTTP client for the services that publish attestation collateral, with a cache.

AMD's KDS and Intel's PCS both rate-limit: they answer ``429 Too Many Requests`` (often
with ``Retry-After``) to clients that ask too often, and a busy service answers 5xx.
:class:`PoliteClient` retries those with exponential backoff, waiting exactly what
``Retry-After`` asks when it says (RFC 9110 section 10.2.3: delta-seconds or an HTTP-date),
and refuses to wait longer than ``max_retry_after``: a server asking for more makes the
request fail with its answer instead of hanging. Every other status fails at once.

The cache is a directory of files written with :func:`cvmcore.durable.write_durably`
(readers see the old file or the whole new one). A subclass says what a valid entry is
(``_valid``): a damaged entry is fetched again rather than trusted.
"""

from __future__ import annotations

import email.message
import email.utils
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from cvmcore.durable import write_durably
from cvmcore.errors import ConnectError, RemoteError

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


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
class PoliteClient:
    """GETs from ``base_url`` with retries and backoff; keeps answers under ``cache_dir``.

    ``sleep`` is how backoff waits, so a caller on an event loop can pass its own.
    """

    base_url: str = ""
    cache_dir: Path | None = None
    timeout: float = 10.0
    max_attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 30.0
    max_retry_after: float = 300.0
    sleep: Callable[[float], None] = time.sleep
    requests_made: int = field(default=0, init=False)

    SERVICE: ClassVar[str] = "the server"

    def _error(self, message: str, status: int | None) -> RemoteError:
        """The error for an answer that is not the document (subclasses name their service)."""
        return RemoteError(message)

    def _get(self, path: str, accept: str) -> tuple[bytes, email.message.Message]:
        """The body and headers of ``base_url + path`` (``path`` may be a whole URL)."""
        url = path if "://" in path else self.base_url.rstrip("/") + path
        backoff = self.initial_backoff
        service = self.SERVICE
        for attempt in range(1, self.max_attempts + 1):
            request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "cvmctl"})
            self.requests_made += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body: bytes = response.read()
                    return body, response.headers
            except urllib.error.HTTPError as exc:
                status = exc.code
                retry_after = retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
                exc.close()
                if status not in RETRYABLE_STATUS:
                    raise self._error(f"{service} answered {status} {exc.reason} for {url}", status) from exc
                if attempt == self.max_attempts:
                    message = f"{service} answered {status} {exc.reason} for {url} {attempt} times; giving up"
                    raise self._error(message, status) from exc
                if retry_after is not None and retry_after > self.max_retry_after:
                    raise self._error(
                        f"{service} answered {status} and asks to retry after {retry_after:.0f} s (more than "
                        f"{self.max_retry_after:.0f} s): try again later",
                        status,
                    ) from exc
                wait = retry_after if retry_after is not None else backoff
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt == self.max_attempts:
                    raise ConnectError(f"cannot reach {service} at {url}: {reason}") from exc
                wait = backoff
            self.sleep(wait)
            backoff = min(backoff * 2, self.max_backoff)
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt

    # -- cache --------------------------------------------------------------------------

    @staticmethod
    def _valid(data: bytes, source: str) -> bool:
        """Whether a cached file is usable (subclasses check it parses)."""
        return True

    def _cache_file(self, *parts: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir.joinpath(*parts)

    def _read_cache(self, path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data if self._valid(data, str(path)) else None

    @staticmethod
    def _write_cache(path: Path | None, data: bytes) -> None:
        if path is None:
            return
        write_durably(path, data, mode=0o644)
