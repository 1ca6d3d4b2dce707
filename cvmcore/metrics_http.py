"""HTTP ``/metrics`` for the guest's Prometheus exposition, served natively by trio.

Why not client_python's ``start_http_server``: its ``serve_forever`` loop wakes twice a
second to poll for shutdown and starts a thread per request, a cost an idle agent pays in
every guest for its whole life (``benchmarks/scrape.py`` measures idle CPU). This server
sleeps in trio's event loop until a connection arrives, and stops by cancellation.

What it speaks: HTTP/1.1 ``GET`` and ``HEAD`` of ``/metrics`` (any query string is
ignored), one request per connection (``Connection: close``), the text exposition format
0.0.4 with its content type, or OpenMetrics and gzip when the scraper asks for them
(:func:`negotiate`). Anything else gets 404 or 405. Requests are bounded: the
request head is at most :data:`MAX_REQUEST_HEAD` bytes and must arrive within
:data:`REQUEST_TIMEOUT_SECONDS`, and the answer must be taken within
:data:`SEND_TIMEOUT_SECONDS`.

Slow clients (slowloris): at most :data:`MAX_CONNECTIONS` connections are open at once, and
when a new one arrives at that limit the *oldest* connection that is waiting on its client
(still sending its request head, or not reading its answer) is dropped to make room
(:class:`ConnectionSlots`). A client that holds hundreds of connections open and silent
therefore only ever displaces its own connections, while a scrape, which sends its request at
once, is answered in milliseconds; refusing newcomers instead (a plain cap) would hand the
server to whoever opened connections first. Only connections whose answer is being rendered
are never dropped; when all are, the newcomer is closed. The open descriptors stay bounded by
the limit, so a flood cannot run the process out of them either.

Scrapes never touch the kernel: the registry's collectors serve snapshots that the trio
refresher keeps fresh (the guest agent's collectors). Rendering the text (a few ms for
a large guest) runs in a worker thread so that the trio loop, which also drives the gRPC
bridge, is never blocked by it.
"""

from __future__ import annotations

import functools
import gzip
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import NamedTuple

import structlog
import trio
from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector, CollectorRegistry

from cvmcore.defaults import AGENT_METRICS_PORT
from cvmcore.errors import UsageError

log = structlog.get_logger("cvmcore.metrics_http")

#: The content type of :func:`render_text` output: the text format 0.0.4 (every name here is a
#: classic Prometheus name, so no UTF-8 escaping is involved). Spelled out rather than taken
#: from client_python, whose ``CONTENT_TYPE_LATEST`` became ``version=1.0.0`` in 0.22.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_SECONDS = 10.0
SEND_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 32
#: At most one log line per this many seconds about dropped connections (a flood would
#: otherwise turn into a flood of log lines).
DROP_LOG_INTERVAL_SECONDS = 60.0
METRICS_PATH = "/metrics"


Encoder = Callable[[Collector], bytes]
"""Renders a registry (or one collector) in one exposition format."""


def render_text(registry: Collector, encoder: Encoder = generate_latest) -> bytes:
    """The exposition of ``registry``: text format 0.0.4 unless ``encoder`` says otherwise."""
    return encoder(registry)


@dataclass(frozen=True)
class Exposition:
    """What one scrape asked for (:func:`negotiate`): format, its content type, and gzip."""

    encoder: Encoder
    content_type: str
    gzip: bool = False

    def response(self, body: bytes, *, head_only: bool = False) -> bytes:
        """A 200 with ``body`` (rendered by :attr:`encoder`), gzip-compressed when asked."""
        if self.gzip:
            body = gzip.compress(body, compresslevel=6, mtime=0)
        encoding = "gzip" if self.gzip else ""
        return http_response(HTTPStatus.OK, body, self.content_type, head_only=head_only, encoding=encoding)


def negotiate(headers: Mapping[str, str]) -> Exposition:
    """The exposition a request's ``Accept`` and ``Accept-Encoding`` ask for.

    client_python's own helpers decide (``choose_encoder``, ``gzip_accepted``, as its
    ``make_wsgi_app`` does): ``application/openmetrics-text`` gets OpenMetrics (Prometheus
    asks for it first), ``text/plain; version=1.0.0`` the newer text format, anything else
    the text format 0.0.4; ``Accept-Encoding: gzip`` compresses the body.
    """
    encoder, content_type = choose_encoder(headers.get("accept", ""))
    return Exposition(encoder, content_type, gzip_accepted(headers.get("accept-encoding", "")))


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where the running server listens (the real port when 0 was asked for)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{METRICS_PATH}"


#: What a server does with one request: ``(method, path, headers)`` in, the whole response out.
Answer = Callable[[str, str, Mapping[str, str]], Awaitable[bytes]]


def http_response(
    status: HTTPStatus, body: bytes, content_type: str, *, head_only: bool = False, encoding: str = ""
) -> bytes:
    header = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        + (f"Content-Encoding: {encoding}\r\n" if encoding else "")
        + f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return header if head_only else header + body


class Request(NamedTuple):
    """A request head: method, path without its query, header fields (names lower-cased)."""

    method: str
    path: str
    headers: Mapping[str, str]


def parse_request_line(head: bytes) -> Request | None:
    """The :class:`Request` in a request head, or ``None`` if it is not HTTP."""
    line, *fields = head.split(b"\r\n")
    parts = line.decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    headers: dict[str, str] = {}
    for field in fields:
        name, sep, value = field.decode("latin-1").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Request(parts[0], parts[1].split("?", 1)[0], headers)


async def read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buffer += chunk
    return buffer


class _Connection:
    """One open connection's place in :class:`ConnectionSlots`."""

    __slots__ = ("evictable", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        #: Waiting on the client (reading its head, sending it the answer): may be dropped.
        self.evictable = True


class ConnectionSlots:
    """The connections one HTTP server has open, with the slow-client policy of this module.

    :meth:`admit` gives a new connection its place, dropping the oldest evictable one when
    all :attr:`limit` places are taken; ``None`` means every open connection is busy
    rendering and the newcomer should be closed. Used from the trio thread only.
    """

    def __init__(self, limit: int = MAX_CONNECTIONS) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._open: dict[_Connection, None] = {}  # insertion order: oldest first
        self.dropped_total = 0
        self.refused_total = 0
        self._logged_at = -DROP_LOG_INTERVAL_SECONDS

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self) -> _Connection | None:
        if len(self._open) >= self.limit:
            oldest = next((c for c in self._open if c.evictable), None)
            if oldest is None:
                self.refused_total += 1
                self._note()
                return None
            del self._open[oldest]
            oldest.scope.cancel()
            self.dropped_total += 1
            self._note()
        connection = _Connection()
        self._open[connection] = None
        return connection

    def release(self, connection: _Connection) -> None:
        self._open.pop(connection, None)

    def _note(self) -> None:
        now = time.monotonic()
        if now - self._logged_at >= DROP_LOG_INTERVAL_SECONDS:
            self._logged_at = now
            log.warning(
                "http_connections_at_limit",
                limit=self.limit,
                dropped_total=self.dropped_total,
                refused_total=self.refused_total,
                why="slow or idle clients hold every connection: the oldest waiting one is dropped",
            )


async def serve_connection(answer: Answer, slots: ConnectionSlots, stream: trio.SocketStream) -> None:
    """One connection: a bounded request head within the timeout, one answer, close.

    Shared by every HTTP endpoint cvmctl serves (this one and the host daemon's); they
    differ only in ``answer``.
    """
    async with stream:
        connection = slots.admit()
        if connection is None:
            return  # every place is busy rendering: close this one rather than queue it
        try:
            with connection.scope:  # cancelled when a newcomer needs the place
                reply = b""
                with trio.move_on_after(REQUEST_TIMEOUT_SECONDS):
                    head = await read_head(stream)
                    request = parse_request_line(head) if head is not None else None
                    if request is None:
                        reply = http_response(HTTPStatus.BAD_REQUEST, b"bad request\n", "text/plain")
                    else:
                        connection.evictable = False
                        reply = await answer(*request)
                        connection.evictable = True
                if reply:
                    with trio.move_on_after(SEND_TIMEOUT_SECONDS):
                        await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        finally:
            slots.release(connection)


async def open_http_listeners(host: str, port: int, what: str = "/metrics") -> list[trio.SocketListener]:
    """Listen on ``host:port``; a port in use (or an address not here) is a one-line
    :class:`~cvmcore.errors.UsageError`, never a traceback."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        shown = f"[{host}]" if ":" in host else host
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UsageError(f"cannot serve {what} on tcp://{shown}:{port}: {reason}") from exc


async def serve_http(answer: Answer, listeners: list[trio.SocketListener]) -> None:
    """Serve ``answer`` on ``listeners`` until cancelled (then close them)."""
    try:
        slots = ConnectionSlots()
        await trio.serve_listeners(functools.partial(serve_connection, answer, slots), listeners)
    finally:
        await close_listeners(listeners)


async def close_listeners(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        await trio.aclose_forcefully(listener)


def metrics_answer(render: Callable[[Encoder], bytes]) -> Answer:
    """The guest's routes: ``/metrics`` only, in the format the request negotiates."""

    async def answer(method: str, path: str, headers: Mapping[str, str]) -> bytes:
        if path != METRICS_PATH:
            return http_response(HTTPStatus.NOT_FOUND, b"only /metrics is here\n", "text/plain")
        if method not in ("GET", "HEAD"):
            return http_response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET or HEAD\n", "text/plain")
        exposition = negotiate(headers)

        def respond() -> bytes:  # rendering and compressing in one worker-thread hop
            return exposition.response(render(exposition.encoder), head_only=method == "HEAD")

        return await trio.to_thread.run_sync(respond)

    return answer


async def serve_metrics_http(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = AGENT_METRICS_PORT,
    *,
    task_status: trio.TaskStatus[MetricsEndpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``registry`` at ``http://host:port/metrics`` until cancelled.

    ``await nursery.start(serve_metrics_http, registry, host, port)`` returns the
    :class:`MetricsEndpoint` once the socket listens; cancelling the nursery (or an
    enclosing scope) closes the listener and every connection.
    """
    listeners = await open_http_listeners(host, port)
    bound_port = int(listeners[0].socket.getsockname()[1])
    answer = metrics_answer(functools.partial(render_text, registry))
    task_status.started(MetricsEndpoint(host, bound_port))
    await serve_http(answer, listeners)
