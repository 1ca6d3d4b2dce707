"""The daemon's metrics endpoint: host series, per-VM guest series, and Prometheus discovery.

Routes (HTTP/1.1 ``GET``/``HEAD``, one request per connection, the same bounds as the guest
agent's server in :mod:`cvmcore.metrics_http`, whose request parsing this reuses)::

    /metrics             the host side of every VM: cvm_vm_*, cvm_agent_up, self-monitoring
    /metrics/vm/<name>   the guest's own series of VM <name> as its agent reported them
                         (GetMetrics), each with vm="<name>"; 404 for an unknown VM
    /sd                  Prometheus HTTP service discovery: one target per VM with an agent
    /sd/host             the same format, one target: this daemon's /metrics

Why guests are scraped *through the daemon*: a guest is reachable only over vsock (and, in a
confidential VM, should not open a network port at all), so Prometheus cannot dial it. Each
VM's target in ``/sd`` is therefore the daemon's own address with ``__metrics_path__`` set to
``/metrics/vm/<name>`` (Prometheus applies ``__metrics_path__`` from discovered labels,
docs: "configuration", ``<relabel_config>`` / ``<http_sd_config>``) and labels ``vm``,
``tee`` and ``host``. Each VM is then its own scrape target, with its own ``up`` series and
scrape duration, while the daemon holds the only connection to the agent.

http_sd format (prometheus.io/docs/prometheus/latest/http_sd/): a JSON list of
``{"targets": ["<host>:<port>"], "labels": {...}}``, content type ``application/json``,
HTTP 200 on every refresh; an empty list is valid.

The guest series are served with ``vm`` already set; the scrape job must keep it with
``honor_labels: true`` (otherwise Prometheus renames it ``exported_vm``); the examples in
``deploy/prometheus/`` do.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote

import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from cvmcore.defaults import HOSTD_METRICS_PORT
from cvmcore.metrics_http import (
    Exposition,
    close_listeners,
    http_response,
    negotiate,
    open_http_listeners,
    serve_http,
)
from host_daemon.metrics.collector import HostCollector

VM_PATH_PREFIX = "/metrics/vm/"
SD_CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class HostEndpoint:
    """Where the server listens, and the ``host:port`` it tells Prometheus to scrape."""

    host: str
    port: int
    advertised: str

    @property
    def url(self) -> str:
        return f"http://{self.advertised}/metrics"


class _Families(Collector):
    """A collector over a fixed list of families (one VM's guest series)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return self.families


def vm_metrics_path(name: str) -> str:
    return VM_PATH_PREFIX + name


def sd_targets(collector: HostCollector, advertised: str, host_label: str) -> list[dict[str, object]]:
    """The http_sd list: one target per followed VM that has an agent channel (pure).

    A VM without one (``agent.channel = "none"``) has no guest series to scrape; its host
    series are in the daemon's own ``/metrics`` all the same.
    """
    return [
        {
            "targets": [advertised],
            "labels": {
                "__metrics_path__": vm_metrics_path(state.view.name),
                "vm": state.view.name,
                "tee": state.view.tee,
                "host": host_label,
            },
        }
        for state in sorted(collector.vms.values(), key=lambda s: s.view.name)
        if state.view.agent_address and state.view.live
    ]


class HostMetricsApp:
    """Routes a request path to a response body (rendering runs in a worker thread)."""

    def __init__(
        self, collector: HostCollector, advertised: str, host_label: str, extra: Sequence[Collector] = ()
    ) -> None:
        self.collector = collector
        self.advertised = advertised
        self.host_label = host_label
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        for other in extra:  # the daemon's own tallies (undecodable requests)
            self.registry.register(other)

    def render_host(self, exposition: Exposition, head: bool = False) -> bytes:
        return exposition.response(exposition.encoder(self.registry), head_only=head)

    def render_vm(self, name: str, exposition: Exposition, head: bool = False) -> bytes | None:
        families = self.collector.guest_families(name, self.host_label)
        if families is None:
            return None
        return exposition.response(exposition.encoder(_Families(families)), head_only=head)

    async def answer(self, method: str, path: str, headers: Mapping[str, str]) -> bytes:
        """One request; ``/metrics`` and ``/metrics/vm/<name>`` in the format it negotiates."""
        if method not in ("GET", "HEAD"):
            return http_response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET or HEAD\n", "text/plain")
        head = method == "HEAD"
        if path == "/metrics":
            return await trio.to_thread.run_sync(self.render_host, negotiate(headers), head)
        if path.startswith(VM_PATH_PREFIX):
            name = unquote(path[len(VM_PATH_PREFIX) :])
            vm_reply = await trio.to_thread.run_sync(self.render_vm, name, negotiate(headers), head)
            if vm_reply is None:
                return http_response(HTTPStatus.NOT_FOUND, f"no VM named {name!r}\n".encode(), "text/plain")
            return vm_reply
        if path in ("/sd", "/sd/host"):
            if path == "/sd":
                listing = sd_targets(self.collector, self.advertised, self.host_label)
            else:
                listing = [{"targets": [self.advertised], "labels": {"host": self.host_label}}]
            return http_response(HTTPStatus.OK, json.dumps(listing).encode(), SD_CONTENT_TYPE, head_only=head)
        return http_response(
            HTTPStatus.NOT_FOUND, b"/metrics, /metrics/vm/<name>, /sd, /sd/host\n", "text/plain"
        )


def advertised_address(host: str, port: int) -> str:
    """``host:port`` for Prometheus: a wildcard bind is replaced by this machine's name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_host_metrics_http(
    collector: HostCollector,
    host: str = "127.0.0.1",
    port: int = HOSTD_METRICS_PORT,
    *,
    advertise: str | None = None,
    host_label: str | None = None,
    extra: Sequence[Collector] = (),
    task_status: trio.TaskStatus[HostEndpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``collector`` on ``http://host:port`` until cancelled; ``nursery.start`` returns the endpoint.

    ``extra`` collectors join ``/metrics``.

    ``advertise`` is the ``host:port`` written into ``/sd`` targets (default: the bound
    address, or this machine's name for a wildcard bind); ``host_label`` the ``host`` label
    (default: the short host name).
    """
    listeners = await open_http_listeners(host, port)
    try:
        bound = int(listeners[0].socket.getsockname()[1])
        advertised = advertise or advertised_address(host, bound)
        app = HostMetricsApp(collector, advertised, host_label or socket.gethostname().split(".")[0], extra)
    except BaseException:
        await close_listeners(listeners)
        raise
    task_status.started(HostEndpoint(host, bound, advertised))
    await serve_http(app.answer, listeners)
