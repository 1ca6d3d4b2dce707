"""The QMP client, against a fake QMP server speaking the real wire format, and against QEMU."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from cvmcore import errors
from host_daemon.qmp import (
    CommandNotFound,
    ConnectError,
    Disconnected,
    EventOverflow,
    ExecuteError,
    GenericError,
    Greeting,
    KVMMissingCap,
    ProtocolError,
    QMPClient,
    QMPDeadline,
    QMPError,
    Runstate,
    StateError,
    connect_qmp,
    open_qmp,
)

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fake"},
        "capabilities": ["oob"],
    }
}
QEMU = shutil.which("qemu-system-x86_64")


class Peer:
    """The server end of one QMP connection, driven step by step by a test."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send_raw(self, data: bytes) -> None:
        with trio.fail_after(5):
            await self.stream.send_all(data)

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(message).encode() + b"\r\n")

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(5):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    async def reply(self, result: Any = None) -> dict[str, Any]:
        """Receive a command and answer it with ``result`` (``{}`` by default)."""
        cmd = await self.recv()
        await self.send({"return": {} if result is None else result, "id": cmd["id"]})
        return cmd

    async def handshake(self) -> None:
        await self.send(GREETING)
        cmd = await self.recv()
        assert cmd["execute"] == "qmp_capabilities"
        await self.send({"return": {}, "id": cmd["id"]})

    async def close(self) -> None:
        await self.stream.aclose()


Script = Callable[[Peer], Awaitable[None]]


@asynccontextmanager
async def fake_qmp(tmp_path: Path, script: Script) -> AsyncIterator[Path]:
    """A unix socket whose first connection is handed to ``script``."""
    path = tmp_path / "qmp.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(1)
    listener = trio.SocketListener(sock)

    async def serve() -> None:
        stream = await listener.accept()
        peer = Peer(stream)
        try:
            await script(peer)
        finally:
            await peer.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield path
        nursery.cancel_scope.cancel()  # the client is done with the server
    await listener.aclose()


def runstate(client: QMPClient) -> Runstate:
    """The run state, read through a call so that type checkers do not narrow it across awaits."""
    return client.runstate


async def hold_open(peer: Peer) -> None:
    await trio.sleep_forever()


# --------------------------------------------------------------------------------------------
# Against the fake


async def test_greeting_capabilities_and_execute_with_ids(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    async def script(peer: Peer) -> None:
        await peer.handshake()
        seen.append(await peer.reply({"status": "running", "running": True}))
        seen.append(await peer.reply([1, 2]))
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path, deadline=5) as qmp:
        assert qmp.runstate is Runstate.RUNNING
        assert qmp.greeting == Greeting((10, 0, 2), "fake", ("oob",))
        assert qmp.greeting_at is not None and qmp.ready_at is not None
        assert qmp.greeting_at <= qmp.ready_at
        assert await qmp.execute("query-status") == {"status": "running", "running": True}
        assert await qmp.execute("query-x", {"a": 1}, deadline=2) == [1, 2]
    assert runstate(qmp) is Runstate.DISCONNECTED and qmp.disconnect_cause is None
    assert seen[0] == {"execute": "query-status", "id": "qmp-2"}
    assert seen[1] == {"execute": "query-x", "arguments": {"a": 1}, "id": "qmp-3"}


async def test_error_replies_map_to_their_class(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        for cls in ("CommandNotFound", "GenericError", "KVMMissingCap", "SomethingNew"):
            cmd = await peer.recv()
            await peer.send({"error": {"class": cls, "desc": f"d-{cls}"}, "id": cmd["id"]})
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path) as qmp:
        with pytest.raises(CommandNotFound) as info:
            await qmp.execute("nope")
        assert (info.value.command, info.value.error_class, info.value.desc) == (
            "nope",
            "CommandNotFound",
            "d-CommandNotFound",
        )
        assert str(info.value) == "QMP nope: CommandNotFound: d-CommandNotFound"
        assert isinstance(info.value, errors.RemoteError)
        with pytest.raises(GenericError):
            await qmp.execute("x")
        with pytest.raises(KVMMissingCap):
            await qmp.execute("x")
        with pytest.raises(ExecuteError) as other:
            await qmp.execute("x")
        assert type(other.value) is ExecuteError and other.value.error_class == "SomethingNew"
        assert qmp.runstate is Runstate.RUNNING  # an error reply is not a connection problem


async def test_reply_without_id_goes_to_the_oldest_command(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        await peer.recv()
        await peer.send({"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}})
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path) as qmp:
        with pytest.raises(GenericError, match="JSON parse error"):
            await qmp.execute("x")


async def test_events_reach_listeners(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        await peer.reply()  # "go": the events follow its reply
        for name in ("STOP", "RESUME", "RESET", "GUEST_PANICKED"):
            await peer.send(
                {"event": name, "data": {"n": name}, "timestamp": {"seconds": 10, "microseconds": 500000}}
            )
        await peer.send({"event": "SHUTDOWN", "timestamp": {"seconds": -1, "microseconds": -1}})
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path) as qmp:
        everything = qmp.listen()
        lifecycle = qmp.listen({"GUEST_PANICKED", "SHUTDOWN"})
        with qmp.listen({"RESET"}) as closed_early:
            pass
        await qmp.execute("go")
        first = await everything.get(deadline=2)
        assert (first.name, first.data, first.timestamp) == ("STOP", {"n": "STOP"}, 10.5)
        assert [(await everything.get(deadline=2)).name for _ in range(4)] == [
            "RESUME",
            "RESET",
            "GUEST_PANICKED",
            "SHUTDOWN",
        ]
        panicked = await lifecycle.wait_for("GUEST_PANICKED", deadline=2)
        assert panicked.data == {"n": "GUEST_PANICKED"}
        shutdown = await lifecycle.get(deadline=2)
        assert shutdown.name == "SHUTDOWN" and shutdown.timestamp is None and shutdown.data == {}
        assert [e.name for e in qmp.recent_events] == [
            "STOP",
            "RESUME",
            "RESET",
            "GUEST_PANICKED",
            "SHUTDOWN",
        ]
        assert closed_early not in qmp._listeners
        with pytest.raises(QMPDeadline, match=r"no answer within 0\.05 s"):
            await lifecycle.get(deadline=0.05)


async def test_a_slow_listener_is_cut_off_not_silently_lossy(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        for i in range(5):
            await peer.send(
                {"event": "STOP", "data": {"i": i}, "timestamp": {"seconds": 1, "microseconds": 0}}
            )
        await peer.reply()
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path) as qmp:
        small = qmp.listen(max_buffer=2)
        await qmp.execute("sync")  # its reply comes after the five events
        got = []
        with pytest.raises(EventOverflow):
            async for event in small:
                got.append(event.data["i"])
        assert got == [0, 1]


async def test_deadline_then_late_reply_is_dropped(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        slow = await peer.recv()
        fast = await peer.recv()
        await peer.send({"return": "late", "id": slow["id"]})
        await peer.send({"return": "fast", "id": fast["id"]})
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path) as qmp:
        with pytest.raises(QMPDeadline) as info:
            await qmp.execute("slow", deadline=0.1)
        assert isinstance(info.value, errors.DeadlineExceeded)
        assert str(info.value) == "QMP slow: no answer within 0.1 s"
        assert await qmp.execute("fast", deadline=2) == "fast"
        assert qmp.dropped_replies == 1
        assert qmp.runstate is Runstate.RUNNING


async def test_deadline_while_sending_closes_the_untrustworthy_stream(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        await trio.sleep_forever()  # never reads: the socket buffers fill up

    async with fake_qmp(tmp_path, script) as path, open_qmp(path) as qmp:
        with pytest.raises(QMPDeadline):
            await qmp.execute("big", {"blob": "x" * (16 << 20)}, deadline=0.2)
        with trio.fail_after(2):
            cause = await qmp.wait_disconnected()
        assert "cancelled while sending" in str(cause)


async def test_peer_disappearing_fails_pending_commands_with_the_cause(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        await peer.recv()  # read the command, then vanish without answering

    async with fake_qmp(tmp_path, script) as path, open_qmp(path) as qmp:
        events = qmp.listen()
        with pytest.raises(Disconnected) as info:
            await qmp.execute("query-status", deadline=5)
        assert qmp.runstate is Runstate.DISCONNECTED
        assert isinstance(qmp.disconnect_cause, Disconnected)
        assert "end of file" in str(qmp.disconnect_cause)
        assert info.value.__cause__ is qmp.disconnect_cause
        assert [e async for e in events] == []  # the stream just ends
        with pytest.raises(Disconnected, match="end of file"):
            await events.get(deadline=1)
        with pytest.raises(Disconnected, match="the connection is gone"):
            await qmp.execute("again")
        with pytest.raises(StateError):
            qmp.listen()


async def test_garbage_is_a_protocol_error(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        await peer.recv()
        await peer.send_raw(b"{not json\r\n")
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path) as qmp:
        with pytest.raises(Disconnected) as info:
            await qmp.execute("x")
        assert isinstance(info.value.__cause__, ProtocolError)
        assert "invalid JSON" in str(qmp.disconnect_cause)


async def test_split_and_batched_messages(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.send_raw(json.dumps(GREETING).encode()[:10])
        await trio.sleep(0.05)
        await peer.send_raw(json.dumps(GREETING).encode()[10:] + b"\r\n")
        cmd = await peer.recv()
        await peer.send({"return": {}, "id": cmd["id"]})
        one, two = await peer.recv(), await peer.recv()
        batch = [
            {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}},
            {"return": 1, "id": one["id"]},
            {"return": 2, "id": two["id"]},
        ]
        await peer.send_raw(b"\r\n".join(json.dumps(m).encode() for m in batch) + b"\r\n\r\n")
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path) as qmp:
        events = qmp.listen()
        async with trio.open_nursery() as nursery:
            results: dict[str, int] = {}

            async def run(cmd: str) -> None:
                results[cmd] = await qmp.execute(cmd)

            nursery.start_soon(run, "one")
            await trio.sleep(0.05)
            nursery.start_soon(run, "two")
        assert results == {"one": 1, "two": 2}
        assert (await events.get(deadline=1)).name == "STOP"


@pytest.mark.parametrize(
    ("first", "error"),
    [
        (b'{"hello": 1}\r\n', ProtocolError),
        (b"[1, 2]\r\n", ProtocolError),
        (b"", Disconnected),
    ],
)
async def test_bad_greeting(tmp_path: Path, first: bytes, error: type[QMPError]) -> None:
    async def script(peer: Peer) -> None:
        if first:
            await peer.send_raw(first)
            await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path:
        with pytest.raises(error):
            async with open_qmp(path, deadline=5):
                pytest.fail("connected without a greeting")


async def test_refused_capabilities(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        cmd = await peer.recv()
        await peer.send({"error": {"class": "GenericError", "desc": "no"}, "id": cmd["id"]})
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path:
        with pytest.raises(ConnectError, match="negotiation refused") as info:
            async with open_qmp(path):
                pass
        assert isinstance(info.value.__cause__, GenericError)


async def test_no_greeting_hits_the_deadline(tmp_path: Path) -> None:
    async with fake_qmp(tmp_path, hold_open) as path:
        with pytest.raises(QMPDeadline, match="connect and greeting"):
            async with open_qmp(path, deadline=0.2):
                pass


async def test_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="cannot connect") as info:
        async with open_qmp(tmp_path / "none.sock", deadline=1):
            pass
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert info.value.exit_code == errors.ConnectError.exit_code
    with pytest.raises(QMPDeadline):
        async with open_qmp(tmp_path / "none.sock", deadline=0.1, retry=True):
            pass


async def test_retry_waits_for_the_socket_to_appear(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        await peer.reply({"status": "prelaunch"})
        await trio.sleep_forever()

    path = tmp_path / "qmp.sock"
    async with trio.open_nursery() as nursery:

        async def late_server() -> None:
            await trio.sleep(0.2)
            async with fake_qmp(tmp_path, script):
                await trio.sleep(2)

        nursery.start_soon(late_server)
        async with open_qmp(path, deadline=5, retry=True) as qmp:
            assert await qmp.execute("query-status") == {"status": "prelaunch"}
        nursery.cancel_scope.cancel()


async def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, trio.open_nursery() as nursery:
        qmp = await connect_qmp(path, nursery, deadline=5, name="vm1")
        assert repr(qmp) == "<QMPClient vm1 running>"
        async with qmp:
            pending_result: list[BaseException] = []

            async def waiting() -> None:
                try:
                    await qmp.execute("never-answered", deadline=5)
                except QMPError as exc:
                    pending_result.append(exc)

            nursery.start_soon(waiting)
            await trio.sleep(0.05)
        await qmp.aclose()
        assert qmp.runstate is Runstate.DISCONNECTED and qmp.disconnect_cause is None
        await trio.sleep(0.05)
        assert len(pending_result) == 1 and isinstance(pending_result[0], Disconnected)
        with pytest.raises(Disconnected, match="was closed"):
            await qmp.execute("x")


async def test_errors_from_the_block_are_not_wrapped(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path:
        with pytest.raises(KeyError):
            async with open_qmp(path):
                raise KeyError("mine")


def test_a_fresh_client_is_idle() -> None:
    client = QMPClient()
    assert client.runstate is Runstate.IDLE
    with pytest.raises(StateError):
        client.listen()


# --------------------------------------------------------------------------------------------
# Against QEMU

needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install-qemu.sh)"
)


@asynccontextmanager
async def qemu(tmp_path: Path, *extra: str) -> AsyncIterator[tuple[trio.Process, Path]]:
    """QEMU under TCG, stopped before the first instruction, with QMP on a unix socket."""
    assert QEMU is not None
    sock = tmp_path / "qmp.sock"
    argv = [QEMU, "-M", "q35", "-accel", "tcg", "-m", "128M", "-nodefaults", "-no-user-config"]
    argv += ["-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off", *extra]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(partial(trio.run_process, argv, check=False))
        try:
            yield process, sock
        finally:
            with trio.move_on_after(5):
                if process.returncode is None:
                    process.kill()
                await process.wait()


@needs_qemu
async def test_real_qemu_session(tmp_path: Path) -> None:
    async with qemu(tmp_path) as (process, sock), open_qmp(sock, deadline=10, retry=True) as qmp:
        assert qmp.greeting is not None and qmp.greeting.version >= (7, 0, 0)
        events = qmp.listen()
        version = await qmp.execute("query-version", deadline=5)
        assert tuple(version["qemu"][k] for k in ("major", "minor", "micro")) == qmp.greeting.version
        assert await qmp.execute("query-status", deadline=5) == {"status": "prelaunch", "running": False}

        with pytest.raises(CommandNotFound) as info:
            await qmp.execute("no-such-command", deadline=5)
        assert "has not been found" in info.value.desc
        with pytest.raises(GenericError, match="bogus"):
            await qmp.execute("query-status", {"bogus": 1}, deadline=5)

        await qmp.execute("cont", deadline=5)
        assert (await events.wait_for("RESUME", deadline=5)).name == "RESUME"
        assert (await qmp.execute("query-status", deadline=5))["running"] is True
        await qmp.execute("stop", deadline=5)
        assert (await events.wait_for("STOP", deadline=5)).timestamp is not None
        assert (await qmp.execute("query-status", deadline=5))["status"] == "paused"
        cpus = await qmp.execute("query-cpus-fast", deadline=5)
        assert len(cpus) == 1 and cpus[0]["thread-id"] > 0

        assert await qmp.execute("quit", deadline=5) == {}
        shutdown = await events.wait_for("SHUTDOWN", deadline=5)
        assert shutdown.data["reason"] == "host-qmp-quit"
        with trio.fail_after(5):
            assert [e async for e in events] == []  # then end of file
        assert qmp.runstate is Runstate.DISCONNECTED
        assert isinstance(qmp.disconnect_cause, Disconnected)
        with pytest.raises(Disconnected):
            await qmp.execute("query-status")
        with trio.fail_after(5):
            assert await process.wait() == 0


@needs_qemu
async def test_real_qemu_killed_under_a_pending_command(tmp_path: Path) -> None:
    """QEMU dies (SIGKILL) while a command is outstanding: it fails with the disconnect as cause."""
    async with qemu(tmp_path) as (process, sock), open_qmp(sock, deadline=10, retry=True) as qmp:
        async with trio.open_nursery() as nursery:
            failure: list[BaseException] = []

            async def outlive() -> None:
                try:
                    # Nothing in QMP blocks forever, so race a burst of commands against the kill.
                    while True:
                        await qmp.execute("query-status", deadline=5)
                except QMPError as exc:
                    failure.append(exc)

            nursery.start_soon(outlive)
            await trio.sleep(0.1)
            process.kill()
        assert len(failure) == 1 and isinstance(failure[0], Disconnected)
        with trio.fail_after(2):
            assert await qmp.wait_disconnected() is failure[0].__cause__
