"""Serving gRPC from a trio program: grpcio's synchronous server, bridged into trio.

grpcio runs each RPC handler on a thread of a bounded pool. The bridge turns an *async*
servicer method ``async def GetInfo(self, request, call) -> response`` into the
synchronous handler grpcio wants: the handler thread re-enters the trio run with
``trio.from_thread.run(..., trio_token=...)`` (measured here: the fastest of the bridges
tried, close to plain grpcio; see platform.md). So all domain logic runs in trio, under
trio's rules: every RPC runs inside a cancel scope whose deadline is the client's
deadline capped by :attr:`GrpcBridge.max_rpc_seconds`, and a client that goes away
cancels its scope (``context.add_callback``).

Errors: a servicer raises :class:`RpcAbort` (or any :class:`cvmctl.errors.CvmError`,
mapped to a status code) to answer with a status; any other exception is logged with
its traceback and answered ``INTERNAL`` without details, since the peer may be hostile.

Each RPC is logged with method, peer, duration and status code, and reported to an
optional observer for metrics.

Server-streaming methods are async generators; items cross to the grpcio thread
through a bounded trio memory channel, so a slow client slows the producer down.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final

import grpc
import structlog
import trio
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from cvmctl.errors import ConnectError, CvmError, DeadlineExceeded, UsageError
from cvmctl.log import logs_at

log = structlog.get_logger("cvmctl.grpc")

DEFAULT_MAX_RPC_SECONDS: Final = 60.0
STREAM_BUFFER_ITEMS: Final = 16


class RpcAbort(Exception):
    """Raise from a servicer method to end the RPC with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class CallInfo:
    """What a servicer may know about the call it serves.

    ``peer`` and ``metadata`` are read from grpcio on first use: most calls never need them,
    and each costs a trip into grpcio's C core.
    """

    __slots__ = ("_context", "_metadata", "_peer", "method")

    def __init__(self, method: str, context: grpc.ServicerContext) -> None:
        self.method = method
        self._context = context
        self._peer: str | None = None
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None

    @property
    def peer(self) -> str:
        if self._peer is None:
            self._peer = self._context.peer()
        return self._peer

    @property
    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        if self._metadata is None:
            self._metadata = tuple(self._context.invocation_metadata() or ())
        return self._metadata


#: Called once per finished RPC with (full method name, status code name, seconds).
RpcObserver = Callable[[str, str, float], None]


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcAbort):
        return exc.code, exc.details
    if isinstance(exc, UsageError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, DeadlineExceeded | trio.TooSlowError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    if isinstance(exc, ConnectError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, CvmError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


@dataclass
class _RpcScope:
    """The trio cancel scope of one RPC, made on the grpcio thread, entered in trio.

    The client's remaining time is read on the grpcio thread; the deadline is set when the
    scope is entered, where ``trio.current_time()`` is defined.
    """

    cancel_scope: trio.CancelScope
    budget_seconds: float
    #: Set by the handler once its trio work is over. grpcio runs the call's callbacks at
    #: every RPC's end, even a successful one; a finished RPC must not wake trio for nothing.
    finished: bool = False

    def enter(self) -> trio.CancelScope:
        self.cancel_scope.deadline = trio.current_time() + self.budget_seconds
        return self.cancel_scope


class _ClientGone(Exception):
    """The client cancelled or disconnected: no status can reach it any more."""


class GrpcBridge:
    """Wraps async servicer methods as grpcio handlers running their work in trio."""

    def __init__(
        self,
        trio_token: trio.lowlevel.TrioToken,
        *,
        max_rpc_seconds: float = DEFAULT_MAX_RPC_SECONDS,
        observer: RpcObserver | None = None,
    ) -> None:
        self._token = trio_token
        self.max_rpc_seconds = max_rpc_seconds
        self._observer = observer

    # -- plumbing shared by both kinds of method ----------------------------------------

    def _cancel_soon(self, scope: trio.CancelScope) -> None:
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(scope.cancel)

    def _scope_for(self, context: grpc.ServicerContext, max_seconds: float | None = None) -> _RpcScope:
        """A scope cancelled when the RPC ends early (client gone, deadline passed)."""
        remaining = context.time_remaining()
        cap = self.max_rpc_seconds if max_seconds is None else max_seconds
        budget = cap if remaining is None else min(remaining, cap)
        scope = _RpcScope(trio.CancelScope(), max(budget, 0.0))

        def on_rpc_end() -> None:
            if not scope.finished:
                self._cancel_soon(scope.cancel_scope)

        context.add_callback(on_rpc_end)
        return scope

    @staticmethod
    def _cancelled(context: grpc.ServicerContext) -> BaseException:
        """What a cancelled scope means: our own deadline, or a client that went away."""
        return trio.TooSlowError() if context.is_active() else _ClientGone()

    def _finish(self, method: str, info: CallInfo, started: float, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - started
        if logs_at("info"):  # the peer costs a call into grpcio: only when it is written
            log.info(
                "rpc", method=method, peer=info.peer, duration_ms=round(seconds * 1000, 3), code=code.name
            )
        if self._observer is not None:
            self._observer(method, code.name, seconds)

    def _fail(self, context: grpc.ServicerContext, method: str, exc: BaseException) -> grpc.StatusCode:
        if isinstance(exc, _ClientGone):
            return grpc.StatusCode.CANCELLED
        if isinstance(exc, trio.RunFinishedError):
            code, details = grpc.StatusCode.UNAVAILABLE, "server shutting down"
        else:
            code, details = _status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("rpc_failed", method=method, exc_info=exc)
        context.set_code(code)
        context.set_details(details)
        return code

    # -- unary -> unary ---------------------------------------------------------------

    def unary_unary(
        self, method: str, fn: Callable[[Any, CallInfo], Awaitable[Any]]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            info = CallInfo(method, context)
            scope = self._scope_for(context)

            async def run_in_trio() -> Any:
                with scope.enter():
                    return await fn(request, info)
                raise self._cancelled(context)

            try:
                response = trio.from_thread.run(run_in_trio, trio_token=self._token)
            except Exception as exc:
                scope.finished = True
                self._finish(method, info, started, self._fail(context, method, exc))
                return None
            scope.finished = True
            self._finish(method, info, started, grpc.StatusCode.OK)
            return response

        return handler

    # -- unary -> stream --------------------------------------------------------------

    def unary_stream(
        self,
        method: str,
        fn: Callable[[Any, CallInfo], AsyncIterator[Any]],
        max_seconds: float | None = None,
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        """``max_seconds`` replaces the bridge-wide cap for this method (long-lived streams)."""

        def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            info = CallInfo(method, context)
            scope = self._scope_for(context, max_seconds)
            send, receive = trio.open_memory_channel[Any](STREAM_BUFFER_ITEMS)
            failure: list[BaseException] = []

            async def produce() -> None:
                try:
                    async with send:
                        with scope.enter():
                            async for item in fn(request, info):
                                await send.send(item)
                            return
                        raise self._cancelled(context)
                except Exception as exc:
                    failure.append(exc)

            async def start_producer() -> None:
                trio.lowlevel.spawn_system_task(produce)

            code = grpc.StatusCode.OK
            try:
                trio.from_thread.run(start_producer, trio_token=self._token)
                while True:
                    try:
                        item = trio.from_thread.run(receive.receive, trio_token=self._token)
                    except trio.EndOfChannel:
                        break
                    yield item
                scope.finished = True  # the producer has ended: nothing left to cancel
                if failure:
                    raise failure[0]
            except GeneratorExit:
                # grpcio closes the generator when the client goes away.
                code = grpc.StatusCode.CANCELLED
                self._cancel_soon(scope.cancel_scope)
                raise
            except Exception as exc:
                code = self._fail(context, method, exc)
            finally:
                self._finish(method, info, started, code)

        return handler


def service_handler(
    service: ServiceDescriptor, bridge: GrpcBridge, servicer: object
) -> grpc.GenericRpcHandler[Any, Any]:
    """A grpcio handler for the protobuf ``service``, served by an async ``servicer``.

    The servicer has one ``async def Name(self, request, call: CallInfo)`` per unary
    method and one async generator per server-streaming method; methods it lacks answer
    UNIMPLEMENTED. A servicer attribute ``rpc_max_seconds: dict[str, float]`` gives
    streaming methods that live long (a benchmark's server) their own cap.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    caps: dict[str, float] = getattr(servicer, "rpc_max_seconds", {})
    for method in service.methods:
        fn = getattr(servicer, method.name, None)
        if fn is None:
            continue
        if method.client_streaming:
            raise TypeError(f"{method.full_name}: client streaming is not supported by the bridge")
        request_class = message_factory.GetMessageClass(method.input_type)
        full_name = f"/{service.full_name}/{method.name}"
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                bridge.unary_stream(full_name, fn, caps.get(method.name)),
                request_deserializer=request_class.FromString,
                response_serializer=_serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                bridge.unary_unary(full_name, fn),
                request_deserializer=request_class.FromString,
                response_serializer=_serialize,
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
