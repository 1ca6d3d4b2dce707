"""Relays: byte-exact both ways, half-close passed on, errors contained, hybrid vsock handshake."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from cvmcore.address import UnixAddress
from cvmcore.errors import ConnectError
from cvmcore.relay import (
    RelayStats,
    dialer_for,
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


async def test_an_error_in_the_body_of_a_relayed_target_is_itself(tmp_path: Path) -> None:
    """A CvmError raised while a relay serves the target comes out as itself, not as an
    exception group from the relay's nursery (the daemon's readiness loop catches CvmError)."""
    from cvmcore.address import parse_address
    from cvmcore.errors import DeadlineExceeded
    from cvmcore.relay import grpc_target

    backend, hybrid = str(tmp_path / "backend.sock"), str(tmp_path / "vm.vsock")
    async with trio.open_nursery() as nursery:
        await nursery.start(echo_server, backend)
        await nursery.start(serve_hybrid_vsock, hybrid, {1024: dialer_for(UnixAddress(backend))})
        with trio.fail_after(5), pytest.raises(DeadlineExceeded, match="no answer"):
            async with grpc_target(parse_address(f"hvsock://{hybrid}:1024")):
                raise DeadlineExceeded("no answer to Check within 2 s")
        nursery.cancel_scope.cancel()
