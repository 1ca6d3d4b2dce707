"""The host daemon's gRPC service with nothing to boot: ``python -m tests.spine.storm_hostd STATE SOCK``.

What ``cvm-hostd`` serves, wired as ``host_daemon.main`` wires it (JSON logs, undecodable
requests counted), but with a QEMU binary that does not exist and without the dev guest, so
that a hostile StartVM can reach every check and never a VM. For the storm
(``tests/spine/test_storm.py``) and the property tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from cvmcore.address import UnixAddress
from cvmcore.daemon import run_daemon
from cvmcore.grpc_bridge import UndecodableRequests
from cvmcore.serve import ServerOptions, serve_grpc
from host_daemon.server import HostDaemonService, daemon_handlers
from host_daemon.vms import VMManager

NO_QEMU = "/nonexistent/qemu-system-x86_64"


def main() -> int:
    state_dir, sock = Path(sys.argv[1]), sys.argv[2]
    state_dir.mkdir(parents=True, exist_ok=True)
    options = ServerOptions(
        listen=[UnixAddress(sock)],
        max_receive_bytes=4 * 1024 * 1024,  # as host_daemon.main
        undecodable=UndecodableRequests("cvm_hostd_rpc_undecodable"),
    )

    async def body() -> None:
        manager = VMManager(state_dir, qemu_binary=NO_QEMU)
        service = HostDaemonService(state_dir=state_dir, manager=manager)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            await serve_grpc(daemon_handlers(service), options)
            nursery.cancel_scope.cancel()

    return run_daemon("storm-hostd", argparse.Namespace(log_level="info", log_format="json"), body)


if __name__ == "__main__":
    sys.exit(main())
