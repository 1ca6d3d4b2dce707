"""HTTP ``/metrics`` for the guest's Prometheus exposition.

client_python's :func:`prometheus_client.start_http_server` serves a *private* registry
from a small threaded WSGI server (one thread per request, daemon threads). Scrapes never
touch the kernel: the collectors serve snapshots that the trio refresher keeps fresh (see
:mod:`guest_agent.collectors`), so a scrape costs an exposition render only.

:class:`MetricsHttpServer` wraps it with a configurable listen address (``host`` may be an
IPv4 or IPv6 literal; port 0 picks a free port, see :attr:`MetricsHttpServer.port`) and a
clean stop: ``shutdown()`` ends the serve loop, ``server_close()`` releases the socket, the
serving thread is joined. :func:`serve_metrics_http` is the trio form: it runs until
cancelled and stops the server off the trio thread.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

DEFAULT_METRICS_PORT = 9464


class MetricsHttpServer:
    """A running ``/metrics`` server; :meth:`stop` is idempotent."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self._stopped = False

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


async def serve_metrics_http(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = DEFAULT_METRICS_PORT,
    *,
    task_status: trio.TaskStatus[MetricsHttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` until cancelled; ``nursery.start`` returns the running server."""
    server = await trio.to_thread.run_sync(lambda: MetricsHttpServer(registry, host, port))
    try:
        task_status.started(server)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.stop)
