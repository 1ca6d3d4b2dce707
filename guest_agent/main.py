"""``cvm-agent``: the guest agent's entry point."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from cvmcore import __version__
from cvmcore.address import VMADDR_CID_HOST, Address, TcpAddress, parse_address
from cvmcore.affinity import choose_cpu, format_cpu_list, parse_cpu_choice, pin_process
from cvmcore.daemon import add_logging_arguments, run_daemon
from cvmcore.defaults import AGENT_VSOCK_PORT
from cvmcore.errors import CvmError, UsageError
from cvmcore.instance import lock_state_dir
from cvmcore.metrics_http import serve_metrics_http
from cvmcore.serve import ServerOptions, serve_grpc
from cvmcore.watchdog import feed_watchdog
from guest_agent.collectors.agent import AgentStats
from guest_agent.collectors.registry import Roots, build_registry
from guest_agent.collectors.swiotlb import mount_debugfs_readonly
from guest_agent.idle_polling import IdlePollingController, Recovery, RecoveryOutcome
from guest_agent.observability import MeteredRelayStats, rpc_observer
from guest_agent.server import GuestAgentService, agent_handlers
from guest_agent.tee import detect_tee, read_boot_messages
from workloads.sandbox import choose as choose_sandbox

log = structlog.get_logger("guest_agent")

DESCRIPTION = """\
The cvmctl guest agent: runs inside a (confidential) VM and answers the host over gRPC:
health, guest facts and the detected TEE, and the features built on them.

In a guest it listens on vsock port 1024 and accepts connections from the host (CID 2)
only. For local use and tests it can listen on a unix socket or TCP instead.
"""

EPILOG = """\
examples:
  cvm-agent                                   # in a guest: vsock://any:1024
  cvm-agent --listen unix:///tmp/agent.sock   # on this machine, for tests and benchmarks
  cvmctl agent health --connect unix:///tmp/agent.sock
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvm-agent",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cvm-agent {__version__}")
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help=f"address to serve on, repeatable (default: vsock://any:{AGENT_VSOCK_PORT}); "
        "unix:///PATH, tcp://HOST:PORT or vsock://any:PORT",
    )
    parser.add_argument(
        "--allow-cid",
        action="append",
        type=int,
        metavar="CID",
        help=f"vsock peer CID allowed to connect, repeatable (default: {VMADDR_CID_HOST}, the host)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="filesystem root whose /proc and /sys the agent reads (default: /)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/cvm-agent"),
        help="where the agent keeps what it must restore after a crash (default: /var/lib/cvm-agent)",
    )
    parser.add_argument(
        "--keep-idle-polling",
        action="store_true",
        help="on start, keep idle-polling changes a previous agent left applied instead of restoring "
        "the originals",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="also serve Prometheus /metrics over HTTP at tcp://HOST:PORT (e.g. tcp://0.0.0.0:9464); "
        "the host can always fetch them with the GetMetrics RPC",
    )
    parser.add_argument(
        "--metrics-interval",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how often the kernel-interface collectors refresh their snapshot (default: 15, "
        "Prometheus' default scrape interval; lower it when scraping more often)",
    )
    parser.add_argument(
        "--no-mount-debugfs",
        action="store_true",
        help="never mount debugfs (read-only) for the swiotlb collector",
    )
    parser.add_argument(
        "--cpu",
        default="auto",
        metavar="auto|all|N",
        help="CPU the agent's threads run on (default: auto, the highest-numbered CPU it may use; "
        "all: no pinning). On one vCPU the agent's internal thread handoffs are context switches "
        "instead of inter-processor interrupts, which cost a VM an exit each. Benchmark servers and "
        "workload commands it starts run on every CPU it was allowed",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=64,
        metavar="N",
        help="RPCs served at once; more are refused with RESOURCE_EXHAUSTED (default: 64)",
    )
    parser.add_argument(
        "--workload-sandbox",
        choices=("auto", "direct", "systemd"),
        default="auto",
        help="where benchmark servers and guest commands run: systemd = each in a transient "
        "cvm-workload-*.service with a sandbox that fits a benchmark (network open, the capabilities "
        "and devices the tools need), direct = as the agent's own children; auto (default) = systemd "
        "when the agent is itself a systemd service, else direct",
    )
    add_logging_arguments(parser)
    return parser


def prepare_state_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot create the state directory {path}: {exc.strerror}") from exc


def report_recovery(recovery: Recovery, stats: AgentStats, state_dir: Path) -> None:
    """Log what start-up recovery did and export it (``cvm_guest_agent_state_recovery``)."""
    discarded = len(recovery.gone) + (recovery.set_aside is not None)
    stats.recovered(str(recovery.outcome), discarded)
    if recovery.outcome is RecoveryOutcome.NOTHING_TO_RECOVER:
        return
    fields = {"outcome": str(recovery.outcome), "state_dir": str(state_dir)}
    if recovery.gone:
        fields["gone"] = ", ".join(recovery.gone)
    if recovery.set_aside is not None:
        fields["set_aside"] = str(recovery.set_aside)
    if recovery.problem:
        fields["problem"] = recovery.problem
    if recovery.outcome in (RecoveryOutcome.DISCARDED, RecoveryOutcome.RESTORE_FAILED):
        log.error("idle_polling_recovery_incomplete", **fields)
    else:
        log.warning("idle_polling_recovered", **fields)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        listen: list[Address] = [
            parse_address(a, listening=True) for a in (args.listen or [f"vsock://any:{AGENT_VSOCK_PORT}"])
        ]
        if args.max_concurrent_rpcs < 1:
            raise UsageError("--max-concurrent-rpcs must be at least 1")
        if not 0.1 <= args.metrics_interval <= 3600:
            raise UsageError("--metrics-interval must be between 0.1 and 3600 seconds")
        metrics_address = parse_address(args.metrics_listen, listening=True) if args.metrics_listen else None
        if metrics_address is not None and not isinstance(metrics_address, TcpAddress):
            raise UsageError(
                f"--metrics-listen {args.metrics_listen}: /metrics is served over tcp://HOST:PORT"
            )
        cpu = choose_cpu(parse_cpu_choice(args.cpu), os.sched_getaffinity(0))
    except CvmError as exc:
        print(f"cvm-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    inherited = pin_process(cpu) if cpu is not None else None
    stats = AgentStats()
    options = ServerOptions(
        listen=listen,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        vsock_allowed_cids=frozenset(args.allow_cid or [VMADDR_CID_HOST]),
        observer=rpc_observer(stats),
        relay_stats=MeteredRelayStats(stats),
        undecodable=stats.undecodable,
    )
    idle_polling = IdlePollingController(args.root, args.state_dir)
    sandbox = choose_sandbox(args.workload_sandbox)

    async def body() -> None:
        if inherited is not None:
            log.info("pinned", cpu=cpu, children_cpus=format_cpu_list(inherited))
        await trio.to_thread.run_sync(prepare_state_dir, args.state_dir)
        # One agent per state directory (two would restore each other's idle-polling
        # originals); the lock lasts as long as this process.
        state_lock = lock_state_dir(args.state_dir, "cvm-agent")
        try:
            await serve()
        finally:
            os.close(state_lock)

    async def serve() -> None:
        recovery = await trio.to_thread.run_sync(lambda: idle_polling.recover(keep=args.keep_idle_polling))
        report_recovery(recovery, stats, args.state_dir)
        if sandbox.systemd:
            from workloads.execute import stop_leftover_units  # only agents under systemd pay for it

            await stop_leftover_units(sandbox)
        log.info("workload_sandbox", mode=sandbox.mode)
        boot_messages = await trio.to_thread.run_sync(read_boot_messages, args.root)
        verdict = detect_tee(args.root, boot_messages)
        registry, refresher = build_registry(
            Roots.under(args.root),
            stats,
            tee=str(verdict.tee),
            mount_debugfs=None if args.no_mount_debugfs or args.root != Path("/") else mount_debugfs_readonly,
            refresh_interval=args.metrics_interval,
        )
        service = GuestAgentService(
            root=args.root,
            detect_tee=lambda: verdict,
            idle_polling=idle_polling,
            metrics=registry,
            workload_sandbox=sandbox,
        )
        async with trio.open_nursery() as nursery:
            # Serve at once; the first snapshot lands moments later (scrapes before it see no
            # kernel-interface samples yet).
            nursery.start_soon(refresher.run)
            nursery.start_soon(feed_watchdog)
            if metrics_address is not None:
                endpoint = await nursery.start(
                    serve_metrics_http, registry, metrics_address.host, metrics_address.port
                )
                log.info("metrics_http", url=endpoint.url)
            await serve_grpc(agent_handlers(service), options)
            nursery.cancel_scope.cancel()

    return run_daemon("cvm-agent", args, body)


if __name__ == "__main__":
    sys.exit(main())
