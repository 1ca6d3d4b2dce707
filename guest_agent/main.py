"""``cvm-agent``: the guest agent's entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from cvmctl import __version__
from cvmctl.address import DEFAULT_AGENT_VSOCK_PORT, VMADDR_CID_HOST, Address, parse_address
from cvmctl.daemon import add_logging_arguments, run_daemon
from cvmctl.errors import CvmError, UsageError
from cvmctl.serve import ServerOptions, serve_grpc
from guest_agent.idle_polling import IdlePollingController, RecoveryOutcome
from guest_agent.server import GuestAgentService, agent_handlers
from guest_agent.tee import detect_tee

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
        help=f"address to serve on, repeatable (default: vsock://any:{DEFAULT_AGENT_VSOCK_PORT}); "
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
    parser.add_argument("--max-workers", type=int, default=16, help="concurrent RPCs (default: 16)")
    add_logging_arguments(parser)
    return parser


def prepare_state_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot create the state directory {path}: {exc.strerror}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        listen: list[Address] = [
            parse_address(a, listening=True)
            for a in (args.listen or [f"vsock://any:{DEFAULT_AGENT_VSOCK_PORT}"])
        ]
        if args.max_workers < 1:
            raise UsageError("--max-workers must be at least 1")
    except CvmError as exc:
        print(f"cvm-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    options = ServerOptions(
        listen=listen,
        max_workers=args.max_workers,
        vsock_allowed_cids=frozenset(args.allow_cid or [VMADDR_CID_HOST]),
    )
    idle_polling = IdlePollingController(args.root, args.state_dir)

    async def body() -> None:
        await trio.to_thread.run_sync(prepare_state_dir, args.state_dir)
        outcome = await trio.to_thread.run_sync(lambda: idle_polling.recover(keep=args.keep_idle_polling))
        if outcome is not RecoveryOutcome.NOTHING_TO_RECOVER:
            log.warning("idle_polling_recovered", outcome=str(outcome), state_dir=str(args.state_dir))
        service = GuestAgentService(
            root=args.root, detect_tee=lambda: detect_tee(args.root), idle_polling=idle_polling
        )
        await serve_grpc(agent_handlers(service), options)

    return run_daemon("cvm-agent", args, body)


if __name__ == "__main__":
    sys.exit(main())
