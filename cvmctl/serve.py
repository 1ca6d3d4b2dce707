"""Running a gRPC server inside a trio program: the part both daemons share.

:func:`serve_grpc` owns one grpcio server for the lifetime of its task:

1. builds the servicers' handlers with a :class:`~cvmctl.grpc_bridge.GrpcBridge` bound to
   the current trio run, plus the standard health service (grpc.health.v1);
2. binds every listen address: ``unix://`` and ``tcp://`` directly in grpcio,
   ``vsock://`` through a private unix socket and an AF_VSOCK relay task that accepts
   only the allowed peer CIDs (by default the host, CID 2);
3. marks every service SERVING, tells systemd ``READY=1`` and hands the bound addresses
   to the caller through ``task_status``;
4. on cancellation (SIGTERM in the programs) marks NOT_SERVING, tells systemd
   ``STOPPING=1`` and stops grpcio *off* the trio thread (its handlers need the trio
   thread to finish), bounded by ``stop_grace + 1`` seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import structlog
import trio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cvmctl import sdnotify
from cvmctl.address import (
    VMADDR_CID_HOST,
    Address,
    HybridVsockAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
)
from cvmctl.errors import UsageError
from cvmctl.grpc_bridge import GrpcBridge, RpcObserver
from cvmctl.relay import (
    RelayStats,
    dialer_for,
    open_vsock_listener,
    remove_stale_socket,
    serve_relay,
    vsock_peer_filter,
)

log = structlog.get_logger("cvmctl.serve")

MiB: Final = 1024 * 1024


@dataclass
class ServerOptions:
    listen: Sequence[Address]
    max_workers: int = 16
    #: Largest request accepted. The agent keeps this small: its peer (the host) is untrusted.
    max_receive_bytes: int = 1 * MiB
    max_send_bytes: int = 64 * MiB
    max_rpc_seconds: float = 60.0
    stop_grace: float = 3.0
    unix_socket_mode: int = 0o660
    vsock_allowed_cids: frozenset[int] = frozenset({VMADDR_CID_HOST})
    observer: RpcObserver | None = None
    relay_stats: RelayStats = field(default_factory=RelayStats)


HandlerFactory = Callable[[GrpcBridge], Iterable[tuple[str, "grpc.GenericRpcHandler[Any, Any]"]]]


def _check_listen(address: Address) -> None:
    if isinstance(address, HybridVsockAddress):
        raise UsageError(
            f"cannot listen on {address}: hybrid vsock is the host side of a VM's socket; "
            "an agent in the guest listens on vsock://any:PORT"
        )


async def serve_grpc(
    make_handlers: HandlerFactory,
    options: ServerOptions,
    *,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started()`` gets the bound addresses."""
    for address in options.listen:
        _check_listen(address)
    bridge = GrpcBridge(
        trio.lowlevel.current_trio_token(),
        max_rpc_seconds=options.max_rpc_seconds,
        observer=options.observer,
    )
    server = grpc.server(
        ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", options.max_receive_bytes),
            ("grpc.max_send_message_length", options.max_send_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=options.max_workers * 4,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = []
    for name, handler in make_handlers(bridge):
        server.add_generic_rpc_handlers((handler,))
        service_names.append(name)

    private_dir = tempfile.mkdtemp(prefix="cvm-grpc-")
    bound: list[Address] = []
    vsock_backends: list[tuple[VsockAddress, str]] = []
    try:
        for address in options.listen:
            match address:
                case UnixAddress(path=path):
                    remove_stale_socket(path)
                    _add_port(server, address, address.grpc_target())
                    bound.append(address)
                case TcpAddress(host=host):
                    port = _add_port(server, address, address.grpc_target())
                    bound.append(TcpAddress(host, port))
                case VsockAddress():
                    backend = os.path.join(private_dir, f"vsock-{address.port}.sock")
                    _add_port(server, address, f"unix:{backend}")
                    vsock_backends.append((address, backend))
                    bound.append(address)
        server.start()
        for address in bound:
            if isinstance(address, UnixAddress):
                os.chmod(address.path, options.unix_socket_mode)

        async with trio.open_nursery() as nursery:
            for address, backend in vsock_backends:
                listener = open_vsock_listener(address.port, address.cid)
                await nursery.start(
                    _serve_vsock_relay, listener, backend, options.relay_stats, options.vsock_allowed_cids
                )
            for name in ["", *service_names]:
                health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            sdnotify.notify("READY=1", f"STATUS=serving on {', '.join(map(str, bound))}")
            log.info("serving", listen=[str(a) for a in bound], services=service_names)
            task_status.started(bound)
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await _stop(server, health_servicer, options.stop_grace)
                nursery.cancel_scope.cancel()
    finally:
        server.stop(None)
        shutil.rmtree(private_dir, ignore_errors=True)
        for address in bound:
            if isinstance(address, UnixAddress) and os.path.exists(address.path):
                os.unlink(address.path)


async def _serve_vsock_relay(
    listener: trio.SocketListener,
    backend: str,
    stats: RelayStats,
    allowed_cids: frozenset[int],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_relay(
        listener,
        dialer_for(UnixAddress(backend)),
        stats,
        allow_peer=vsock_peer_filter(allowed_cids),
        task_status=task_status,
    )


def _add_port(server: grpc.Server, address: Address, target: str) -> int:
    try:
        port = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise UsageError(f"cannot listen on {address}: {exc}") from exc
    if port == 0 and not isinstance(address, TcpAddress):
        return 0
    if port == 0:
        raise UsageError(f"cannot listen on {address}: the address is in use or not local")
    return port


async def _stop(server: grpc.Server, health_servicer: health.HealthServicer, grace: float) -> None:
    health_servicer.enter_graceful_shutdown()
    sdnotify.notify("STOPPING=1")
    log.info("stopping", grace_seconds=grace)
    with trio.move_on_after(grace + 1.0):
        await trio.to_thread.run_sync(lambda: server.stop(grace).wait(), abandon_on_cancel=True)
