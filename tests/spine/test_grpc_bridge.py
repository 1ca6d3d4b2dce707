"""The trio/grpcio bridge: status mapping, deadlines, cancellation when the client leaves, streams."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import trio

from cvmcore.address import TcpAddress, UnixAddress
from cvmcore.client import connect
from cvmcore.errors import DeadlineExceeded, RemoteError, UsageError
from cvmcore.grpc_bridge import CallInfo, GrpcBridge, RpcAbort
from cvmcore.serve import ServerOptions, serve_grpc

SERVICE = "test.Bridge"


def identity(data: bytes) -> bytes:
    return data


class Behaviour:
    """Async handlers whose outcome depends on the request bytes."""

    def __init__(self) -> None:
        self.started = trio.Event()  # a handler that waits forever has begun waiting
        self.cancelled = trio.Event()
        self.observed: list[tuple[str, str]] = []

    async def unary(self, request: bytes, call: CallInfo) -> bytes:
        if request == b"usage":
            raise UsageError("bad field x")
        if request == b"abort":
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, "no")
        if request == b"crash":
            raise RuntimeError("secret internals")
        if request == b"hang":
            self.started.set()
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled.set()
        return request.upper()

    async def stream(self, request: bytes, call: CallInfo) -> AsyncIterator[bytes]:
        if request == b"deny":
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, "no stream for you")
        if request == b"endless":
            try:
                while True:
                    yield b"x" * 20_000
            finally:
                self.cancelled.set()
        for n in range(int(request)):
            yield str(n).encode()
        if int(request) == 0:
            self.started.set()
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled.set()


def handlers(behaviour: Behaviour) -> Callable[[GrpcBridge], Iterable[tuple[str, Any]]]:
    def make(bridge: GrpcBridge) -> Iterable[tuple[str, Any]]:
        yield (
            SERVICE,
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(
                        bridge.unary_unary("/test.Bridge/Unary", behaviour.unary), identity, identity
                    ),
                    "Stream": grpc.unary_stream_rpc_method_handler(
                        bridge.unary_stream("/test.Bridge/Stream", behaviour.stream), identity, identity
                    ),
                },
            ),
        )

    return make


@asynccontextmanager
async def serving_bridge(
    tmp_path: Path, max_rpc_seconds: float = 2.0
) -> AsyncIterator[tuple[UnixAddress, Behaviour]]:
    behaviour = Behaviour()
    address = UnixAddress(str(tmp_path / "bridge.sock"))
    options = ServerOptions(
        listen=[address],
        stop_grace=0.5,
        max_rpc_seconds=max_rpc_seconds,
        observer=lambda method, code, seconds: behaviour.observed.append((method, code)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_grpc, handlers(behaviour), options)
        yield address, behaviour
        nursery.cancel_scope.cancel()


@pytest.fixture
async def bridge_server(tmp_path: Path) -> AsyncIterator[tuple[UnixAddress, Behaviour]]:
    async with serving_bridge(tmp_path) as served:
        yield served


def unary(channel: grpc.Channel) -> Callable[..., bytes]:
    return channel.unary_unary("/test.Bridge/Unary", identity, identity)


async def test_ok_and_status_mapping(bridge_server: tuple[UnixAddress, Behaviour]) -> None:
    address, behaviour = bridge_server
    async with connect(address, timeout=5) as client:
        assert await client.call(unary(client.channel), b"hi") == b"HI"
        with pytest.raises(UsageError, match="bad field x"):
            await client.call(unary(client.channel), b"usage")
        with pytest.raises(RemoteError, match="PERMISSION_DENIED: no"):
            await client.call(unary(client.channel), b"abort")
        with pytest.raises(RemoteError) as info:
            await client.call(unary(client.channel), b"crash")
    assert "INTERNAL: internal error" in str(info.value)
    assert "secret" not in str(info.value)  # a possibly hostile peer learns nothing
    assert behaviour.observed == [
        ("/test.Bridge/Unary", "OK"),
        ("/test.Bridge/Unary", "INVALID_ARGUMENT"),
        ("/test.Bridge/Unary", "PERMISSION_DENIED"),
        ("/test.Bridge/Unary", "INTERNAL"),
    ]


async def test_client_deadline_cancels_the_trio_work(bridge_server: tuple[UnixAddress, Behaviour]) -> None:
    address, behaviour = bridge_server
    async with connect(address, timeout=0.3) as client:
        with pytest.raises(DeadlineExceeded, match=r"no answer to Unary within 0\.3 s"):
            await client.call(unary(client.channel), b"hang")
    with trio.fail_after(2):
        await behaviour.cancelled.wait()


async def test_server_side_deadline_caps_every_rpc(bridge_server: tuple[UnixAddress, Behaviour]) -> None:
    address, behaviour = bridge_server  # max_rpc_seconds=2, client allows 10
    async with connect(address, timeout=10) as client:
        with trio.fail_after(5), pytest.raises(DeadlineExceeded):
            await client.call(unary(client.channel), b"hang")
    assert behaviour.cancelled.is_set()


async def test_server_streaming(bridge_server: tuple[UnixAddress, Behaviour]) -> None:
    address, _ = bridge_server
    async with connect(address, timeout=5) as client:
        method = client.channel.unary_stream("/test.Bridge/Stream", identity, identity)
        items = [item async for item in client.stream(method, b"40")]
    assert items == [str(n).encode() for n in range(40)]


async def test_stream_cancelled_by_client_stops_the_producer(tmp_path: Path) -> None:
    # No server-side cap within reach: only the client's cancel can stop the producer.
    async with (
        serving_bridge(tmp_path, max_rpc_seconds=60.0) as (address, behaviour),
        connect(address, timeout=5) as client,
    ):
        method = client.channel.unary_stream("/test.Bridge/Stream", identity, identity)
        call: Any = method(b"0", timeout=30)
        with trio.fail_after(10):
            await behaviour.started.wait()
        call.cancel()
        with trio.fail_after(10):
            await behaviour.cancelled.wait()


async def test_calls_beyond_the_concurrency_bound_are_refused(tmp_path: Path) -> None:
    behaviour = Behaviour()
    address = UnixAddress(str(tmp_path / "bounded.sock"))
    options = ServerOptions(listen=[address], stop_grace=0.5, max_concurrent_rpcs=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_grpc, handlers(behaviour), options)
        async with connect(address, timeout=5) as client:
            method: Any = unary(client.channel)
            hanging = method.future(b"hang", timeout=30)
            with trio.fail_after(10):
                await behaviour.started.wait()
            with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED"):
                await client.call(unary(client.channel), b"second")
            hanging.cancel()
            with trio.fail_after(3):
                await behaviour.cancelled.wait()
            # grpcio frees the slot just after the handler ends (before 1.84, ~20 ms later)
            with trio.fail_after(3):
                while True:
                    try:
                        assert await client.call(unary(client.channel), b"third") == b"THIRD"
                        break
                    except RemoteError:
                        await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_shutdown_with_a_call_in_flight(tmp_path: Path) -> None:
    """Stopping gives calls ``stop_grace``, then cancels them and their trio work."""
    behaviour = Behaviour()
    address = UnixAddress(str(tmp_path / "stopping.sock"))
    options = ServerOptions(listen=[address], stop_grace=0.5)
    async with connect(address, timeout=10) as client:
        method: Any = unary(client.channel)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_grpc, handlers(behaviour), options)
            hanging = method.future(b"hang", timeout=30, wait_for_ready=True)
            with trio.fail_after(10):
                await behaviour.started.wait()
            stopping = trio.current_time()
            nursery.cancel_scope.cancel()
        # grace, the bound's second, slack for a loaded machine; far below the call's 30 s
        assert trio.current_time() - stopping < 0.5 + 1.0 + 3.0
        assert behaviour.cancelled.is_set()
        with pytest.raises(grpc.RpcError) as info:
            await trio.to_thread.run_sync(lambda: hanging.result(timeout=5))
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_a_stream_that_fails_before_its_first_item_always_says_so(
    bridge_server: tuple[UnixAddress, Behaviour],
) -> None:
    """The producer's failure is recorded before its channel closes (it once raced: OK)."""
    address, _ = bridge_server
    async with connect(address, timeout=5) as client:
        method = client.channel.unary_stream("/test.Bridge/Stream", identity, identity)
        for _ in range(40):
            with pytest.raises(RemoteError, match="PERMISSION_DENIED: no stream for you"):
                _ = [item async for item in client.stream(method, b"deny")]


CANCELLING_CLIENT = """
import sys, time, grpc
channel = grpc.insecure_channel("unix:" + sys.argv[1])
call = channel.unary_stream("/test.Bridge/Stream")(b"endless", timeout=30)
next(call)
time.sleep(1)  # the server fills the socket and waits in its own write
call.cancel()
"""


async def test_client_cancelling_a_stream_mid_write(bridge_server: tuple[UnixAddress, Behaviour]) -> None:
    """The handler may be cancelled inside grpc.aio's write; the server lives on and the
    producer is cancelled (this crashed the process while the handler was a generator)."""
    address, behaviour = bridge_server
    for _ in range(3):
        behaviour.cancelled = trio.Event()
        done = await trio.run_process(
            [sys.executable, "-c", CANCELLING_CLIENT, address.path], capture_stderr=True, check=False
        )
        assert done.returncode == 0, done.stderr
        with trio.fail_after(5):
            await behaviour.cancelled.wait()
    async with connect(address, timeout=5) as client:
        assert await client.call(unary(client.channel), b"still here") == b"STILL HERE"


async def test_an_address_that_will_not_bind_undoes_the_others(tmp_path: Path) -> None:
    first = UnixAddress(str(tmp_path / "first.sock"))
    unbindable = UnixAddress(str(tmp_path / "no-such-dir" / "second.sock"))
    with pytest.raises(UsageError, match=r"cannot listen on unix://.*second\.sock"):
        await serve_grpc(handlers(Behaviour()), ServerOptions(listen=[first, unbindable]))
    assert not os.path.exists(first.path)


async def test_a_failure_after_start_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def health_fails(*args: object) -> None:
        raise RuntimeError("health service broke")

    monkeypatch.setattr("cvmcore.serve._set_serving", health_fails)
    with pytest.raises(ExceptionGroup) as info:  # raised inside serve_grpc's nursery
        await serve_grpc(handlers(Behaviour()), ServerOptions(listen=[TcpAddress("127.0.0.1", 0)]))
    assert info.group_contains(RuntimeError, match="health service broke")
    # every listening socket of this process is closed again
    listening = [c for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert listening == []
