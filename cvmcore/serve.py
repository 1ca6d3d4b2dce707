"""Running a gRPC server inside a trio program: the part both daemons share.

:func:`serve_grpc` owns one grpc.aio server, on an asyncio loop of its own thread, for
the lifetime of its task (see :mod:`cvmcore.grpc_bridge` for why asyncio and not grpcio's
synchronous server):

1. builds the servicers' handlers with a :class:`~cvmcore.grpc_bridge.GrpcBridge` bound to
   the current trio run, plus the standard health service (grpc.health.v1);
2. binds every listen address: ``unix://`` and ``tcp://`` directly in grpcio,
   ``vsock://`` through a private unix socket and an AF_VSOCK relay task that accepts
   only the allowed peer CIDs (by default the host, CID 2);
3. marks every service SERVING, tells systemd ``READY=1`` and hands the bound addresses
   to the caller through ``task_status``;
4. on cancellation (SIGTERM in the programs) marks NOT_SERVING, tells systemd
   ``STOPPING=1`` and stops the server with ``stop_grace`` seconds for calls in progress
   (their trio work keeps running meanwhile), bounded by ``stop_grace + 1`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeAlias, TypeVar

import grpc
import grpc.aio
import structlog
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # untyped in grpc-stubs

from cvmcore import sdnotify
from cvmcore.address import (
    VMADDR_CID_HOST,
    Address,
    HybridVsockAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
)
from cvmcore.errors import UsageError
from cvmcore.grpc_bridge import GrpcBridge, RpcObserver, UndecodableRequests
from cvmcore.instance import PrivateDirectory
from cvmcore.relay import (
    FIRST_BYTE_SECONDS,
    RelayStats,
    dialer_for,
    open_vsock_listener,
    remove_stale_socket,
    serve_relay,
    vsock_peer_filter,
)

log = structlog.get_logger("cvmcore.serve")

MiB: Final = 1024 * 1024

T = TypeVar("T")


@dataclass
class ServerOptions:
    listen: Sequence[Address]
    #: RPCs in progress at once; more are answered RESOURCE_EXHAUSTED at once.
    max_concurrent_rpcs: int = 64
    #: Largest request accepted. The agent keeps this small: its peer (the host) is untrusted.
    max_receive_bytes: int = 1 * MiB
    max_send_bytes: int = 64 * MiB
    max_rpc_seconds: float = 60.0
    stop_grace: float = 3.0
    unix_socket_mode: int = 0o660
    vsock_allowed_cids: frozenset[int] = frozenset({VMADDR_CID_HOST})
    observer: RpcObserver | None = None
    relay_stats: RelayStats = field(default_factory=RelayStats)
    #: requests whose bytes did not decode, per method (a daemon exports the counts)
    undecodable: UndecodableRequests = field(default_factory=UndecodableRequests)


GenericHandler: TypeAlias = "grpc.GenericRpcHandler[Any, Any]"
HandlerFactory = Callable[[GrpcBridge], Iterable[tuple[str, GenericHandler]]]


def _check_listen(address: Address) -> None:
    if isinstance(address, HybridVsockAddress):
        raise UsageError(
            f"cannot listen on {address}: hybrid vsock is the host side of a VM's socket; "
            "an agent in the guest listens on vsock://any:PORT"
        )


class _AsyncioThread:
    """An asyncio event loop on a thread of its own, where grpc.aio runs.

    trio owns the main thread; grpc.aio needs asyncio. Each side talks to the other only
    through the other's thread-safe entry (``call_soon_threadsafe``, trio's token).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="grpc-asyncio", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # Whatever is left (a call cancelled mid-way, a stop cut short) ends here, on
            # its own loop, before the loop closes under it.
            leftovers = asyncio.all_tasks(self.loop)
            for task in leftovers:
                task.cancel()
            with suppress(Exception):
                self.loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self) -> None:
        self._thread.start()

    async def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the asyncio loop; its result, awaited from trio.

        Cancelling the trio side cancels the coroutine (without waiting for it to end).
        """
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    async def stop(self, seconds: float) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        with trio.move_on_after(seconds):
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)


class _AsyncHealth(Protocol):
    """What serve_grpc uses of grpc_health's asyncio HealthServicer."""

    async def set(self, service: str, status: int) -> None: ...
    async def enter_graceful_shutdown(self) -> None: ...


@dataclass
class _Serving:
    """What :func:`_start_server` made, filled in as it goes so that :func:`serve_grpc` can
    undo it all whatever failed: a later address that will not bind, a SIGTERM mid-start."""

    server: grpc.aio.Server | None = None
    health: _AsyncHealth | None = None
    bound: list[Address] = field(default_factory=list)
    vsock_backends: list[tuple[VsockAddress, str]] = field(default_factory=list)
    stopped: bool = False


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
        undecodable=options.undecodable,
    )
    handlers = list(make_handlers(bridge))
    # The vsock backends' sockets; a killed server's directory is removed by the next one.
    private = PrivateDirectory("cvm-grpc-")
    private_dir = str(private.path)
    asyncio_thread = _AsyncioThread()
    asyncio_thread.start()
    serving = _Serving()
    try:
        await asyncio_thread.call(_start_server(options, handlers, private_dir, serving))
        assert serving.server is not None and serving.health is not None
        async with trio.open_nursery() as nursery:
            for address, backend in serving.vsock_backends:
                listener = open_vsock_listener(address.port, address.cid)
                await nursery.start(
                    _serve_vsock_relay, listener, backend, options.relay_stats, options.vsock_allowed_cids
                )
            await asyncio_thread.call(_set_serving(serving.health, [name for name, _ in handlers]))
            sdnotify.notify("READY=1", f"STATUS=serving on {', '.join(map(str, serving.bound))}")
            log.info(
                "serving", listen=[str(a) for a in serving.bound], services=[name for name, _ in handlers]
            )
            task_status.started(list(serving.bound))
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    sdnotify.notify("STOPPING=1")
                    log.info("stopping", grace_seconds=options.stop_grace)
                    with trio.move_on_after(options.stop_grace + 1.0):
                        await asyncio_thread.call(_stop_server(serving, options.stop_grace))
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if serving.server is not None and not serving.stopped:  # start failed, or stop ran late
                with trio.move_on_after(1.0):
                    await asyncio_thread.call(serving.server.stop(None))
            await asyncio_thread.stop(1.0)
        private.cleanup()
        for address in serving.bound:
            if isinstance(address, UnixAddress) and os.path.exists(address.path):
                os.unlink(address.path)


async def _start_server(
    options: ServerOptions, handlers: list[tuple[str, GenericHandler]], private_dir: str, serving: _Serving
) -> None:
    """On the asyncio thread: build, bind and start the grpc.aio server, into ``serving``."""
    server = serving.server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", options.max_receive_bytes),
            ("grpc.max_send_message_length", options.max_send_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
    )
    health_servicer = serving.health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers([handler for _, handler in handlers])
    for address in options.listen:
        match address:
            case UnixAddress(path=path):
                remove_stale_socket(path)
                _add_unix_port(server, address, options.unix_socket_mode)
                serving.bound.append(address)
            case TcpAddress(host=host):
                port = _add_port(server, address, address.grpc_target())
                serving.bound.append(TcpAddress(host, port))
            case VsockAddress():
                backend = os.path.join(private_dir, f"vsock-{address.port}.sock")
                _add_port(server, address, f"unix:{backend}")
                serving.vsock_backends.append((address, backend))
                serving.bound.append(address)
    await server.start()


async def _set_serving(health_servicer: _AsyncHealth, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def _stop_server(serving: _Serving, grace: float) -> None:
    """On the asyncio thread: NOT_SERVING, then stop; calls still running after ``grace`` are
    cancelled, which cancels their trio work."""
    assert serving.server is not None and serving.health is not None
    await serving.health.enter_graceful_shutdown()
    await serving.server.stop(grace)
    serving.stopped = True


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
        first_byte_timeout=FIRST_BYTE_SECONDS,  # gRPC clients send their preface at once
        task_status=task_status,
    )


#: The longest unix socket path (``sun_path`` is 108 bytes with its terminating NUL).
UNIX_PATH_MAX: Final = 107


def _add_unix_port(server: grpc.aio.Server, address: UnixAddress, mode: int) -> None:
    """Bind ``address`` so that its file appears with ``mode`` already set.

    grpc-core creates the socket file when the port is added, with the process umask; it is
    created under a staging name, given its mode and renamed into place, so nobody sees (or
    connects through) a wider mode. The umask is not narrowed instead: it is process-wide, and
    other threads may be creating files meanwhile. A path too long for the staging name is
    bound directly and given its mode just after.
    """
    staging = f"{address.path}.{os.getpid()}"
    if len(staging.encode()) > UNIX_PATH_MAX:
        _add_port(server, address, address.grpc_target())
        os.chmod(address.path, mode)
        return
    with suppress(FileNotFoundError):
        os.unlink(staging)  # a previous run with this pid left it
    _add_port(server, address, f"unix:{staging}")
    os.chmod(staging, mode)
    os.replace(staging, address.path)


def _add_port(server: grpc.aio.Server, address: Address, target: str) -> int:
    try:
        port = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise UsageError(f"cannot listen on {address}: {exc}") from exc
    if port == 0 and not isinstance(address, TcpAddress):
        return 0
    if port == 0:
        raise UsageError(f"cannot listen on {address}: the address is in use or not local")
    return port
