"""``cvm-hostd``: the host daemon's entry point."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from cvmcore import __version__
from cvmcore.address import Address, UnixAddress, parse_address
from cvmcore.daemon import add_logging_arguments, run_daemon
from cvmcore.defaults import HOSTD_ADDRESS
from cvmcore.errors import CvmError, UsageError
from cvmcore.grpc_bridge import UndecodableRequests
from cvmcore.instance import lock_state_dir
from cvmcore.serve import ServerOptions, serve_grpc
from cvmcore.watchdog import feed_watchdog
from host_daemon.debimage import complete_with_debian_image
from host_daemon.devguest import complete_with_dev_guest, dev_guest_image
from host_daemon.metrics.wiring import serve_host_metrics
from host_daemon.server import HostDaemonService, daemon_handlers
from host_daemon.spec import VMSpec
from host_daemon.vms import DEFAULT_BOOT_SECONDS, VMManager

log = structlog.get_logger("host_daemon")

DEFAULT_STATE_DIR = Path("/var/lib/cvm-hostd")
DEFAULT_LISTEN = HOSTD_ADDRESS

DESCRIPTION = """\
The cvmctl host daemon: launches and watches normal, SEV-SNP and TDX guests under
QEMU/KVM, measures their boot, and reaches the agent inside each over vsock.
The cvmctl CLI talks to it over a unix socket (mode 0660).
"""

EPILOG = f"""\
examples:
  cvm-hostd                                            # {DEFAULT_LISTEN}
  cvm-hostd --state-dir ~/.local/state/cvm-hostd --listen unix:///tmp/hostd.sock
"""


def complete_spec(spec: VMSpec) -> VMSpec:
    """A spec's image made concrete: the Debian guest's files, else the dev guest's (see each)."""
    return complete_with_dev_guest(complete_with_debian_image(spec))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvm-hostd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cvm-hostd {__version__}")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where VM state, consoles and the database live (default: {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help=f"API address, repeatable (default: {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="serve Prometheus /metrics (host side), /metrics/vm/NAME (each guest's, relayed) and "
        "/sd (http_sd targets) at tcp://HOST:PORT, e.g. tcp://127.0.0.1:9465; default: off",
    )
    parser.add_argument(
        "--libvirt",
        metavar="URI",
        help="also follow every domain of this libvirt connection in /metrics, read-only "
        "(e.g. qemu:///system; needs the libvirt extra: pip install 'cvmctl[libvirt]'); "
        "with --metrics-listen only; default: off",
    )
    parser.add_argument(
        "--qemu", default="qemu-system-x86_64", metavar="BINARY", help="the QEMU binary (default: from PATH)"
    )
    parser.add_argument(
        "--boot-timeout",
        type=float,
        default=DEFAULT_BOOT_SECONDS,
        metavar="SECONDS",
        help=f"how long a VM may take from QEMU's start to its agent answering before it is reported "
        f"not ready (default: {DEFAULT_BOOT_SECONDS:g}; a systemd guest under TCG on a loaded host "
        "needs more)",
    )
    add_logging_arguments(parser)
    return parser


async def prewarm_dev_guest() -> None:
    """Find (or build) the dev guest now, so the first start does not pay for it."""
    try:
        image = await trio.to_thread.run_sync(dev_guest_image)
    except CvmError as exc:
        log.info("dev_guest_unavailable", reason=str(exc))
        return
    log.info("dev_guest_ready", kernel=image.kernel_release, cached=image.cached)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        listen: list[Address] = [parse_address(a, listening=True) for a in (args.listen or [DEFAULT_LISTEN])]
        state_dir: Path = args.state_dir.expanduser().resolve()
        if not 1 <= args.boot_timeout <= 86400:
            raise UsageError(f"--boot-timeout {args.boot_timeout:g}: expected 1 to 86400 seconds")
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            for address in listen:
                if isinstance(address, UnixAddress):
                    os.makedirs(os.path.dirname(address.path), mode=0o750, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {exc.filename}: {exc.strerror}") from exc
        # One daemon per state directory: a second would manage the same QEMU processes.
        # Held (by this descriptor) until the process ends.
        state_lock = lock_state_dir(state_dir, "cvm-hostd")
    except CvmError as exc:
        print(f"cvm-hostd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.libvirt and not args.metrics_listen:
        print(
            "cvm-hostd: error: --libvirt needs --metrics-listen (its domains are shown in /metrics)",
            file=sys.stderr,
        )
        return UsageError.exit_code
    undecodable = UndecodableRequests("cvm_hostd_rpc_undecodable")
    options = ServerOptions(listen=listen, max_receive_bytes=4 * 1024 * 1024, undecodable=undecodable)

    async def body() -> None:
        manager = VMManager(
            state_dir, qemu_binary=args.qemu, dev_guest=complete_spec, boot_seconds=args.boot_timeout
        )
        service = HostDaemonService(state_dir=state_dir, manager=manager)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            nursery.start_soon(feed_watchdog)
            nursery.start_soon(prewarm_dev_guest)
            if args.metrics_listen:
                serve = functools.partial(
                    serve_host_metrics,
                    manager,
                    args.metrics_listen,
                    libvirt=args.libvirt,
                    extra=[undecodable],
                )
                await nursery.start(serve)
            await serve_grpc(daemon_handlers(service), options)
            nursery.cancel_scope.cancel()

    try:
        return run_daemon("cvm-hostd", args, body)
    finally:
        os.close(state_lock)


if __name__ == "__main__":
    sys.exit(main())
