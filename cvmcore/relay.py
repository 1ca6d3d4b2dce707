"""Byte relays that carry gRPC over vsock and hybrid vsock.

grpcio's PyPI wheels are built without vsock support, so neither end can hand a vsock
address to grpcio. Both ends therefore speak gRPC over a private unix socket and relay
its bytes to the real transport:

    host (cvmctl, cvm-hostd)                          guest (cvm-agent)
    grpc channel -> unix:<tmp>/relay.sock             AF_VSOCK listener, port 1024
                    | local_grpc_target()              | serve_relay(), peers: CID 2 only
                    v                                  v
                    vsock://CID:PORT  ---- vsock ----> unix:<private dir>/grpc.sock
                    hvsock:///vm.sock:PORT               -> grpc server
                    (CONNECT PORT\\n -> OK ...\\n)

Every relay is a trio task owned by a nursery. Each connection gets two one-way pumps
with a bounded buffer (one ``receive_some`` of at most :data:`RELAY_BUFFER_BYTES` is in
flight per direction, so a slow reader applies back-pressure to a fast writer), a
half-close is passed on with ``send_eof``, and an error on one connection is counted and
logged without touching the others. :class:`RelayStats` counts connections, bytes and
refusals for the metrics exporters.

:func:`serve_hybrid_vsock` is the host side of a hybrid vsock socket, as Firecracker,
Cloud Hypervisor and vhost-device-vsock implement it. The daemon does not need it in
production (the VMM provides it); it lets an agent be reached through the very same
``hvsock://`` code path without a VM, which the tests and local runs use.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import structlog
import trio

from cvmcore.address import (
    VMADDR_CID_ANY,
    Address,
    HybridVsockAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
)
from cvmcore.errors import ConnectError, DeadlineExceeded, UsageError

log = structlog.get_logger("cvmcore.relay")

RELAY_BUFFER_BYTES: Final = 64 * 1024
#: Longest handshake line accepted on a hybrid vsock socket ("CONNECT 4294967294\n" is 19).
HANDSHAKE_MAX_BYTES: Final = 64
DEFAULT_CONNECT_TIMEOUT: Final = 5.0

Dialer = Callable[[], Awaitable[trio.abc.Stream]]


@dataclass
class RelayStats:
    """Counters of one relay, changed only through its methods (from the trio thread).

    Subclass it to forward the counts elsewhere (the agent feeds its Prometheus metrics).
    """

    connections_total: int = 0
    connections_active: int = 0
    refused_total: int = 0  # peers rejected by the CID filter or a failed dial
    errors_total: int = 0  # connections that ended with an I/O error
    bytes_total: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})

    def accepted(self) -> None:
        self.connections_total += 1

    def refused(self) -> None:
        self.refused_total += 1

    def opened(self) -> None:
        self.connections_active += 1

    def closed(self) -> None:
        self.connections_active -= 1

    def failed(self) -> None:
        self.errors_total += 1

    def transferred(self, direction: Literal["in", "out"], nbytes: int) -> None:
        self.bytes_total[direction] += nbytes


async def _pump(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    stats: RelayStats,
    direction: Literal["in", "out"],
) -> None:
    while True:
        data = await source.receive_some(RELAY_BUFFER_BYTES)
        if not data:
            break
        await sink.send_all(data)
        stats.transferred(direction, len(data))
    if isinstance(sink, trio.abc.HalfCloseableStream):
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await sink.send_eof()
    else:
        await sink.aclose()


async def splice(a: trio.abc.Stream, b: trio.abc.Stream, stats: RelayStats) -> None:
    """Copy bytes both ways between ``a`` and ``b`` until both directions end; close both.

    ``in`` counts bytes from ``a`` (the accepted side) to ``b``; ``out`` the reverse.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, a, b, stats, "in")
            nursery.start_soon(_pump, b, a, stats, "out")
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(a)
            await trio.aclose_forcefully(b)


def _is_io_error(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_io_error(e) for e in exc.exceptions)
    return isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError)


async def _relay_one(
    accepted: trio.abc.Stream, dial: Dialer, stats: RelayStats, connect_timeout: float
) -> None:
    try:
        with trio.fail_after(connect_timeout):
            upstream = await dial()
    except (OSError, ConnectError, trio.TooSlowError) as exc:
        stats.refused()
        log.warning("relay_dial_failed", error=str(exc))
        await trio.aclose_forcefully(accepted)
        return
    await _carry(accepted, upstream, stats)


async def _carry(a: trio.abc.Stream, b: trio.abc.Stream, stats: RelayStats) -> None:
    """Splice one relayed connection, counted; its I/O errors end it, not the relay."""
    stats.opened()
    try:
        await splice(a, b, stats)
    except BaseException as exc:
        if not _is_io_error(exc):
            raise
        stats.failed()
        log.info("relay_connection_error", error=repr(exc))
    finally:
        stats.closed()


async def serve_relay(
    listener: trio.abc.Listener[trio.SocketStream],
    dial: Dialer,
    stats: RelayStats,
    *,
    allow_peer: Callable[[trio.SocketStream], bool] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listener`` forever; relay each to a fresh ``dial()``.

    ``allow_peer`` decides per accepted connection (e.g. a vsock CID filter); a rejected
    peer is closed at once and counted in ``stats.refused_total``.
    """
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning; the listener stays up.
                stats.failed()
                log.warning("relay_accept_failed", error=str(exc))
                await trio.sleep(0.1)
                continue
            stats.accepted()
            if allow_peer is not None and not allow_peer(stream):
                stats.refused()
                await trio.aclose_forcefully(stream)
                continue
            nursery.start_soon(_relay_one, stream, dial, stats, connect_timeout)


# --- dialling ---------------------------------------------------------------------------


async def open_hybrid_vsock_stream(path: str, port: int) -> trio.SocketStream:
    """Connect to guest ``port`` through the hybrid vsock unix socket at ``path``.

    The handshake is ``CONNECT <port>\\n`` answered by ``OK <host port>\\n``; a VMM
    closes the socket instead when nothing listens on that port in the guest.
    """
    try:
        stream = await trio.open_unix_socket(path)
    except FileNotFoundError as exc:
        raise ConnectError(f"hvsock://{path}:{port}: no such socket ({path} does not exist)") from exc
    except ConnectionRefusedError as exc:
        raise ConnectError(f"hvsock://{path}:{port}: connection refused (is the VM running?)") from exc
    except OSError as exc:
        raise ConnectError(f"hvsock://{path}:{port}: {os.strerror(exc.errno or 0)}") from exc
    try:
        await stream.send_all(f"CONNECT {port}\n".encode())
        line = bytearray()
        # One byte at a time: anything after the newline already belongs to the guest.
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(1)
            if not chunk:
                raise ConnectError(
                    f"hvsock://{path}:{port}: the VMM closed the connection during the handshake "
                    f"(nothing listening on guest port {port}?)"
                )
            line += chunk
            if len(line) > HANDSHAKE_MAX_BYTES:
                raise ConnectError(f"hvsock://{path}:{port}: handshake reply too long")
        if not line.startswith(b"OK "):
            reply = line.decode("ascii", "replace").strip()
            raise ConnectError(f"hvsock://{path}:{port}: handshake refused: {reply!r}")
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(stream)
        raise ConnectError(
            f"hvsock://{path}:{port}: the VMM reset the connection during the handshake "
            f"(nothing listening on guest port {port}?)"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def open_vsock_stream(cid: int, port: int) -> trio.SocketStream:
    """Connect to ``cid:port`` over AF_VSOCK (needs vhost-vsock on a host, or a guest)."""
    sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        await sock.connect((cid, port))
    except OSError as exc:
        sock.close()
        raise ConnectError(f"vsock://{cid}:{port}: {os.strerror(exc.errno or 0)}") from exc
    return trio.SocketStream(sock)


def dialer_for(address: Address) -> Dialer:
    """A function that opens one byte stream to ``address``."""

    async def dial() -> trio.abc.Stream:
        match address:
            case UnixAddress(path=path):
                try:
                    return await trio.open_unix_socket(path)
                except OSError as exc:
                    raise ConnectError(f"{address}: {os.strerror(exc.errno or 0)}") from exc
            case TcpAddress(host=host, port=port):
                try:
                    return await trio.open_tcp_stream(host, port)
                except OSError as exc:
                    raise ConnectError(f"{address}: {exc.strerror or exc}") from exc
            case VsockAddress(cid=cid, port=port):
                return await open_vsock_stream(cid, port)
            case HybridVsockAddress(path=path, port=port):
                return await open_hybrid_vsock_stream(path, port)
        raise AssertionError(address)

    return dial


# --- listening --------------------------------------------------------------------------


def open_vsock_listener(port: int, cid: int = VMADDR_CID_ANY, backlog: int = 128) -> trio.SocketListener:
    """Bind and listen on AF_VSOCK ``cid:port`` (in a guest: any CID, port 1024)."""
    sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A vsock address needs no resolution, so a plain bind cannot block.
        plain = socket.socket(fileno=sock.detach())
        sock = trio.socket.from_stdlib_socket(plain)
        plain.bind((cid, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = " (is the vsock transport loaded in this guest?)" if exc.errno == errno.ENODEV else ""
        reason = os.strerror(exc.errno or 0)
        raise ConnectError(f"cannot listen on vsock port {port}: {reason}{hint}") from exc
    return trio.SocketListener(sock)


def remove_stale_socket(path: str) -> None:
    """Make way for a listener at ``path``: remove a socket file left by an earlier run, and
    refuse (rather than delete) anything else that is there."""
    p = Path(path)
    if p.is_socket():
        p.unlink()
    elif p.exists():
        raise UsageError(f"cannot listen on unix://{path}: a file that is not a socket is in the way")


async def open_unix_listener(path: str, mode: int = 0o600, backlog: int = 128) -> trio.SocketListener:
    """Listen on a unix socket at ``path`` with ``mode``, replacing a stale socket file."""
    remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        await sock.bind(path)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on unix://{path}: {os.strerror(exc.errno or 0)}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(backlog)
    return trio.SocketListener(sock)


def vsock_peer_filter(allowed_cids: Iterable[int]) -> Callable[[trio.SocketStream], bool]:
    """Accept only peers whose vsock CID is in ``allowed_cids`` (the host is CID 2)."""
    allowed = frozenset(allowed_cids)

    def allow(stream: trio.SocketStream) -> bool:
        try:
            peer_cid, _peer_port = stream.socket.getpeername()
        except OSError:
            return False
        if peer_cid in allowed:
            return True
        log.warning("vsock_peer_refused", peer_cid=peer_cid, allowed=sorted(allowed))
        return False

    return allow


# --- the host side of a hybrid vsock socket ----------------------------------------------


async def _answer_hybrid_connect(
    stream: trio.SocketStream, ports: dict[int, Dialer], stats: RelayStats, handshake_seconds: float
) -> None:
    try:
        with trio.fail_after(handshake_seconds):
            line = bytearray()
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(1)
                if not chunk or len(line) >= HANDSHAKE_MAX_BYTES:
                    raise ValueError("no handshake")
                line += chunk
            words = line.decode("ascii").split()
            if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit():
                raise ValueError(f"bad handshake {bytes(line)!r}")
            dial = ports.get(int(words[1]))
            if dial is None:
                raise ValueError(f"nothing listens on port {words[1]}")
            upstream = await dial()
    except (ValueError, UnicodeDecodeError, OSError, ConnectError, trio.TooSlowError) as exc:
        # A real VMM answers a refused CONNECT by closing the socket: do the same.
        stats.refused()
        log.info("hvsock_connect_refused", error=str(exc))
        await trio.aclose_forcefully(stream)
        return
    try:
        await stream.send_all(f"OK {int(words[1])}\n".encode())
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await trio.aclose_forcefully(upstream)
        return
    await _carry(stream, upstream, stats)


async def serve_hybrid_vsock(
    path: str,
    ports: dict[int, Dialer],
    stats: RelayStats | None = None,
    *,
    handshake_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the host side of a hybrid vsock socket at ``path``.

    Each connection must open with ``CONNECT <port>\\n``; a known port is answered with
    ``OK <port>\\n`` and relayed to ``ports[port]()``, anything else is closed.
    """
    stats = stats if stats is not None else RelayStats()
    listener = await open_unix_listener(path)
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await listener.accept()
            stats.accepted()
            nursery.start_soon(_answer_hybrid_connect, stream, ports, stats, handshake_timeout)


# --- grpcio targets for any address -------------------------------------------------------


@asynccontextmanager
async def grpc_target(
    address: Address, stats: RelayStats | None = None, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> AsyncIterator[str]:
    """Yield a target string grpcio can dial for ``address``.

    ``unix://`` and ``tcp://`` need nothing; ``vsock://`` and ``hvsock://`` get a relay on
    a private unix socket for as long as the context is open. The first connection is
    tried before yielding, so an unreachable peer fails here with a clear
    :class:`~cvmcore.errors.ConnectError` instead of as a gRPC ``UNAVAILABLE`` later.
    """
    direct = address.grpc_target()
    if direct is not None:
        yield direct
        return
    dial = dialer_for(address)
    try:
        with trio.fail_after(connect_timeout):
            probe = await dial()
    except trio.TooSlowError:
        raise DeadlineExceeded(f"{address}: no answer within {connect_timeout:g} s") from None
    await trio.aclose_forcefully(probe)
    stats = stats if stats is not None else RelayStats()
    with tempfile.TemporaryDirectory(prefix="cvmctl-relay-") as tmp:
        path = os.path.join(tmp, "relay.sock")
        listener = await open_unix_listener(path, mode=0o600)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: serve_relay(
                        listener, dial, stats, connect_timeout=connect_timeout, task_status=task_status
                    )
                )
                try:
                    yield f"unix:{path}"
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The caller's own error (a CvmError from its call, a deadline) came through the
            # relay's nursery: give it back as itself, as the direct unix/tcp path does, so
            # that `except CvmError` around a call means the same on every transport.
            if len(group.exceptions) == 1:
                inner = group.exceptions[0]
                raise inner from inner.__cause__
            raise
