"""Serving gRPC from a trio program: grpc.aio on its own asyncio thread, bridged into trio.

grpcio serves RPCs from an asyncio event loop that :mod:`cvmcore.serve` runs on a thread
of its own; trio keeps the main thread. The bridge turns an *async* servicer method
``async def GetInfo(self, request, call) -> response`` into the grpc.aio handler grpcio
wants: the handler starts the servicer's work as a trio system task (trio's token, one
hop) and awaits its outcome, which comes back with ``call_soon_threadsafe`` (one hop).
So all domain logic runs in trio, under trio's rules: every RPC runs inside a cancel
scope whose deadline is the client's deadline capped by
:attr:`GrpcBridge.max_rpc_seconds`, and a client that goes away (grpc.aio cancels the
handler) cancels its scope.

Why not grpcio's synchronous server and ``trio.from_thread.run`` (the first design): it
answers a little faster (grpc.aio's own per-call Python is the difference), but it never
sleeps: it polls its completion queue every 200 ms to check for signals (a constant in
grpcio's Cython), so an idle agent costs measurably more CPU with it. An agent idles in
every VM of a fleet for its whole life, and in a confidential VM each timer wakeup is an
exit, while a control call a few tens of microseconds slower costs nobody anything. The
trade-off is measured side by side by ``benchmarks/rpc_latency.py``.

Errors: a servicer raises :class:`RpcAbort` (or any :class:`cvmcore.errors.CvmError`,
mapped to a status code) to answer with a status; any other exception is logged with
its traceback and answered ``INTERNAL`` without details, since the peer may be hostile.
Whatever the caller got wrong is ``INVALID_ARGUMENT``, never ``UNKNOWN`` or ``INTERNAL``:

- request bytes that do not decode as the method's message (grpcio itself would answer
  ``UNKNOWN`` and say nothing) are answered ``INVALID_ARGUMENT``, counted per method in
  :class:`UndecodableRequests` (which the daemons export as a metric) and logged, at most
  :data:`UNDECODABLE_LOG_BURST` lines per :data:`UNDECODABLE_LOG_WINDOW` seconds so that a
  flood cannot fill the journal;
- details are bounded (:func:`bound_details`): they often quote the caller's input, and a
  status message longer than the peer's metadata limit (8 KiB by default) would reach it as
  ``RESOURCE_EXHAUSTED`` instead of the error it is.

Each RPC is logged with method, peer, duration and status code, and reported to an
optional observer for metrics.

Server-streaming methods are async generators; items cross to the asyncio thread
through a bounded trio memory channel, so a slow client slows the producer down.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
import grpc.aio
import outcome
import structlog
import trio
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from prometheus_client.core import CounterMetricFamily

from cvmcore.errors import WIRE_KIND_KEY, ConnectError, CvmError, DeadlineExceeded, UsageError
from cvmcore.log import logs_at

log = structlog.get_logger("cvmctl.grpc")

DEFAULT_MAX_RPC_SECONDS: Final = 60.0
STREAM_BUFFER_ITEMS: Final = 16
#: Status details longer than this (characters, or UTF-8 bytes twice this) are cut, ending "...".
MAX_DETAILS_CHARS: Final = 512
UNDECODABLE_LOG_BURST: Final = 10
UNDECODABLE_LOG_WINDOW: Final = 60.0

T = TypeVar("T")


class RpcAbort(Exception):
    """Raise from a servicer method to end the RPC with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class CallInfo:
    """What a servicer may know about the call it serves: a snapshot, taken on the asyncio
    thread when the call starts.

    Servicers run on the trio thread and may outlive the call (a client that went away
    while shielded work finishes); grpc.aio's call object is neither thread-safe nor alive
    after the call ends, so nothing here reads it later.
    """

    __slots__ = ("metadata", "method", "peer")

    def __init__(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.method = method
        self.peer: str = context.peer()
        self.metadata: tuple[tuple[str, str | bytes], ...] = tuple(context.invocation_metadata() or ())


#: Called once per finished RPC with (full method name, status code name, seconds).
RpcObserver = Callable[[str, str, float], None]


def bound_details(details: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """``details`` cut to ``limit`` characters and ``2 * limit`` UTF-8 bytes, ending "..." if cut.

    gRPC sends details percent-encoded in a header, so the byte bound keeps even a message
    of multi-byte characters well inside the peer's default 8 KiB metadata limit.
    """
    if len(details) <= limit and len(details.encode()) <= 2 * limit:
        return details
    cut = details[: max(limit - 3, 0)].encode()[: max(2 * limit - 3, 0)]
    return cut.decode(errors="ignore") + "..."


class Undecodable:
    """What the bridge's deserializer returns for bytes that are not the method's message."""

    __slots__ = ("error", "size")

    def __init__(self, size: int, error: str) -> None:
        self.size = size
        self.error = error


class UndecodableRequests:
    """Requests that did not decode, counted per method (thread-safe) and logged with a bound.

    The daemons export :meth:`counts` as a counter; the log gets at most
    :data:`UNDECODABLE_LOG_BURST` lines per :data:`UNDECODABLE_LOG_WINDOW` seconds, then one
    line saying how many it left out.
    """

    def __init__(self, metric_name: str = "cvm_rpc_undecodable") -> None:
        self.metric_name = metric_name
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._window_start = -UNDECODABLE_LOG_WINDOW
        self._logged = 0
        self._suppressed = 0

    def record(self, method: str, peer: str, request: Undecodable) -> None:
        now = time.monotonic()
        with self._lock:
            self._counts[method] = self._counts.get(method, 0) + 1
            if now - self._window_start >= UNDECODABLE_LOG_WINDOW:
                suppressed, self._suppressed = self._suppressed, 0
                self._window_start, self._logged = now, 0
                if suppressed:
                    log.warning("undecodable_requests_not_logged", count=suppressed)
            if self._logged >= UNDECODABLE_LOG_BURST:
                self._suppressed += 1
                return
            self._logged += 1
        log.warning(
            "undecodable_request",
            method=method,
            peer=peer,
            size=request.size,
            error=bound_details(request.error, 120),
        )

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The counts as the Prometheus counter :attr:`metric_name` labelled by short method
        name (a Prometheus collector: register it in a registry)."""
        family = CounterMetricFamily(
            self.metric_name,
            "Requests whose bytes did not decode as the method's message.",
            labels=["method"],
        )
        for method, count in sorted(self.counts().items()):
            family.add_metric([method.rsplit("/", 1)[-1]], float(count))
        yield family


def request_decoder(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """A grpcio request deserializer that never raises: an :class:`Undecodable` instead.

    grpcio answers a deserializer's exception with ``UNKNOWN`` and logs nothing; the
    bridge's handlers turn an :class:`Undecodable` into ``INVALID_ARGUMENT``.
    """

    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            return Undecodable(len(data), str(exc) or type(exc).__name__)

    return decode


def _wire_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the error class, for the classes that travel by name."""
    kind = exc.wire_kind if isinstance(exc, CvmError) else None
    return ((WIRE_KIND_KEY, kind),) if kind else ()


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
    """The trio cancel scope of one RPC, made on the asyncio thread, entered in trio.

    The client's remaining time is read where the call is; the deadline is set when the
    scope is entered, where ``trio.current_time()`` is defined.
    """

    cancel_scope: trio.CancelScope
    budget_seconds: float
    #: Set on the asyncio side when grpcio cancels the handler: the client went away (or its
    #: deadline passed), so no status can reach it any more.
    client_gone: bool = False

    def enter(self) -> trio.CancelScope:
        self.cancel_scope.deadline = trio.current_time() + self.budget_seconds
        return self.cancel_scope


class _ClientGone(Exception):
    """The client cancelled or disconnected: no status can reach it any more."""


class GrpcBridge:
    """Wraps async servicer methods as grpc.aio handlers running their work in trio."""

    def __init__(
        self,
        trio_token: trio.lowlevel.TrioToken,
        *,
        max_rpc_seconds: float = DEFAULT_MAX_RPC_SECONDS,
        observer: RpcObserver | None = None,
        undecodable: UndecodableRequests | None = None,
    ) -> None:
        self._token = trio_token
        self.max_rpc_seconds = max_rpc_seconds
        self._observer = observer
        self.undecodable = undecodable if undecodable is not None else UndecodableRequests()

    # -- crossing between the two loops ---------------------------------------------------

    async def _in_trio(self, afn: Callable[[], Awaitable[T]]) -> T:
        """From the asyncio thread: run ``afn`` as a trio system task and await its outcome.

        One hop each way: trio's entry queue in, ``call_soon_threadsafe`` back. The asyncio
        side never blocks, so the grpc.aio loop keeps serving other calls meanwhile.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[outcome.Outcome[T]] = loop.create_future()

        def deliver(result: outcome.Outcome[T]) -> None:
            if not future.done():  # a cancelled handler no longer waits
                future.set_result(result)

        def send_back(result: outcome.Outcome[T]) -> None:
            with suppress(RuntimeError):  # the asyncio loop has closed: nobody waits
                loop.call_soon_threadsafe(deliver, result)

        async def run() -> None:
            try:
                result: outcome.Outcome[T] = outcome.Value(await afn())
            except Exception as exc:
                result = outcome.Error(exc)
            except BaseException:
                # Not the call's own cancellation (the wrappers turn that into an error):
                # the run is ending (Cancelled, or a group of them) or being interrupted.
                # trio gets its exception back; asyncio gets an answer it can give.
                send_back(outcome.Error(trio.RunFinishedError("trio is stopping")))
                raise
            send_back(result)

        def spawn() -> None:
            try:
                trio.lowlevel.spawn_system_task(run)
            except RuntimeError:  # the run is finishing: its system nursery is closed
                send_back(outcome.Error(trio.RunFinishedError("trio is stopping")))

        self._token.run_sync_soon(spawn)  # trio.RunFinishedError when trio has stopped
        return (await future).unwrap()

    def _cancel_soon(self, scope: trio.CancelScope) -> None:
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(scope.cancel)

    # -- plumbing shared by both kinds of method ----------------------------------------

    def _scope_for(self, context: grpc.aio.ServicerContext[Any, Any], max_seconds: float | None) -> _RpcScope:
        remaining = context.time_remaining()
        cap = self.max_rpc_seconds if max_seconds is None else max_seconds
        budget = cap if remaining is None else min(remaining, cap)
        return _RpcScope(trio.CancelScope(), max(budget, 0.0))

    def _client_left(self, scope: _RpcScope) -> None:
        scope.client_gone = True
        self._cancel_soon(scope.cancel_scope)

    @staticmethod
    def _cancelled(scope: _RpcScope) -> BaseException:
        """What a cancelled scope means: our own deadline, or a client that went away."""
        return _ClientGone() if scope.client_gone else trio.TooSlowError()

    def _finish(self, method: str, info: CallInfo, started: float, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - started
        if logs_at("info"):
            log.info(
                "rpc", method=method, peer=info.peer, duration_ms=round(seconds * 1000, 3), code=code.name
            )
        if self._observer is not None:
            self._observer(method, code.name, seconds)

    def _status(self, method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, _ClientGone):
            return grpc.StatusCode.CANCELLED, "cancelled"
        if isinstance(exc, trio.RunFinishedError):
            return grpc.StatusCode.UNAVAILABLE, "server shutting down"
        code, details = _status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("rpc_failed", method=method, exc_info=exc)
        return code, bound_details(details)

    async def _refuse_undecodable(
        self,
        method: str,
        info: CallInfo,
        started: float,
        request: Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Answer a request that did not decode: INVALID_ARGUMENT, counted and logged (bounded)."""
        self.undecodable.record(method, info.peer, request)
        self._finish(method, info, started, grpc.StatusCode.INVALID_ARGUMENT)
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {method.rsplit('/', 1)[-1]} request message",
        )

    # -- unary -> unary ---------------------------------------------------------------

    def unary_unary(
        self, method: str, fn: Callable[[Any, CallInfo], Awaitable[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            info = CallInfo(method, context)
            if isinstance(request, Undecodable):
                await self._refuse_undecodable(method, info, started, request, context)
            scope = self._scope_for(context, None)

            async def run_in_trio() -> Any:
                with scope.enter():
                    return await fn(request, info)
                raise self._cancelled(scope)

            try:
                response = await self._in_trio(run_in_trio)
            except asyncio.CancelledError:  # grpc.aio: the client went away or its deadline passed
                self._client_left(scope)
                self._finish(method, info, started, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:
                code, details = self._status(method, exc)
                self._finish(method, info, started, code)
                await context.abort(code, details, _wire_metadata(exc))
            self._finish(method, info, started, grpc.StatusCode.OK)
            return response

        return handler

    # -- unary -> stream --------------------------------------------------------------

    def unary_stream(
        self,
        method: str,
        fn: Callable[[Any, CallInfo], AsyncIterator[Any]],
        max_seconds: float | None = None,
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
        """``max_seconds`` replaces the bridge-wide cap for this method (long-lived streams).

        The handler writes with ``context.write`` rather than being an async generator:
        grpc.aio may cancel a handler while it waits in its own write, and a generator
        suspended at ``yield`` would then only be closed later by a finalizer, after the
        call is gone. A coroutine gets the cancellation where it waits, while the call lives.
        """

        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            started = time.perf_counter()
            info = CallInfo(method, context)
            if isinstance(request, Undecodable):
                await self._refuse_undecodable(method, info, started, request, context)
            scope = self._scope_for(context, max_seconds)
            channel: list[trio.MemoryReceiveChannel[Any]] = []
            failure: list[BaseException] = []

            async def produce(send: trio.MemorySendChannel[Any]) -> None:
                async with send:  # closing it ends the stream: record any failure first
                    try:
                        with scope.enter():
                            async for item in fn(request, info):
                                await send.send(item)
                            return
                        raise self._cancelled(scope)
                    except Exception as exc:
                        failure.append(exc)
                    except BaseException:  # the run is ending
                        failure.append(trio.RunFinishedError("trio is stopping"))
                        raise

            async def start_producer() -> None:
                send, receive = trio.open_memory_channel[Any](STREAM_BUFFER_ITEMS)
                channel.append(receive)
                trio.lowlevel.spawn_system_task(produce, send)

            code = grpc.StatusCode.OK
            try:
                await self._in_trio(start_producer)
                receive = channel[0]
                while True:
                    try:
                        item = await self._in_trio(receive.receive)
                    except trio.EndOfChannel:
                        break
                    await context.write(item)
                if failure:
                    raise failure[0]
            except asyncio.CancelledError:  # the client went away or its deadline passed
                code = grpc.StatusCode.CANCELLED
                self._client_left(scope)
                raise
            except Exception as exc:
                code, details = self._status(method, exc)
                await context.abort(code, details, _wire_metadata(exc))
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
                request_deserializer=request_decoder(request_class),
                response_serializer=_serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                bridge.unary_unary(full_name, fn),
                request_deserializer=request_decoder(request_class),
                response_serializer=_serialize,
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
