"""Network workloads: nginx + wrk, iperf3 TCP and UDP, ping, memcached + memaslap.

The server runs in the guest, the client on the host, as in the study ("Confidential VMs
Explained", evaluation code TUM-DSE/CVM_eval; parameters in docs/study.md):

- nginx: 1 worker, ``access_log off``, one static index page; client ``wrk -t8 -c300 -d30s``,
  result ``Requests/sec`` (we add ``--latency`` for the 50/75/90/99th percentiles);
- iperf3: server ``-s -p 7175``; client ``-c HOST -p 7175 -b 0 -i 1 -l LEN -P N [-u]``, TCP
  with ``-l 128K -P 32``, UDP with ``-P 8`` and lengths 64..1460; result the receiver's sum
  (``end.sum_received`` of ``-J``); no ``-t`` in the study, so iperf3's default 10 s;
- ping: ``-c 30 -i 0.1 -s 64..1024``, the first 3 replies dropped (ARP, caches);
- memcached ``-t <nvcpu>``, client memtier ``-t <nvcpu> -c 100 --pipeline=40
  --protocol=memcache_binary``; result get and set operations per second.

Servers listen on the ``listen`` parameter: ``0.0.0.0`` in a guest (the host reaches it
through the VM's port forward), ``127.0.0.1`` for the local target, which sets it. The
ports are parameters; nginx's default 8080 rather than the study's 80 only so that a
non-root local run works (the port does not change what is measured).
"""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Mapping
from typing import Any, ClassVar

from cvmcore.errors import UsageError
from workloads import parsers
from workloads.capabilities import ICMP, TCP, UDP
from workloads.model import Param, Sample, ServerPlan, Workload, euid_is_root

#: memaslap's last line: ``Run time: 2.0s Ops: 11590 TPS: 5795 Net_rate: 5.9M/s``
MEMASLAP_DONE = re.compile(r"^Run time: [0-9.]+s Ops: \d+ TPS: \d+ Net_rate: \S+\n", re.M)

#: seconds allowed per memaslap connection to open (see Memcached.timeout)
CONNECT_ALLOWANCE = 0.1

LISTEN = Param("listen", "str", "0.0.0.0", "address the server binds in the guest (0.0.0.0 or 127.0.0.1)")


def url_host(host: str) -> str:
    """``host`` as it goes in a URL or ``host:port`` (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_listen(params: Mapping[str, Any]) -> None:
    """The bind address must be an IP literal: it goes into a config file and an argv."""
    import ipaddress

    try:
        ipaddress.ip_address(params["listen"])
    except ValueError:
        raise UsageError(
            f"parameter listen: {params['listen']!r} is not allowed (expected an IP address)"
        ) from None


NGINX_CONF = """\
# cvmctl's nginx for the study's benchmark: one worker, no access log, one static page.
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log stderr warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type text/html;
    server {
        listen LISTEN:PORT;
        root {dir}/www;
        index index.html;
    }
}
"""


def static_page(size: int) -> bytes:
    """An HTML page of exactly ``size`` bytes (at least the 60 bytes of markup)."""
    head = b"<!DOCTYPE html><html><head><title>cvmctl</title></head><body>"
    tail = b"</body></html>\n"
    filler = max(0, size - len(head) - len(tail))
    return head + b"x" * filler + tail


class Nginx(Workload):
    """nginx in the guest, ``wrk --latency`` on the host: requests/s and latency percentiles."""

    name = "nginx"
    summary = "HTTP requests/s and latency: nginx (1 worker, one static page) in the guest, wrk on the host"
    kind = "client-server"
    params = (
        Param("threads", "int", 8, "wrk threads (-t)", minimum=1, maximum=256),
        Param(
            "connections", "int", 300, "wrk connections (-c), at least the threads", minimum=1, maximum=10000
        ),
        Param("duration", "int", 30, "seconds per run (wrk -d)", minimum=1, maximum=3600),
        Param("port", "int", 8080, "port nginx listens on in the guest", minimum=1, maximum=65535),
        Param(
            "page_bytes",
            "int",
            615,
            "size of the static page (Debian's welcome page: 615)",
            minimum=64,
            maximum=1 << 24,
        ),
        LISTEN,
    )
    guest_tools: ClassVar[dict[str, str]] = {"nginx": "nginx"}
    host_tools: ClassVar[dict[str, str]] = {"wrk": "wrk"}
    duration_param = "duration"
    needs = frozenset({TCP})

    def check(self, params: dict[str, Any]) -> None:
        check_listen(params)
        if params["connections"] < params["threads"]:
            raise UsageError(
                f"parameter connections: {params['connections']} is not allowed "
                f"(expected at least threads={params['threads']}; wrk needs a connection per thread)"
            )

    def guest_server(self, params: Mapping[str, Any]) -> ServerPlan:
        listen = url_host(params["listen"])
        conf = NGINX_CONF.replace("LISTEN", listen).replace("PORT", str(params["port"]))
        return ServerPlan(
            argv=["nginx", "-p", "{dir}", "-e", "stderr", "-c", "{dir}/nginx.conf"],
            files={
                "nginx.conf": conf.encode(),
                "www/index.html": static_page(params["page_bytes"]),
                "tmp/.keep": b"",
            },
            port=params["port"],
        )

    def host_command(self, params: Mapping[str, Any], host: str, port: int) -> list[str]:
        return [
            "wrk",
            f"-t{params['threads']}",
            f"-c{params['connections']}",
            f"-d{params['duration']}s",
            "--latency",
            f"http://{url_host(host)}:{port}/",
        ]

    def parse_host(self, output: str, params: Mapping[str, Any]) -> list[Sample]:
        result = parsers.parse_wrk(output)
        meta = {"tool": "wrk", "requests": str(result.requests)}
        samples = [Sample("requests_per_second", result.requests_per_second, "req/s", "higher", meta)]
        for pct, seconds in sorted(result.latency_percentiles_s.items()):
            samples.append(Sample(f"latency_p{pct}", seconds * 1e3, "ms", "lower", meta))
        samples.append(
            Sample("errors", float(result.socket_errors + result.non_2xx_3xx), "count", "lower", meta)
        )
        return samples


class _Iperf(Workload):
    # iperf3 -s (3.12) refused or reset the client's second test after a first one
    # ("unable to connect to server: Connection refused", "unable to receive control
    # message: Connection reset by peer"; seen in the dev guest, over the tap and locally,
    # between iperf-udp's datagram sizes): a fresh server for each client test.
    fresh_server_each_repetition = True

    kind = "client-server"
    guest_tools: ClassVar[dict[str, str]] = {"iperf3": "iperf3"}
    host_tools: ClassVar[dict[str, str]] = {"iperf3": "iperf3"}
    duration_param = "duration"
    udp: ClassVar[bool] = False
    needs = frozenset({TCP})

    def check(self, params: dict[str, Any]) -> None:
        check_listen(params)

    def guest_server(self, params: Mapping[str, Any]) -> ServerPlan:
        return ServerPlan(
            argv=["iperf3", "-s", "-p", str(params["port"]), "-B", params["listen"]],
            files={},
            port=params["port"],
        )

    def _length(self, params: Mapping[str, Any]) -> int:
        return int(params["length"][0] if isinstance(params["length"], list) else params["length"])

    def host_command(self, params: Mapping[str, Any], host: str, port: int) -> list[str]:
        argv = ["iperf3", "-c", host, "-p", str(port), "-b", "0", "-i", "1", "-l", str(self._length(params))]
        argv += ["-P", str(params["streams"]), "-t", str(params["duration"]), "-J"]
        return [*argv, "-u"] if self.udp else argv

    def parse_host(self, output: str, params: Mapping[str, Any]) -> list[Sample]:
        result = parsers.parse_iperf3(output)
        length = self._length(params)
        meta = {"tool": "iperf3", "version": result.version, "length": str(length)}
        suffix = f"_{length}B" if self.udp else ""
        samples = [
            Sample(f"throughput{suffix}", result.received_bits_per_second / 1e9, "Gbit/s", "higher", meta),
        ]
        if result.retransmits is not None:
            samples.append(Sample("retransmits", float(result.retransmits), "count", "lower", meta))
        if result.lost_percent is not None:
            samples.append(Sample(f"lost{suffix}", result.lost_percent, "%", "lower", meta))
        if result.jitter_ms is not None:
            samples.append(Sample(f"jitter{suffix}", result.jitter_ms, "ms", "lower", meta))
        return samples


class IperfTcp(_Iperf):
    """iperf3 TCP, 32 parallel streams of 128 KiB writes: receiver throughput."""

    name = "iperf-tcp"
    summary = "TCP throughput: iperf3 -s in the guest, iperf3 -c -P 32 -l 128K on the host"
    params = (
        Param("streams", "int", 32, "parallel streams (-P)", minimum=1, maximum=128),
        Param(
            "length", "int", 128 * 1024, "bytes per write (-l; the study: 128K)", minimum=1, maximum=1 << 20
        ),
        Param(
            "duration",
            "int",
            10,
            "seconds per run (-t; iperf3's default, which the study kept)",
            minimum=1,
            maximum=3600,
        ),
        Param("port", "int", 7175, "port iperf3 -s listens on in the guest", minimum=1, maximum=65535),
        LISTEN,
    )


class IperfUdp(_Iperf):
    """iperf3 UDP, 8 streams at unlimited rate, one case per datagram length."""

    name = "iperf-udp"
    summary = "UDP throughput per datagram size: iperf3 -u -b 0 -P 8, lengths 64..1460"
    udp = True
    case_param = "length"
    needs = frozenset({TCP, UDP})  # iperf3's control connection is TCP
    params = (
        Param("streams", "int", 8, "parallel streams (-P)", minimum=1, maximum=128),
        Param(
            "length",
            "list[int]",
            [64, 128, 256, 512, 1024, 1460],
            "datagram lengths, one case each (-l)",
            minimum=16,
            maximum=65507,
        ),
        Param("duration", "int", 10, "seconds per case (-t)", minimum=1, maximum=3600),
        Param("port", "int", 7175, "port iperf3 -s listens on in the guest", minimum=1, maximum=65535),
        LISTEN,
    )


class Ping(Workload):
    """ICMP echo round trips from the host to the guest, per payload size; no server.

    ``ping -i`` below 0.2 s needs root in old iputils; bookworm's 20221126 allows 2 ms for
    everyone, so the study's 0.1 s works unprivileged.
    """

    name = "ping"
    summary = "ICMP round-trip time per payload size (ping -c 30 -i 0.1, first 3 dropped)"
    kind = "client-server"
    case_param = "size"
    needs = frozenset({ICMP})
    params = (
        Param(
            "size",
            "list[int]",
            [64, 128, 256, 512, 1024],
            "payload sizes (-s), one case each",
            minimum=16,
            maximum=65000,
        ),
        Param("count", "int", 30, "echo requests per size (-c)", minimum=4, maximum=100000),
        Param("interval", "float", 0.1, "seconds between requests (-i)", minimum=0.002, maximum=10),
        Param("drop", "int", 3, "first replies not counted (warm-up)", minimum=0, maximum=1000),
    )
    host_tools: ClassVar[dict[str, str]] = {"ping": "iputils-ping"}

    def check(self, params: dict[str, Any]) -> None:
        if params["drop"] >= params["count"] - 1:
            raise UsageError(
                f"parameter drop: {params['drop']} is not allowed "
                f"(expected fewer than count-1={params['count'] - 1})"
            )

    def scaled(self, params: dict[str, Any], duration_seconds: float) -> dict[str, Any]:
        per_case = duration_seconds / max(1, len(params["size"]))
        count = max(params["drop"] + 2, round(per_case / params["interval"]))
        return {**params, "count": count}

    def timeout(self, params: Mapping[str, Any]) -> float:
        return float(params["count"] * params["interval"] * 2 + 10.0)

    def host_command(self, params: Mapping[str, Any], host: str, port: int) -> list[str]:
        deadline = int(params["count"] * params["interval"]) + 5
        return [
            "ping",
            "-n",
            "-c",
            str(params["count"]),
            "-i",
            f"{params['interval']:g}",
            "-s",
            str(params["size"][0]),
            "-w",
            str(deadline),
            host,
        ]

    def parse_host(self, output: str, params: Mapping[str, Any]) -> list[Sample]:
        rtts = parsers.parse_ping_rtts_ms(output)[params["drop"] :]
        if not rtts:
            raise parsers.ParseError("ping: every reply fell within the dropped warm-up")
        size = params["size"][0]
        meta = {"tool": "ping", "size": str(size), "replies": str(len(rtts))}
        return [
            Sample(f"rtt_mean_{size}B", statistics.fmean(rtts), "ms", "lower", meta),
            Sample(f"rtt_median_{size}B", statistics.median(rtts), "ms", "lower", meta),
        ]


class Memcached(Workload):
    """memcached in the guest, memaslap on the host: gets/s and sets/s over the binary protocol.

    The load generator is ``memaslap`` (installed as ``memcaslap`` by Debian's
    libmemcached-tools), because memtier_benchmark, the study's, is not packaged in any
    Debian suite. memaslap is the closest Debian has: multi-threaded, many concurrent
    connections, a fixed run time, the binary protocol (``-B``, as the study's
    ``--protocol=memcache_binary``) and a get/set mix (its default 9:1), reporting per-command
    counts. It has no pipeline depth; its per-connection window (``-w``) keeps several
    requests in flight instead. ``memcslap`` from the same package only reports one wall
    time per batch, and mc-crusher / memtier are not packaged. The study's memtier
    ``-t <nvcpu> -c 100`` becomes ``-T threads -c threads*100``.

    Through QEMU's user networking (the dev guest today) two things stretch a run, and
    neither changes what is measured: memaslap opens all its connections before its clock
    starts, and the forward accepts them one at a time (so :meth:`timeout` allows for
    opening them), and after printing its summary it can hang in its teardown (so the
    summary ends the run: :meth:`output_complete`).
    """

    name = "memcached"
    summary = "memcached gets/s and sets/s: memcached in the guest, memaslap (binary protocol) on the host"
    kind = "client-server"
    params = (
        Param(
            "server_threads",
            "int",
            0,
            "memcached -t; 0: the guest's vCPU count, as the study",
            minimum=0,
            maximum=256,
        ),
        Param(
            "threads", "int", 8, "memaslap threads (-T); the study: the VM's 8 vCPUs", minimum=1, maximum=256
        ),
        Param(
            "connections",
            "int",
            100,
            "connections per client thread (memtier's -c 100)",
            minimum=1,
            maximum=1000,
        ),
        Param("duration", "int", 30, "seconds per run (memaslap -t)", minimum=1, maximum=3600),
        Param("memory_mb", "int", 1024, "memcached cache size (-m)", minimum=16, maximum=1 << 20),
        Param("port", "int", 11211, "port memcached listens on in the guest", minimum=1, maximum=65535),
        LISTEN,
    )
    guest_tools: ClassVar[dict[str, str]] = {"memcached": "memcached"}
    host_tools: ClassVar[dict[str, str]] = {"memcaslap": "libmemcached-tools"}
    duration_param = "duration"
    needs = frozenset({TCP})

    def check(self, params: dict[str, Any]) -> None:
        check_listen(params)

    def guest_server(self, params: Mapping[str, Any]) -> ServerPlan:
        threads = params["server_threads"] or os.cpu_count() or 1
        argv = ["memcached", "-p", str(params["port"]), "-l", params["listen"], "-U", "0"]
        argv += ["-t", str(threads), "-m", str(params["memory_mb"])]
        if euid_is_root():
            argv += ["-u", "nobody"]  # memcached refuses to run as root without -u
        return ServerPlan(argv=argv, files={}, port=params["port"])

    def host_command(self, params: Mapping[str, Any], host: str, port: int) -> list[str]:
        concurrency = params["threads"] * params["connections"]
        return [
            "memcaslap",
            "-s",
            f"{url_host(host)}:{port}",
            "-T",
            str(params["threads"]),
            "-c",
            str(concurrency),
            "-t",
            f"{params['duration']}s",
            "-B",
        ]

    def timeout(self, params: Mapping[str, Any]) -> float:
        """The run, plus time to open every connection: memaslap starts its clock only once
        all are open, and QEMU's user networking accepts forwarded connections one at a time
        (listen backlog 1), so under TCG the study's 800 take about 30 s (SYN retries back off)."""
        connections = params["threads"] * params["connections"]
        return float(params["duration"] * 2 + 30 + CONNECT_ALLOWANCE * connections)

    def output_complete(self, output: str) -> bool:
        """The summary's last line is out: memaslap through QEMU's user networking can then
        hang in its teardown (a thread whose connections saw no event after the run time never
        notices the end), so it is stopped instead of waited for."""
        return MEMASLAP_DONE.search(output) is not None

    def parse_host(self, output: str, params: Mapping[str, Any]) -> list[Sample]:
        result = parsers.parse_memaslap(output)
        meta = {"tool": "memaslap", "get_misses": str(result.get_misses)}
        return [
            Sample("gets_per_second", result.gets_per_second, "ops/s", "higher", meta),
            Sample("sets_per_second", result.sets_per_second, "ops/s", "higher", meta),
            Sample("ops_per_second", result.ops_per_second, "ops/s", "higher", meta),
        ]
