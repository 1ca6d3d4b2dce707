"""Unary RPC latency: a plain grpcio server vs the agent's trio bridge, side by side.

Both servers run as separate processes on unix sockets in the same run and answer the
same GetInfo (same work: read /proc, detect the TEE); the client alternates between them
in blocks so that machine noise falls on both. Also: time from exec to SERVING and the
agent's resident memory after start.

The agent keeps its threads on one CPU by default (``--cpu auto``, see cvmcore.affinity).
So plain grpcio and the agent each run pinned to that CPU and on all CPUs. The goal is
judged like with like (both pinned); the unpinned pair shows the same ratio as people run
plain grpcio by default, and what the pinning is worth here. A fifth server, plain
grpc.aio pinned, shows what grpc.aio's own machinery costs per call (the agent serves with
it), and a last window measures the pinned plain servers and the agent idle, side by side:
what grpc.aio buys back (cvmctl/grpc_bridge.py explains the choice).

    .venv/bin/python benchmarks/rpc_latency.py [--calls 1000] [--idle-seconds 60]

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
from host_daemon.metrics.procfs import ThreadCpuSampler

BIN = Path(sys.executable).parent

PLAIN_SERVER = """
import os, signal, sys
if sys.argv[2] != "all":
    os.sched_setaffinity(0, {int(sys.argv[2])})
from pathlib import Path
import grpc
from cvm.v1 import agent_pb2_grpc
from guest_agent.server import GuestInfo
from guest_agent.tee import detect_tee

# The same answer-building code as the agent's, minus the trio bridge.
INFO = GuestInfo(Path("/"), lambda: detect_tee(Path("/")))

if sys.argv[3] == "sync":
    from concurrent.futures import ThreadPoolExecutor

    class Plain(agent_pb2_grpc.GuestAgentServicer):
        def GetInfo(self, request, context):
            return INFO.response()

    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    agent_pb2_grpc.add_GuestAgentServicer_to_server(Plain(), server)
    server.add_insecure_port("unix:" + sys.argv[1])
    server.start()
    signal.pause()  # not wait_for_termination(), which polls 10 times a second
else:
    import asyncio
    import grpc.aio

    class PlainAio(agent_pb2_grpc.GuestAgentServicer):
        async def GetInfo(self, request, context):
            return INFO.response()

    async def serve():
        server = grpc.aio.server()
        agent_pb2_grpc.add_GuestAgentServicer_to_server(PlainAio(), server)
        server.add_insecure_port("unix:" + sys.argv[1])
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())
"""


PLAIN = "plain grpcio, one CPU"
PLAIN_AIO = "plain grpc.aio, one CPU"
AGENT = "agent (default: one CPU)"
PLAIN_SPREAD = "plain grpcio, all CPUs"
SPREAD = "agent, all CPUs (--cpu all)"


def start_plain(sock: str, cpu: str, flavour: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, sock, cpu, flavour])


def measure_idle(processes: dict[str, subprocess.Popen[bytes]], seconds: float) -> dict[str, float]:
    """Each process's CPU over the same ``seconds`` with no calls, as % of a core."""
    if seconds <= 0:
        return {}
    time.sleep(11)  # trio retires idle worker threads after 10 s; let the runs' ones go
    samplers = {name: ThreadCpuSampler(process.pid) for name, process in processes.items()}
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(1)
        for sampler in samplers.values():
            sampler.sample()
    elapsed = time.monotonic() - started
    return {name: 100 * sampler.seconds() / elapsed for name, sampler in samplers.items()}


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
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=60.0,
        help="then measure the pinned servers' CPU while idle, side by side (default 60; 0 skips)",
    )
    args = parser.parse_args()

    agent_cpu = max(os.sched_getaffinity(0))  # what the agent's --cpu auto picks
    with tempfile.TemporaryDirectory() as tmp:
        plain_sock, agent_sock = f"{tmp}/plain.sock", f"{tmp}/agent.sock"
        plain_spread_sock, spread_sock = f"{tmp}/plain-spread.sock", f"{tmp}/spread.sock"
        plain_aio_sock = f"{tmp}/plain-aio.sock"
        exec_started = time.perf_counter()
        agent = start_agent(agent_sock, tmp, "auto")
        while not Path(agent_sock).exists():
            time.sleep(0.002)
        wait_serving(f"unix:{agent_sock}")
        exec_to_serving = time.perf_counter() - exec_started
        memory = psutil.Process(agent.pid).memory_full_info()
        rss_mib, uss_mib = memory.rss / 2**20, memory.uss / 2**20
        plain = start_plain(plain_sock, str(agent_cpu), "sync")
        plain_aio = start_plain(plain_aio_sock, str(agent_cpu), "aio")
        plain_spread = start_plain(plain_spread_sock, "all", "sync")
        spread = start_agent(spread_sock, tmp, "all")
        servers = (agent, plain, plain_aio, plain_spread, spread)
        try:
            for sock in (plain_sock, plain_aio_sock, plain_spread_sock, spread_sock):
                while not Path(sock).exists():
                    time.sleep(0.002)
            stubs = {}
            for name, sock in (
                (PLAIN, plain_sock),
                (PLAIN_AIO, plain_aio_sock),
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
            idle = measure_idle({PLAIN: plain, PLAIN_AIO: plain_aio, AGENT: agent}, args.idle_seconds)
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
    print(
        f"  (grpc.aio's own machinery: plain grpc.aio / plain grpcio = {medians[PLAIN_AIO] / plain_p50:.2f}; "
        f"the agent serves with grpc.aio, see cvmctl/grpc_bridge.py)"
    )
    report("agent p50", f"{agent_p50 * 1e3:.3f} ms", "<= 0.5 ms", agent_p50 <= 0.5e-3)
    report("exec -> SERVING", f"{exec_to_serving:.3f} s", "<= 0.8 s", exec_to_serving <= 0.8)
    report("agent RSS after start", f"{rss_mib:.1f} MiB", "<= 40 MiB", rss_mib <= 40)
    print(f"  (private to the agent, USS: {uss_mib:.1f} MiB; the rest is shared library text)")
    if idle:
        print(f"idle, no calls, {args.idle_seconds:.0f} s side by side, % of a core:")
        for name, percent in idle.items():
            print(f"  {name:<28} {percent:.3f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
