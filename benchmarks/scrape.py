"""/metrics latency: the agent's collectors vs Debian's prometheus-node-exporter, same run.

Starts, on 127.0.0.1, (a) the real ``cvm-agent`` with ``--metrics-listen`` (its gRPC API on a
private unix socket; the real roots ``/``, ``/proc``, ``/sys/kernel/debug``; refresher at
its default, every 15 s; no debugfs mount; its threads on one CPU, its default), (b)
``prometheus-node-exporter`` with its default collectors and (c) the same node exporter
restricted to the collectors that overlap ours (cpu, pressure). The client scrapes them in
alternating blocks so that machine noise falls on all of them, then prints per-target
statistics and the ratio of medians agent / node-exporter (defaults).

Also measured: the agent's resident memory after the run, and its CPU use while idle with
one scrape every 15 s over ``--idle-seconds`` (the issue's window is 120 s).

    .venv/bin/python benchmarks/scrape.py [--scrapes 300] [--idle-seconds 120] [--json out.json]

Goals (issue 4): ratio of medians <= 1.0; agent RSS <= 40 MiB; idle CPU <= 0.1 % of a core.

Note what is compared: a scrape of the agent renders snapshots the refresher read earlier
(reading the kernel is off the scrape path by design), while node_exporter reads the kernel
on every scrape. That is the latency a Prometheus server sees from each.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from host_daemon.metrics.procfs import GRPC_CORE_THREAD_PREFIXES, ThreadCpuSampler
from workloads.runner import free_port


@dataclass
class Target:
    name: str
    port: int
    process: subprocess.Popen[bytes]


@dataclass
class Summary:
    target: str
    n: int
    median_ms: float
    mean_ms: float
    stdev_ms: float
    mad_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    body_bytes: int


def wait_listening(port: int, process: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"exporter on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listened on port {port} within {seconds} s")


def scrape(port: int) -> tuple[float, int]:
    """One full scrape on a new connection (as Prometheus does by default); seconds and size."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"port {port} answered {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started, len(body)


def summarise(name: str, seconds: list[float], body_bytes: int) -> Summary:
    ms = sorted(s * 1000 for s in seconds)
    median = statistics.median(ms)
    quantiles = statistics.quantiles(ms, n=100)
    return Summary(
        target=name,
        n=len(ms),
        median_ms=median,
        mean_ms=statistics.fmean(ms),
        stdev_ms=statistics.stdev(ms) if len(ms) > 1 else 0.0,
        mad_ms=statistics.median(abs(v - median) for v in ms),
        p90_ms=quantiles[89],
        p99_ms=quantiles[98],
        min_ms=ms[0],
        body_bytes=body_bytes,
    )


def start_targets(node_exporter: str | None) -> list[Target]:
    targets: list[Target] = []
    port = free_port()
    # The real agent, as a guest runs it, serving /metrics beside its gRPC API.
    private = tempfile.mkdtemp(prefix="cvm-scrape-")
    agent = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "cvm-agent"),
            "--listen",
            f"unix://{private}/agent.sock",
            "--metrics-listen",
            f"tcp://127.0.0.1:{port}",
            "--state-dir",
            f"{private}/state",
            "--no-mount-debugfs",
            "--log-level",
            "warning",
        ]
    )
    wait_listening(port, agent)
    targets.append(Target("agent", port, agent))
    if node_exporter:
        for name, extra in (
            ("node-exporter (defaults)", []),
            (
                "node-exporter (cpu, pressure)",
                ["--collector.disable-defaults", "--collector.cpu", "--collector.pressure"],
            ),
        ):
            port = free_port()
            process = subprocess.Popen(
                [node_exporter, f"--web.listen-address=127.0.0.1:{port}", *extra],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_listening(port, process)
            targets.append(Target(name, port, process))
    return targets


def measure_idle_cpu(agent: Target, seconds: float, period: float = 15.0) -> dict[str, float]:
    """CPU the agent used over ``seconds`` with one scrape per ``period``, read per thread in
    nanoseconds (host_daemon.metrics.procfs): process CPU times tick at 10 ms, too coarse here."""
    time.sleep(11)  # trio retires the worker threads the latency runs left idle after 10 s
    sampler = ThreadCpuSampler(agent.process.pid)
    started = time.monotonic()
    next_scrape = started
    scrapes = 0
    while (now := time.monotonic()) - started < seconds:
        if now >= next_scrape:
            scrape(agent.port)
            scrapes += 1
            next_scrape += period
        sampler.sample()
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    used = sampler.seconds()
    return {
        "window_s": elapsed,
        "scrapes": scrapes,
        "cpu_s": used,
        "core_percent": 100 * used / elapsed,
        "grpc_core_percent": 100 * sampler.seconds(GRPC_CORE_THREAD_PREFIXES) / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=300, help="measured scrapes per target")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured scrapes per target first")
    parser.add_argument("--block", type=int, default=10, help="scrapes per target before switching")
    parser.add_argument("--idle-seconds", type=float, default=120.0, help="0 skips the idle-CPU window")
    parser.add_argument("--json", help="write the raw values and summaries here")
    args = parser.parse_args()

    node_exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if node_exporter is None:
        print(
            "prometheus-node-exporter not installed (Debian package prometheus-node-exporter): "
            "measuring the agent alone",
            file=sys.stderr,
        )
    targets = start_targets(node_exporter)
    raw: dict[str, list[float]] = {t.name: [] for t in targets}
    sizes: dict[str, int] = {}
    try:
        for target in targets:
            for _ in range(args.warmup):
                scrape(target.port)
        while any(len(values) < args.scrapes for values in raw.values()):
            for target in targets:
                for _ in range(min(args.block, args.scrapes - len(raw[target.name]))):
                    seconds, size = scrape(target.port)
                    raw[target.name].append(seconds)
                    sizes[target.name] = size
        agent = targets[0]
        rss_mib = psutil.Process(agent.process.pid).memory_info().rss / 2**20
        idle = measure_idle_cpu(agent, args.idle_seconds) if args.idle_seconds > 0 else None
    finally:
        for target in targets:
            target.process.terminate()
        for target in targets:
            try:
                target.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                target.process.kill()

    summaries = [summarise(name, values, sizes[name]) for name, values in raw.items()]
    print(f"{'target':32} {'n':>5} {'median':>9} {'p90':>9} {'p99':>9} {'MAD':>8} {'bytes':>8}")
    for s in summaries:
        print(
            f"{s.target:32} {s.n:5d} {s.median_ms:7.3f}ms {s.p90_ms:7.3f}ms {s.p99_ms:7.3f}ms "
            f"{s.mad_ms:6.3f}ms {s.body_bytes:8d}"
        )
    result: dict[str, Any] = {
        "tool": "benchmarks/scrape.py",
        "arguments": vars(args),
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "node_exporter": node_exporter,
        "summaries": [asdict(s) for s in summaries],
        "raw_seconds": raw,
        "agent_rss_mib": rss_mib,
        "agent_idle": idle,
    }
    if len(summaries) > 1:
        ratio = summaries[0].median_ms / summaries[1].median_ms
        subset = summaries[0].median_ms / summaries[2].median_ms
        result["ratio_median_agent_over_node_exporter"] = ratio
        result["ratio_median_agent_over_node_exporter_subset"] = subset
        print(f"ratio of medians agent / node-exporter (defaults): {ratio:.3f}  (goal <= 1.0)")
        print(f"ratio of medians agent / node-exporter (cpu, pressure): {subset:.3f}")
    print(f"agent RSS: {rss_mib:.1f} MiB  (goal <= 40 MiB)")
    if idle:
        print(
            f"agent idle CPU: {idle['cpu_s']:.3f} s over {idle['window_s']:.0f} s with {idle['scrapes']} "
            f"scrapes = {idle['core_percent']:.3f} % of a core  (goal <= 0.1 %)"
        )
        print(f"  of which grpcio's core threads (idle timers, polling): {idle['grpc_core_percent']:.3f} %")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
