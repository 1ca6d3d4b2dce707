"""Calling a cvmctl gRPC service from trio: connection, deadlines and errors.

:func:`connect` opens a channel to any :mod:`cvmcore.address` (running a relay for
vsock and hybrid vsock) and yields an :class:`RpcClient`. Each :meth:`RpcClient.call`
runs grpcio's blocking call on a worker thread with the client's timeout as its gRPC
deadline, so it can neither hang nor outlive its caller; grpc status codes become the
:mod:`cvmcore.errors` hierarchy with a message that names the address:

    UNAVAILABLE        -> ConnectError       nothing listening, connection refused
    DEADLINE_EXCEEDED  -> DeadlineExceeded   no answer in time
    anything else      -> RemoteError        the peer answered with an error
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import grpc
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cvmcore.address import Address
from cvmcore.errors import (
    WIRE_KIND_KEY,
    WIRE_KINDS,
    ConnectError,
    CvmError,
    DeadlineExceeded,
    RemoteError,
    UsageError,
)
from cvmcore.relay import grpc_target

DEFAULT_TIMEOUT: Final = 5.0
MiB: Final = 1024 * 1024

Response = TypeVar("Response")


def _connect_reason(details: str) -> str:
    for reason in ("No such file or directory", "Connection refused", "Permission denied"):
        if reason in details:
            return reason
    return "unavailable"


def error_from_rpc(exc: grpc.RpcError, address: Address, timeout: float, what: str) -> CvmError:
    """The cvmctl error for a failed call of ``what`` on ``address``."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
    trailing: tuple[tuple[str, str | bytes], ...] = (
        exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    ) or ()
    kind = next((str(value) for key, value in trailing if key == WIRE_KIND_KEY), None)
    if kind in WIRE_KINDS:
        return WIRE_KINDS[kind](details)
    if code is grpc.StatusCode.UNAVAILABLE:
        if "shutting down" in details:
            return ConnectError(f"{address}: the server is shutting down")
        return ConnectError(f"nothing is listening at {address} ({_connect_reason(details)})")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{address}: no answer to {what} within {timeout:g} s")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return UsageError(f"{what}: {details}")
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
        return RemoteError(f"{what}: {details}")
    return RemoteError(f"{what} failed at {address}: {code.name}: {details}")


class _EndOfStream:
    """Returned by next() when a response stream ends."""


class RpcClient:
    def __init__(self, channel: grpc.Channel, address: Address, timeout: float) -> None:
        self.channel = channel
        self.address = address
        self.timeout = timeout

    async def call(
        self, method: Callable[..., Response], request: Any, *, timeout: float | None = None
    ) -> Response:
        """Call a unary stub ``method`` with ``request``; ``timeout`` overrides the client's."""
        limit = self.timeout if timeout is None else timeout
        name = getattr(method, "_method", b"rpc")
        what = name.decode().rsplit("/", 1)[-1] if isinstance(name, bytes) else str(name)
        try:
            return await trio.to_thread.run_sync(
                lambda: method(request, timeout=limit), abandon_on_cancel=True
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.address, limit, what) from exc

    async def stream(
        self, method: Callable[..., Iterable[Response]], request: Any, *, timeout: float | None = None
    ) -> AsyncIterator[Response]:
        """Iterate a server-streaming stub ``method``; each item is received off the trio thread."""
        limit = self.timeout if timeout is None else timeout
        call = method(request, timeout=limit)
        iterator: Iterator[Response] = iter(call)
        end = _EndOfStream()
        try:
            while True:
                try:
                    item = await trio.to_thread.run_sync(next, iterator, end, abandon_on_cancel=True)
                except grpc.RpcError as exc:
                    raise error_from_rpc(exc, self.address, limit, "stream") from exc
                if isinstance(item, _EndOfStream):
                    return
                yield item
        finally:
            if isinstance(call, grpc.Future):
                call.cancel()

    async def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name of ``service`` ("" = the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = await self.call(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@asynccontextmanager
async def connect(address: Address, *, timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[RpcClient]:
    """Open a channel to ``address``; ``timeout`` bounds the relay's dial and every call."""
    if not timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    async with grpc_target(address, connect_timeout=timeout) as target:
        channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", 64 * MiB),
                ("grpc.max_send_message_length", 4 * MiB),
                ("grpc.enable_retries", 0),
                # Each channel its own subchannels: otherwise a failed attempt to an address
                # leaves a shared subchannel in back-off, and the next channel to the same
                # address fails at once with the old error (e.g. a daemon just started).
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        try:
            yield RpcClient(channel, address, timeout)
        finally:
            channel.close()
