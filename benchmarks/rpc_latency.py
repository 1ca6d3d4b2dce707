"""Unary RPC latency: a plain grpcio server vs the agent's trio bridge, side by side.

Both servers run as separate processes on unix sockets in the same run and answer the
same GetInfo (same work: read /proc, detect the TEE); the client alternates between them
in blocks so that machine noise falls on both. Also: time from exec to SERVING and the
agent's resident memory after start.

The agent keeps its threads on one CPU by default (``--cpu auto``, see cvmctl.affinity).
So four servers run: plain grpcio and the agent, each pinned to that CPU and each on all
CPUs. The goal is judged like with like (both pinned); the unpinned pair shows the same
ratio as people run plain grpcio by default, and what the pinning is worth here.

    .venv/bin/python benchmarks/rpc_latency.py [--calls 1000]

Goals (issue 2): ratio of medians <= 1.3, agent p50 <= 0.5 ms, exec -> SERVING <= 0.8 s,
RSS <= 40 MiB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cvm.v1 import agent_pb2, agent_pb2_grpc

BIN = Path(sys.executable).parent

PLAIN_SERVER = """
import os, sys, time
if sys.argv[2] != "all":
    os.sched_setaffinity(0, {int(sys.argv[2])})
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import grpc
from cvm.v1 import agent_pb2_grpc
from guest_agent.server import GuestInfo
from guest_agent.tee import detect_tee

# The same answer-building code as the agent's, minus the trio bridge.
INFO = GuestInfo(Path("/"), lambda: detect_tee(Path("/")))

class Plain(agent_pb2_grpc.GuestAgentServicer):
    def GetInfo(self, request, context):
        return INFO.response()

server = grpc.server(ThreadPoolExecutor(max_workers=16))
agent_pb2_grpc.add_GuestAgentServicer_to_server(Plain(), server)
server.add_insecure_port("unix:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""


PLAIN = "plain grpcio, one CPU"
AGENT = "agent (default: one CPU)"
PLAIN_SPREAD = "plain grpcio, all CPUs"
SPREAD = "agent, all CPUs (--cpu all)"


def start_agent(sock: str, tmp: str, cpu: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(BIN / "cvm-agent"),
            "--listen",
            f"unix://{sock}",
            "--cpu",
            cpu,
            "--log-level",
            "warning",
            "--no-mount-debugfs",
            "--state-dir",
            f"{tmp}/state-{cpu}",
        ],
        stderr=subprocess.DEVNULL,
    )


def wait_serving(target: str, seconds: float = 20) -> float:
    """Seconds until the health check answers SERVING."""
    started = time.perf_counter()
    channel = grpc.insecure_channel(target)
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                channel.close()
                return time.perf_counter() - started
        except grpc.RpcError:
            if time.perf_counter() - started > seconds:
                raise
            time.sleep(0.005)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(what: str, value: str, goal: str, met: bool) -> None:
    print(f"{what}: {value}   goal {goal}   {'ok' if met else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="calls per server (default 1000)")
    parser.add_argument("--block", type=int, default=50, help="calls per block before switching server")
    args = parser.parse_args()

    agent_cpu = max(os.sched_getaffinity(0))  # what the agent's --cpu auto picks
    with tempfile.TemporaryDirectory() as tmp:
        plain_sock, agent_sock = f"{tmp}/plain.sock", f"{tmp}/agent.sock"
        plain_spread_sock, spread_sock = f"{tmp}/plain-spread.sock", f"{tmp}/spread.sock"
        exec_started = time.perf_counter()
        agent = start_agent(agent_sock, tmp, "auto")
        while not Path(agent_sock).exists():
            time.sleep(0.002)
        wait_serving(f"unix:{agent_sock}")
        exec_to_serving = time.perf_counter() - exec_started
        memory = psutil.Process(agent.pid).memory_full_info()
        rss_mib, uss_mib = memory.rss / 2**20, memory.uss / 2**20
        plain = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, plain_sock, str(agent_cpu)])
        plain_spread = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, plain_spread_sock, "all"])
        spread = start_agent(spread_sock, tmp, "all")
        servers = (agent, plain, plain_spread, spread)
        try:
            for sock in (plain_sock, plain_spread_sock, spread_sock):
                while not Path(sock).exists():
                    time.sleep(0.002)
            stubs = {}
            for name, sock in (
                (PLAIN, plain_sock),
                (AGENT, agent_sock),
                (PLAIN_SPREAD, plain_spread_sock),
                (SPREAD, spread_sock),
            ):
                channel = grpc.insecure_channel(f"unix:{sock}")
                stub = agent_pb2_grpc.GuestAgentStub(channel)
                for _ in range(50):  # warm-up: connection, thread pool, caches
                    stub.GetInfo(agent_pb2.GetInfoRequest(), timeout=5, wait_for_ready=True)
                stubs[name] = stub
            samples: dict[str, list[float]] = {name: [] for name in stubs}
            request = agent_pb2.GetInfoRequest()
            while any(len(v) < args.calls for v in samples.values()):
                for name, stub in stubs.items():
                    for _ in range(min(args.block, args.calls - len(samples[name]))):
                        started = time.perf_counter()
                        stub.GetInfo(request, timeout=5)
                        samples[name].append(time.perf_counter() - started)
        finally:
            for process in servers:
                process.terminate()
            for process in servers:
                process.wait(10)

    print(f"servers pinned to CPU {agent_cpu} unless marked 'all CPUs'")
    print(f"{'server':<30} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    medians = {}
    for name, values in samples.items():
        medians[name] = statistics.median(values)
        print(
            f"{name:<30} {len(values):>6} {medians[name] * 1e3:>8.3f} "
            f"{percentile(values, 0.99) * 1e3:>8.3f} {statistics.fmean(values) * 1e3:>8.3f}"
        )
    plain_p50, agent_p50 = medians[PLAIN], medians[AGENT]
    ratio = agent_p50 / plain_p50
    report("ratio of medians (agent / plain)", f"{ratio:.2f}", "<= 1.3", ratio <= 1.3)
    print(
        f"  (both on all CPUs: {medians[SPREAD] / medians[PLAIN_SPREAD]:.2f}; "
        f"the agent as shipped / plain grpcio as people run it: {agent_p50 / medians[PLAIN_SPREAD]:.2f}; "
        f"pinning takes the agent from {medians[SPREAD] * 1e3:.3f} to {agent_p50 * 1e3:.3f} ms)"
    )
    report("agent p50", f"{agent_p50 * 1e3:.3f} ms", "<= 0.5 ms", agent_p50 <= 0.5e-3)
    report("exec -> SERVING", f"{exec_to_serving:.3f} s", "<= 0.8 s", exec_to_serving <= 0.8)
    report("agent RSS after start", f"{rss_mib:.1f} MiB", "<= 40 MiB", rss_mib <= 40)
    print(f"  (private to the agent, USS: {uss_mib:.1f} MiB; the rest is shared library text)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
