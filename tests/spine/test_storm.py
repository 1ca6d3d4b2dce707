"""The storm: 10,000 hostile requests at each daemon, and neither may fail (issue 13).

Each daemon runs as its own process on a unix socket (see :mod:`tests.spine.hostile`):
the agent on a copy of a recorded SNP guest's tree, the host daemon with no QEMU to start.
Sixteen client threads send random bytes to every method, messages of the wrong type,
truncated messages, well-formed messages full of hostile values, and what only knowledge
of the services can build (every catalogue workload with parameters to refuse, specs that
nest a thousand levels or name host files), a few with deadlines so short that the client
gives up mid-call. Meanwhile a probe asks the health service every 50 ms.

Acceptance: no UNKNOWN or INTERNAL status, no traceback or error in the server's log,
health answering SERVING throughout, and the server's RSS back within 10 MiB of what it
was after a warm-up (the first requests import what the rest use). The figures are
printed (``pytest -s``) for the closing note.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cvmcore.grpc_bridge import UNDECODABLE_LOG_BURST, UNDECODABLE_LOG_WINDOW
from tests.spine.hostile import (
    AGENT_SERVICE,
    FORBIDDEN,
    HOST_SERVICE,
    Server,
    agent_server,
    call_raw,
    cheap_vmexit_run,
    crafted_create_vm,
    crafted_run_workload,
    crafted_vm_ref,
    hostd_server,
    hostile_request,
    problems_in_log,
)

REQUESTS = 10_000
WARMUP = 600
CLIENT_THREADS = 16
MiB = 1024 * 1024
RSS_SLACK = 10 * MiB

Builder = Callable[[random.Random], tuple[MethodDescriptor, bytes, float]]


class HealthProbe:
    """Asks grpc.health.v1 every ``interval`` s on its own channel until stopped."""

    def __init__(self, target: str, interval: float = 0.05) -> None:
        self.target, self.interval = target, interval
        self.answers = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe")

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.wait(self.interval):
                started = time.monotonic()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                self.slowest = max(self.slowest, time.monotonic() - started)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    self.failures.append(f"status {reply.status}")
                self.answers += 1

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def storm(server: Server, build: Builder, count: int, seed: int) -> collections.Counter[str]:
    """Send ``count`` requests from ``build``; the status codes they got, by name."""
    codes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    rng = random.Random(seed)
    work = [build(rng) for _ in range(count)]  # built first: the client's CPU goes to sending

    def send(chunk: list[tuple[MethodDescriptor, bytes, float]]) -> None:
        with grpc.insecure_channel(server.target) as channel:
            for method, payload, timeout in chunk:
                code = call_raw(channel, method, payload, timeout)
                with lock:
                    codes[code.name] += 1
                    if code in FORBIDDEN:
                        codes[f"{code.name}:{method.name}"] += 1

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(send, [work[i::CLIENT_THREADS] for i in range(CLIENT_THREADS)]))
    return codes


def settled_rss(pid: int) -> int:
    time.sleep(1.0)
    return int(psutil.Process(pid).memory_info().rss)


def run_storm(server: Server, build: Builder, name: str) -> None:
    begun = time.monotonic()
    with HealthProbe(server.target) as probe:
        warm = storm(server, build, WARMUP, seed=1)
        rss_before = settled_rss(server.process.pid)
        started = time.monotonic()
        codes = storm(server, build, REQUESTS, seed=2)
        seconds = time.monotonic() - started
        rss_after = settled_rss(server.process.pid)
    text = server.log_text()
    problems = problems_in_log(text)
    # thousands of undecodable requests, but the log says so at most ten times a minute
    windows = 2 + int((time.monotonic() - begun) // UNDECODABLE_LOG_WINDOW)
    assert text.count('"event": "undecodable_request"') <= UNDECODABLE_LOG_BURST * windows
    print(
        f"\n{name} storm: {REQUESTS} requests (+{WARMUP} warm-up) in {seconds:.1f} s "
        f"({REQUESTS / seconds:.0f}/s); codes {dict(sorted(codes.items()))}; "
        f"RSS {rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB; "
        f"health {probe.answers} answers, slowest {probe.slowest * 1000:.0f} ms, "
        f"{len(probe.failures)} failures"
    )
    forbidden = {k: v for k, v in (warm + codes).items() if k.split(":")[0] in {c.name for c in FORBIDDEN}}
    assert not forbidden, forbidden
    assert not problems, problems[:5]
    assert not probe.failures, probe.failures[:5]
    assert probe.answers > 0
    assert rss_after - rss_before <= RSS_SLACK, (rss_before, rss_after)
    assert server.process.poll() is None


def methods(service: ServiceDescriptor) -> list[MethodDescriptor]:
    return list(service.methods)


def agent_request(rng: random.Random) -> tuple[MethodDescriptor, bytes, float]:
    by_name = AGENT_SERVICE.methods_by_name
    roll = rng.random()
    timeout = 0.002 if rng.random() < 0.02 else 10.0  # now and then the client gives up at once
    if roll < 0.15:
        return by_name["RunWorkload"], crafted_run_workload(rng), timeout
    if roll < 0.152:
        return by_name["RunWorkload"], cheap_vmexit_run(), 30.0
    method = rng.choice(methods(AGENT_SERVICE))
    return method, hostile_request(rng, method), timeout


def hostd_request(rng: random.Random) -> tuple[MethodDescriptor, bytes, float]:
    by_name = HOST_SERVICE.methods_by_name
    roll = rng.random()
    timeout = 0.002 if rng.random() < 0.02 else 10.0
    if roll < 0.15:
        return by_name["CreateVM"], crafted_create_vm(rng), timeout
    if roll < 0.3:
        method = rng.choice([by_name[n] for n in ("StartVM", "StopVM", "KillVM", "DestroyVM", "GetVM")])
        return method, crafted_vm_ref(rng, method), timeout
    method = rng.choice(methods(HOST_SERVICE))
    if method.server_streaming:
        timeout = 0.1  # WatchVMs never ends by itself
    return method, hostile_request(rng, method), timeout


def test_agent_storm(tmp_path: Path) -> None:
    with agent_server(tmp_path) as server:
        run_storm(server, agent_request, "agent")


def test_hostd_storm(tmp_path: Path) -> None:
    with hostd_server(tmp_path) as server:
        run_storm(server, hostd_request, "cvm-hostd")
