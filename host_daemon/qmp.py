"""A QMP client on trio: how the daemon talks to a running QEMU.

QMP, the QEMU Machine Protocol (docs/interop/qmp-spec.rst in QEMU), is JSON objects over a
stream socket; the daemon starts QEMU with ``-qmp unix:<path>,server=on,wait=off``. A session
goes like this::

    <- {"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "..."},
                "capabilities": ["oob"]}}                      the greeting, as soon as we connect
    -> {"execute": "qmp_capabilities", "id": "qmp-1"}         leave negotiation mode
    <- {"return": {}, "id": "qmp-1"}
    -> {"execute": "query-status", "id": "qmp-2"}             a command, with an id of our choosing
    <- {"return": {"status": "running", "running": true}, "id": "qmp-2"}
    -> {"execute": "nope", "id": "qmp-3"}
    <- {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
        "id": "qmp-3"}
    <- {"event": "STOP", "data": {}, "timestamp": {"seconds": 1700000000, "microseconds": 5}}

QEMU may send the greeting from its monitor I/O thread while it is still creating devices; it
runs commands, ``qmp_capabilities`` included, only from its main loop once initialisation is
done. So :attr:`QMPClient.ready_at` (the capabilities reply) marks "QEMU is up", and
:attr:`QMPClient.greeting_at` only "QEMU is listening".

Every message from QEMU ends with CRLF. Replies carry the id of their command; events arrive
at any time between replies. Without the ``oob`` capability (never enabled here) QEMU answers
commands in the order it got them, which is how a reply *without* an id (QEMU could not parse
the command far enough to see it) is matched: to the oldest command still waiting.

Using it::

    async with open_qmp(socket_path, deadline=5.0) as qmp:
        print(qmp.greeting.version)                     # (10, 0, 2)
        events = qmp.listen({"SHUTDOWN", "STOP"})        # before the first await: misses nothing
        status = await qmp.execute("query-status", deadline=2.0)
        await qmp.execute("quit", deadline=2.0)
        event = await events.wait_for("SHUTDOWN", deadline=2.0)

Run states (:class:`Runstate`) are explicit: ``IDLE`` -> ``CONNECTING`` (socket open, greeting
and capabilities negotiation) -> ``RUNNING`` (commands and events) -> ``DISCONNECTING`` (we
are closing) -> ``DISCONNECTED``. The last is also where the client lands when QEMU goes away
(end of file, a reset connection, a protocol violation); :attr:`QMPClient.disconnect_cause`
then holds why, every command still waiting fails with :class:`Disconnected` carrying that
cause, and event listeners end after their buffered events.

Errors (:class:`QMPError` and below) each carry a message for a person and, as ``__cause__``,
what caused them. They also derive from the matching :mod:`cvmcore.errors` class, so the CLI
maps them to the right exit code::

    QMPError
    ├── ConnectError      nothing QMP answered at the socket    (cvmctl ConnectError)
    ├── Disconnected      the connection went away              (cvmctl ConnectError)
    ├── ProtocolError     the peer broke the protocol (bad JSON, no greeting, ...)
    ├── StateError        not possible in this run state (e.g. execute after close)
    ├── EventOverflow     a listener fell too far behind and was cut off
    ├── QMPDeadline       no answer in time                     (cvmctl DeadlineExceeded)
    └── ExecuteError      QEMU answered with an error; .error_class, .desc (cvmctl RemoteError)
        ├── GenericError, CommandNotFound, DeviceNotActive, DeviceNotFound, KVMMissingCap
        (the QAPI ErrorClass values of qapi/error.json)

Deadlines: connecting (greeting included), every command and closing are bounded by a
deadline in seconds. The background reader is the one unbounded wait, by design: events may be
hours apart; it ends when the connection does.
"""

from __future__ import annotations

import enum
import errno
import itertools
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from cvmcore import errors

DEFAULT_DEADLINE = 10.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RECENT_EVENTS = 64
RETRY_INTERVAL = 0.01


# --------------------------------------------------------------------------------------------
# Errors


class QMPError(errors.CvmError):
    """Anything that went wrong talking QMP."""


class ConnectError(QMPError, errors.ConnectError):
    """Nothing answered QMP at the socket (missing, refused, or not a QMP server)."""


class Disconnected(QMPError, errors.ConnectError):
    """The connection is gone; ``__cause__`` (and the client's ``disconnect_cause``) says why."""


class ProtocolError(QMPError):
    """The peer sent something QMP does not allow: invalid JSON, no greeting, an unknown message."""


class StateError(QMPError):
    """The operation is not possible in the client's current run state."""


class EventOverflow(QMPError):
    """A listener's buffer filled up; it was cut off rather than silently losing events."""


class QMPDeadline(QMPError, errors.DeadlineExceeded):
    """No answer before the deadline."""

    def __init__(self, what: str, deadline: float) -> None:
        super().__init__(f"{what}: no answer within {deadline:g} s")
        self.deadline = deadline


class ExecuteError(QMPError, errors.RemoteError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc

    @staticmethod
    def from_reply(command: str, error: object) -> ExecuteError:
        """The most specific subclass for a reply's ``error`` member."""
        if not isinstance(error, dict):
            return ExecuteError(command, "GenericError", f"malformed error member: {error!r}")
        cls = str(error.get("class", "GenericError"))
        desc = str(error.get("desc", ""))
        return ERROR_CLASSES.get(cls, ExecuteError)(command, cls, desc)


class GenericError(ExecuteError):
    """The catch-all class most QEMU errors use."""


class CommandNotFound(ExecuteError):
    """No such command, or a command other than qmp_capabilities before negotiation."""


class DeviceNotActive(ExecuteError):
    pass


class DeviceNotFound(ExecuteError):
    pass


class KVMMissingCap(ExecuteError):
    pass


ERROR_CLASSES: dict[str, type[ExecuteError]] = {
    "GenericError": GenericError,
    "CommandNotFound": CommandNotFound,
    "DeviceNotActive": DeviceNotActive,
    "DeviceNotFound": DeviceNotFound,
    "KVMMissingCap": KVMMissingCap,
}


# --------------------------------------------------------------------------------------------
# Data


class Runstate(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    DISCONNECTING = "disconnecting"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class Greeting:
    version: tuple[int, int, int]
    package: str
    capabilities: tuple[str, ...]

    @staticmethod
    def parse(msg: Mapping[str, Any]) -> Greeting:
        try:
            qmp = msg["QMP"]
            qemu = qmp["version"]["qemu"]
            return Greeting(
                version=(int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"])),
                package=str(qmp["version"].get("package", "")),
                capabilities=tuple(str(c) for c in qmp.get("capabilities", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"expected a QMP greeting, got {_short(msg)}") from exc


@dataclass(frozen=True)
class QMPEvent:
    name: str
    data: Mapping[str, Any]
    timestamp: float | None  # seconds since the epoch; None when QEMU could not read its clock

    @staticmethod
    def parse(msg: Mapping[str, Any]) -> QMPEvent:
        ts = msg.get("timestamp")
        when: float | None = None
        if isinstance(ts, dict):
            seconds, micros = ts.get("seconds", -1), ts.get("microseconds", -1)
            if isinstance(seconds, int) and isinstance(micros, int) and seconds >= 0:
                when = seconds + micros / 1e6
        data = msg.get("data")
        return QMPEvent(name=str(msg["event"]), data=data if isinstance(data, dict) else {}, timestamp=when)


def _short(msg: object, limit: int = 200) -> str:
    text = repr(msg)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# Events


class EventListener:
    """A subscription to events, fed by the client's reader through a trio memory channel.

    Iterate it (``async for event in listener``) or call :meth:`get` / :meth:`wait_for` with
    a deadline. It ends when the connection ends, after the events already buffered; if it
    fell ``max_buffer`` events behind it is cut off and raises :class:`EventOverflow`. Use it
    as a context manager (or call :meth:`close`) to unsubscribe.
    """

    def __init__(self, client: QMPClient, names: frozenset[str] | None, max_buffer: int) -> None:
        self._client = client
        self.names = names
        self._send, self._receive = trio.open_memory_channel[QMPEvent](max_buffer)
        self.overflowed = False

    def _offer(self, event: QMPEvent) -> None:
        if self.names is not None and event.name not in self.names:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.overflowed = True
            self._send.close()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _end(self) -> None:
        self._send.close()

    def close(self) -> None:
        self._client._listeners.discard(self)
        self._send.close()
        self._receive.close()

    def __enter__(self) -> EventListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ended(self) -> QMPError:
        if self.overflowed:
            return EventOverflow(
                f"QMP event listener fell more than {self._receive.statistics().max_buffer_size} behind"
            )
        cause = self._client.disconnect_cause
        if cause is None:
            return Disconnected("QMP connection closed")
        err = Disconnected(f"QMP connection lost: {cause}")
        err.__cause__ = cause
        return err

    def __aiter__(self) -> EventListener:
        return self

    async def __anext__(self) -> QMPEvent:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self.overflowed:
                raise self._ended() from None
            raise StopAsyncIteration from None

    async def get(self, *, deadline: float = DEFAULT_DEADLINE) -> QMPEvent:
        """The next event; :class:`QMPDeadline` if none comes in time, or why the stream ended."""
        with trio.move_on_after(deadline):
            try:
                return await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise self._ended() from None
        raise QMPDeadline("QMP event", deadline)

    async def wait_for(self, name: str, *, deadline: float = DEFAULT_DEADLINE) -> QMPEvent:
        """Skip events until one called ``name``; all within one deadline."""
        with trio.move_on_after(deadline):
            while True:
                try:
                    event = await self._receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    raise self._ended() from None
                if event.name == name:
                    return event
        raise QMPDeadline(f"QMP event {name}", deadline)


# --------------------------------------------------------------------------------------------
# The client


@dataclass
class _Pending:
    command: str
    done: trio.Event = field(default_factory=trio.Event)
    reply: Mapping[str, Any] | None = None
    error: QMPError | None = None


class QMPClient:
    """One QMP connection. Make it with :func:`open_qmp`, which owns the reader task."""

    def __init__(self, name: str = "qmp") -> None:
        self.name = name
        self.runstate = Runstate.IDLE
        self.greeting: Greeting | None = None
        self.greeting_at: float | None = None  # time.monotonic() when the greeting arrived
        self.ready_at: float | None = None  # time.monotonic() of the capabilities reply (QEMU initialised)
        self.disconnect_cause: QMPError | None = None
        self.recent_events: deque[QMPEvent] = deque(maxlen=RECENT_EVENTS)
        self.dropped_replies = 0  # replies to commands nobody waits for any more (deadline passed)
        self._stream: trio.SocketStream | None = None
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._listeners: set[EventListener] = set()
        self._send_lock = trio.Lock()
        self._reader_done = trio.Event()
        self._started_reader = False
        self._disconnected = trio.Event()

    def __repr__(self) -> str:
        return f"<QMPClient {self.name} {self.runstate.value}>"

    # -- public ------------------------------------------------------------------------------

    def listen(self, names: Iterable[str] | None = None, *, max_buffer: int = 256) -> EventListener:
        """Subscribe to events (all, or those named). Call it before your next await to miss none."""
        if self.runstate is not Runstate.RUNNING:
            raise StateError(f"QMP listen: the client is {self.runstate.value}, not running")
        listener = EventListener(self, frozenset(names) if names is not None else None, max_buffer)
        self._listeners.add(listener)
        return listener

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, deadline: float = DEFAULT_DEADLINE
    ) -> Any:
        """Run a command and return its ``return`` member.

        Raises :class:`ExecuteError` (the subclass for its error class) when QEMU answers with
        an error, :class:`QMPDeadline` when no answer comes in time (a late answer is dropped),
        :class:`Disconnected` when the connection goes away first.
        """
        if self.runstate is not Runstate.RUNNING:
            raise self._not_running(command)
        msg_id = f"{self.name}-{next(self._ids)}"
        message: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            message["arguments"] = dict(arguments)
        pending = _Pending(command)
        self._pending[msg_id] = pending
        try:
            with trio.move_on_after(deadline):
                await self._send(message, command)
                await pending.done.wait()
        finally:
            self._pending.pop(msg_id, None)
        if pending.error is not None:
            raise pending.error
        if pending.reply is None:
            raise QMPDeadline(f"QMP {command}", deadline)
        if "error" in pending.reply:
            raise ExecuteError.from_reply(command, pending.reply["error"])
        return pending.reply["return"]

    async def wait_disconnected(self) -> QMPError | None:
        """Wait until the client is DISCONNECTED; return the cause (None: closed by us).

        This is how the daemon notices QEMU going away. It waits as long as the connection
        lives, so callers wanting a bound wrap it in ``trio.move_on_after``.
        """
        await self._disconnected.wait()
        return self.disconnect_cause

    async def aclose(self, *, deadline: float = 2.0) -> None:
        """Close the connection (idempotent). Waiting commands fail with :class:`Disconnected`."""
        if self.runstate in (Runstate.DISCONNECTED, Runstate.IDLE):
            self.runstate = Runstate.DISCONNECTED
            self._disconnected.set()
            return
        self.runstate = Runstate.DISCONNECTING
        with trio.move_on_after(deadline) as scope:
            scope.shield = True  # closing must happen even when our caller is being cancelled
            if self._stream is not None:
                await self._stream.aclose()
            if self._started_reader:
                await self._reader_done.wait()
        self._finish(None)

    # -- connection set-up -------------------------------------------------------------------

    async def _connect(self, path: Path, *, retry: bool) -> None:
        """Open the socket, read the greeting, negotiate capabilities. The caller bounds it."""
        self.runstate = Runstate.CONNECTING
        while True:
            try:
                self._stream = await trio.open_unix_socket(str(path))
                break
            except OSError as exc:
                if retry and exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                    await trio.sleep(RETRY_INTERVAL)
                    continue
                raise ConnectError(f"QMP {path}: cannot connect: {exc.strerror or exc}") from exc
        self.greeting = Greeting.parse(await self._read_message())
        self.greeting_at = time.monotonic()
        msg_id = f"{self.name}-{next(self._ids)}"
        await self._send({"execute": "qmp_capabilities", "id": msg_id}, "qmp_capabilities")
        reply = await self._read_message()
        if "error" in reply:
            raise ConnectError(f"QMP {path}: capabilities negotiation refused") from ExecuteError.from_reply(
                "qmp_capabilities", reply["error"]
            )
        if "return" not in reply or reply.get("id") != msg_id:
            raise ProtocolError(f"QMP {path}: expected the qmp_capabilities reply, got {_short(reply)}")
        self.ready_at = time.monotonic()
        self.runstate = Runstate.RUNNING

    def _start_reader(self, nursery: trio.Nursery) -> None:
        self._started_reader = True
        nursery.start_soon(self._reader, name=f"{self.name} reader")

    # -- wire --------------------------------------------------------------------------------

    async def _send(self, message: Mapping[str, Any], command: str) -> None:
        assert self._stream is not None
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                lost = self._lost(f"sending {command}", exc)
                if lost.__cause__ is None:
                    lost.__cause__ = exc
                if self.disconnect_cause is None and self.runstate is Runstate.RUNNING:
                    self.disconnect_cause = lost  # the reader will find the same and keep this
                err = Disconnected(f"QMP {command}: the connection is gone: {lost}")
                raise err from lost
            except trio.Cancelled:
                if self.runstate is Runstate.RUNNING:
                    # Cancelled (say, by the caller's deadline) possibly part-way: QEMU may hold
                    # half a command and the stream cannot be trusted any more. Close the
                    # socket; the reader wakes up and records this as the cause.
                    self.disconnect_cause = Disconnected(f"QMP {command}: cancelled while sending")
                    self._stream.socket.close()
                raise

    async def _read_message(self) -> dict[str, Any]:
        """The next JSON object from the stream (one per line)."""
        assert self._stream is not None
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline]).strip()
                del self._buffer[: newline + 1]
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError as exc:
                    raise ProtocolError(f"QMP: invalid JSON from the peer: {_short(line)}") from exc
                if not isinstance(msg, dict):
                    raise ProtocolError(f"QMP: expected a JSON object, got {_short(msg)}")
                return msg
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"QMP: a message longer than {MAX_MESSAGE_BYTES} bytes")
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._lost("reading", exc) from exc
            if not chunk:
                raise Disconnected("QMP: the peer closed the connection (end of file)")
            self._buffer += chunk

    def _lost(self, doing: str, exc: BaseException) -> QMPError:
        if self.runstate is Runstate.DISCONNECTING:
            return Disconnected("QMP connection closed by the client")
        if isinstance(exc, trio.ClosedResourceError) and self.disconnect_cause is not None:
            return self.disconnect_cause
        root = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
        detail = root.strerror if isinstance(root, OSError) and root.strerror else type(root).__name__
        return Disconnected(f"QMP: connection lost while {doing}: {detail}")

    # -- reader ------------------------------------------------------------------------------

    async def _reader(self) -> None:
        cause: QMPError | None = None
        try:
            while True:
                self._dispatch(await self._read_message())
        except QMPError as exc:
            cause = None if self.runstate is Runstate.DISCONNECTING else exc
        finally:
            self._finish(cause)
            self._reader_done.set()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            event = QMPEvent.parse(msg)
            self.recent_events.append(event)
            for listener in list(self._listeners):
                listener._offer(event)
            return
        if "return" in msg or "error" in msg:
            msg_id = msg.get("id")
            if msg_id is None:
                # An error QEMU raised before it could read the id: commands are answered in
                # order (no out-of-band execution), so it belongs to the oldest one waiting.
                pending = next(iter(self._pending.values()), None)
            else:
                pending = self._pending.get(msg_id) if isinstance(msg_id, str) else None
            if pending is None or pending.done.is_set():
                self.dropped_replies += 1  # qmp-spec: "drop all the responses that have an unknown id"
                return
            pending.reply = msg
            pending.done.set()
            return
        raise ProtocolError(f"QMP: a message that is neither reply nor event: {_short(msg)}")

    def _finish(self, cause: QMPError | None) -> None:
        """Enter DISCONNECTED: record the cause, fail waiting commands, end listeners."""
        if cause is not None and self.disconnect_cause is None:
            self.disconnect_cause = cause
        self.runstate = Runstate.DISCONNECTED
        self._disconnected.set()
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = self._not_running(pending.command)
                pending.done.set()
        for listener in list(self._listeners):
            listener._end()
        if self._stream is not None:
            self._stream.socket.close()

    def _not_running(self, command: str) -> QMPError:
        if self.runstate is Runstate.DISCONNECTED or self.runstate is Runstate.DISCONNECTING:
            cause = self.disconnect_cause
            if cause is None:
                return Disconnected(f"QMP {command}: the connection was closed")
            err = Disconnected(f"QMP {command}: the connection is gone: {cause}")
            err.__cause__ = cause
            return err
        return StateError(f"QMP {command}: the client is {self.runstate.value}, not running")

    async def __aenter__(self) -> QMPClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def connect_qmp(
    path: Path | str,
    nursery: trio.Nursery,
    *,
    deadline: float = DEFAULT_DEADLINE,
    retry: bool = False,
    name: str = "qmp",
) -> QMPClient:
    """Connect to the QMP socket at ``path``; return a RUNNING client whose reader runs in ``nursery``.

    ``deadline`` bounds connecting, the greeting and capabilities negotiation together. With
    ``retry``, a socket that does not exist yet or refuses is tried again every 10 ms until the
    deadline (QEMU creates it shortly after exec). The caller closes the client with
    :meth:`QMPClient.aclose` (or ``async with client``).
    """
    client = QMPClient(name)
    try:
        with trio.move_on_after(deadline) as scope:
            await client._connect(Path(path), retry=retry)
        if scope.cancelled_caught:
            raise QMPDeadline(f"QMP {path}: connect and greeting", deadline)
    except BaseException:
        await client.aclose()
        raise
    client._start_reader(nursery)
    return client


@asynccontextmanager
async def open_qmp(
    path: Path | str, *, deadline: float = DEFAULT_DEADLINE, retry: bool = False, name: str = "qmp"
) -> AsyncIterator[QMPClient]:
    """:func:`connect_qmp` with a nursery of its own: a client for the duration of the block.

    The reader task never raises, so an error from the block comes out as itself, not wrapped
    in an exception group.
    """
    try:
        async with trio.open_nursery() as nursery:
            client = await connect_qmp(path, nursery, deadline=deadline, retry=retry, name=name)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        only = group.exceptions[0]
        raise only from only.__cause__


__all__ = [
    "DEFAULT_DEADLINE",
    "CommandNotFound",
    "ConnectError",
    "DeviceNotActive",
    "DeviceNotFound",
    "Disconnected",
    "EventListener",
    "EventOverflow",
    "ExecuteError",
    "GenericError",
    "Greeting",
    "KVMMissingCap",
    "ProtocolError",
    "QMPClient",
    "QMPDeadline",
    "QMPError",
    "QMPEvent",
    "Runstate",
    "StateError",
    "connect_qmp",
    "open_qmp",
]
