"""Relays: byte-exact both ways, half-close passed on, errors contained, hybrid vsock handshake."""

from __future__ import annotations

import functools
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from cvmcore.address import UnixAddress, parse_address
from cvmcore.errors import ConnectError, DeadlineExceeded
from cvmcore.relay import (
    Dialer,
    RelayStats,
    dialer_for,
    grpc_target,
    open_hybrid_vsock_stream,
    open_unix_listener,
    serve_hybrid_vsock,
    serve_relay,
    splice,
    vsock_peer_filter,
)


async def echo_server(path: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Echoes until EOF, then sends 'bye' and closes: shows the half-close travelled."""
    listener = await open_unix_listener(path)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_all(b"bye")

    async with listener:
        task_status.started()
        await trio.serve_listeners(handle, [listener])


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = bytearray()
    while data := await stream.receive_some(65536):
        chunks += data
    return bytes(chunks)


async def test_splice_copies_both_ways_and_passes_half_close() -> None:
    left_client, left_relay = trio.testing.memory_stream_pair()
    right_relay, right_server = trio.testing.memory_stream_pair()
    stats = RelayStats()
    payload = os.urandom(300_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(splice, left_relay, right_relay, stats)
        await left_client.send_all(payload)
        await left_client.send_eof()
        with trio.fail_after(5):
            assert await read_all(right_server) == payload  # EOF arrived: half-close passed on
        await right_server.send_all(b"reply")
        await right_server.send_eof()
        with trio.fail_after(5):
            assert await read_all(left_client) == b"reply"
    assert stats.bytes_total == {"in": len(payload), "out": 5}


async def test_serve_relay_over_unix_sockets(tmp_path: Path) -> None:
    backend, front = str(tmp_path / "backend.sock"), str(tmp_path / "front.sock")
    stats = RelayStats()
    async with trio.open_nursery() as nursery:
        await nursery.start(echo_server, backend)
        listener = await open_unix_listener(front)
        await nursery.start(serve_relay, listener, dialer_for(UnixAddress(backend)), stats)
        with trio.fail_after(5):
            for n in range(3):
                stream = await trio.open_unix_socket(front)
                message = f"hello {n}".encode() * 1000
                await stream.send_all(message)
                await stream.send_eof()
                assert await read_all(stream) == message + b"bye"
                await stream.aclose()
        nursery.cancel_scope.cancel()
    assert stats.connections_total == 3
    assert stats.refused_total == 0


async def test_one_broken_connection_does_not_affect_others(tmp_path: Path) -> None:
    backend, front = str(tmp_path / "backend.sock"), str(tmp_path / "front.sock")
    stats = RelayStats()
    async with trio.open_nursery() as nursery:
        await nursery.start(echo_server, backend)
        listener = await open_unix_listener(front)
        await nursery.start(serve_relay, listener, dialer_for(UnixAddress(backend)), stats)
        with trio.fail_after(5):
            healthy = await trio.open_unix_socket(front)
            broken = await trio.open_unix_socket(front)
            await broken.send_all(b"x" * 100_000)
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            broken.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await broken.aclose()  # RST instead of FIN
            await healthy.send_all(b"still here")
            await healthy.send_eof()
            assert await read_all(healthy) == b"still herebye"
        nursery.cancel_scope.cancel()


async def test_dial_failure_is_counted_and_closes_the_client(tmp_path: Path) -> None:
    front = str(tmp_path / "front.sock")
    stats = RelayStats()
    async with trio.open_nursery() as nursery:
        listener = await open_unix_listener(front)
        await nursery.start(serve_relay, listener, dialer_for(UnixAddress(str(tmp_path / "absent"))), stats)
        with trio.fail_after(5):
            stream = await trio.open_unix_socket(front)
            assert await read_all(stream) == b""  # closed at once
        nursery.cancel_scope.cancel()
    assert stats.refused_total == 1


async def test_hybrid_vsock_handshake_and_relay(tmp_path: Path) -> None:
    backend, hybrid = str(tmp_path / "backend.sock"), str(tmp_path / "vm.vsock")
    async with trio.open_nursery() as nursery:
        await nursery.start(echo_server, backend)
        await nursery.start(serve_hybrid_vsock, hybrid, {1024: dialer_for(UnixAddress(backend))})
        with trio.fail_after(5):
            stream = await open_hybrid_vsock_stream(hybrid, 1024)
            await stream.send_all(b"through the vsock")
            await stream.send_eof()
            assert await read_all(stream) == b"through the vsockbye"
        nursery.cancel_scope.cancel()


async def test_hybrid_vsock_refuses_unknown_port(tmp_path: Path) -> None:
    hybrid = str(tmp_path / "vm.vsock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_hybrid_vsock, hybrid, {})
        with trio.fail_after(5), pytest.raises(ConnectError, match="nothing listening on guest port 9"):
            await open_hybrid_vsock_stream(hybrid, 9)
        nursery.cancel_scope.cancel()


async def test_hybrid_vsock_rejects_a_bad_reply(tmp_path: Path) -> None:
    path = str(tmp_path / "liar.sock")

    async def liar(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = await open_unix_listener(path)
        task_status.started()
        stream = await listener.accept()
        await stream.receive_some(64)
        await stream.send_all(b"NOPE\n")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(liar)
        with trio.fail_after(5), pytest.raises(ConnectError, match="handshake refused: 'NOPE'"):
            await open_hybrid_vsock_stream(path, 1024)
        nursery.cancel_scope.cancel()


async def test_hybrid_vsock_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="no such socket"):
        await open_hybrid_vsock_stream(str(tmp_path / "absent.sock"), 1024)


@pytest.mark.parametrize(("peer_cid", "allowed"), [(2, True), (3, False), (1, False)])
def test_vsock_peer_filter_allows_only_the_host(peer_cid: int, allowed: bool) -> None:
    fake: Any = SimpleNamespace(socket=SimpleNamespace(getpeername=lambda: (peer_cid, 5000)))
    assert vsock_peer_filter({2})(fake) is allowed


async def test_hybrid_vsock_survives_a_backend_that_is_gone(tmp_path: Path) -> None:
    """A CONNECT to a port whose backend is not there is refused; the socket keeps serving."""
    backend, hybrid = str(tmp_path / "backend.sock"), str(tmp_path / "vm.vsock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_hybrid_vsock, hybrid, {1024: dialer_for(UnixAddress(backend))})
        with trio.fail_after(5), pytest.raises(ConnectError):
            await open_hybrid_vsock_stream(hybrid, 1024)
        await nursery.start(echo_server, backend)
        with trio.fail_after(5):
            stream = await open_hybrid_vsock_stream(hybrid, 1024)
            await stream.send_all(b"back")
            await stream.send_eof()
            assert await read_all(stream) == b"backbye"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def relay_to_echo(
    tmp_path: Path, dial: Dialer | None = None, **options: Any
) -> AsyncIterator[tuple[str, RelayStats]]:
    """A relay on ``front.sock`` to an echo server (or to ``dial``); its address and counters."""
    backend, front = str(tmp_path / "backend.sock"), str(tmp_path / "front.sock")
    stats = RelayStats()
    async with trio.open_nursery() as nursery:
        await nursery.start(echo_server, backend)
        listener = await open_unix_listener(front)
        relay = functools.partial(
            serve_relay, listener, dial or dialer_for(UnixAddress(backend)), stats, **options
        )
        await nursery.start(relay)
        yield front, stats
        nursery.cancel_scope.cancel()


async def test_the_relay_holds_at_most_its_limit_and_counts_the_rest(tmp_path: Path) -> None:
    """Idle connections cannot run a relay out of descriptors: past the limit they are closed."""
    async with relay_to_echo(tmp_path, max_connections=8) as (front, stats):
        idle = [await trio.open_unix_socket(front) for _ in range(8)]
        await trio.sleep(0.2)
        extra = await trio.open_unix_socket(front)
        with trio.fail_after(5):
            assert await extra.receive_some(10) == b""  # closed unserved
        assert stats.refused_total == 1
        await trio.aclose_forcefully(idle.pop())  # a place frees up: served again
        await trio.sleep(0.2)
        with trio.fail_after(5):
            again = await trio.open_unix_socket(front)
            await again.send_all(b"ping")
            assert await again.receive_some(10) == b"ping"
        for stream in [*idle, extra, again]:
            await trio.aclose_forcefully(stream)


async def test_a_silent_connection_is_closed_before_anything_is_dialled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    dialled: list[int] = []

    async def dial() -> trio.abc.Stream:
        dialled.append(1)
        return await trio.open_unix_socket(str(tmp_path / "backend.sock"))

    async with relay_to_echo(tmp_path, dial, first_byte_timeout=10.0) as (front, stats):
        silent = await trio.open_unix_socket(front)
        with trio.fail_after(60):
            assert await silent.receive_some(10) == b""
        assert (stats.refused_total, dialled) == (1, [])
        talker = await trio.open_unix_socket(front)
        await talker.send_all(b"hello")
        with trio.fail_after(60):
            assert await talker.receive_some(10) == b"hello"
        for stream in (silent, talker):
            await trio.aclose_forcefully(stream)


async def test_a_probe_that_closes_at_once_is_not_a_refusal(tmp_path: Path) -> None:
    """grpc_target checks reachability by connecting and closing: not a silent hoarder."""
    async with relay_to_echo(tmp_path, first_byte_timeout=10.0) as (front, stats):
        probe = await trio.open_unix_socket(front)
        await probe.aclose()
        await trio.sleep(0.2)
        assert stats.refused_total == 0


async def test_an_error_in_the_callers_block_comes_out_as_raised(tmp_path: Path) -> None:
    """Through a relay, a caller's ``except CvmError`` must see its own error, not a trio
    ExceptionGroup: the daemon's wait for a booting agent once died of that, leaving the VM
    in STARTING for good (its boot deadline ran in the same task)."""
    backend, hybrid = str(tmp_path / "backend.sock"), str(tmp_path / "vm.vsock")
    async with trio.open_nursery() as nursery:
        await nursery.start(echo_server, backend)
        await nursery.start(serve_hybrid_vsock, hybrid, {1024: dialer_for(UnixAddress(backend))})
        with trio.fail_after(5), pytest.raises(DeadlineExceeded, match="no answer to Check"):
            async with grpc_target(parse_address(f"hvsock://{hybrid}:1024")):
                raise DeadlineExceeded("no answer to Check within 2 s")
        nursery.cancel_scope.cancel()
