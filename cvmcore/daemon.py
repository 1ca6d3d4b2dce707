"""What every long-running cvmctl program does the same way: flags, logging, signals.

:func:`run_daemon` runs ``body`` in trio inside a nursery that a SIGTERM or SIGINT
cancels; ``body`` must stop cleanly when cancelled (the grpc server in
:mod:`cvmcore.serve` does, within its stop grace). A :class:`~cvmcore.errors.CvmError`
at start-up (bad address, socket in use) becomes one line on stderr and its exit code.

Before anything else it raises its soft limit on open files to the hard limit
(:func:`raise_fd_limit`). The soft default, 1024, dates from ``select(2)``'s fixed-size
sets, which nothing here uses (trio waits with epoll); systemd leaves services a hard limit
of 524288 for this very step (systemd.exec(5), ``LimitNOFILE=``). A daemon that serves
connections would otherwise stop accepting, and fail to open its own files, at about a
thousand idle peers.
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
from collections.abc import Awaitable, Callable

import structlog
import trio

from cvmcore.errors import CvmError
from cvmcore.log import LEVELS, configure_logging

log = structlog.get_logger("cvmcore.daemon")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LEVELS, default="info", help="least severe level logged")
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="auto: JSON lines when stderr is not a terminal, readable console otherwise",
    )


async def _cancel_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal", signal=signal.Signals(signum).name)
            cancel_scope.cancel()
            return


def first_cvm_error(exc: BaseException) -> CvmError | None:
    """The CvmError in ``exc``, looking inside the exception groups that nurseries raise."""
    if isinstance(exc, CvmError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_cvm_error(inner)
            if found is not None:
                return found
    return None


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def run_daemon(prog: str, args: argparse.Namespace, body: Callable[[], Awaitable[None]]) -> int:
    configure_logging(args.log_level, args.log_format)
    before, after = raise_fd_limit()
    if after != before:
        log.info("open_files_limit_raised", soft_before=before, soft=after)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            await body()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except Exception as exc:
        error = first_cvm_error(exc)
        if error is None:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    log.info("stopped")
    return 0
