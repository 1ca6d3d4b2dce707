"""Property tests of the /metrics HTTP server's request handling (the agent's and, through
the same ``serve_connection``, the host daemon's): whatever bytes a client sends, the
connection gets one HTTP/1.1 answer with a status the module documents (200, 400, 404,
405), and the handler never raises. Raw bytes go over a real socket pair to the handler.
``benchmarks/fuzz.py --target http`` runs the same property coverage-guided."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmcore.metrics_http import (
    MAX_REQUEST_HEAD,
    METRICS_PATH,
    ConnectionSlots,
    metrics_answer,
    parse_request_line,
    serve_connection,
)

SETTINGS = settings(max_examples=120, deadline=None)
BODY = b"# metrics\n"


async def exchange(data: bytes) -> bytes:
    """Send ``data`` (then EOF) to one connection's handler; everything it answers."""
    server_sock, client_sock = trio.socket.socketpair()
    server, client = trio.SocketStream(server_sock), trio.SocketStream(client_sock)
    reply = b""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                serve_connection, metrics_answer(lambda encoder: BODY), ConnectionSlots(), server
            )
            async with client:
                try:
                    await client.send_all(data)
                    await client.send_eof()
                except trio.BrokenResourceError:
                    pass  # the server answered and closed before reading it all
                while chunk := await client.receive_some(65536):
                    reply += chunk
    return reply


def status_of(reply: bytes) -> int:
    line = reply.split(b"\r\n", 1)[0]
    version, status, _ = line.split(b" ", 2)
    assert version == b"HTTP/1.1", line
    assert b"\r\n\r\n" in reply and b"Connection: close\r\n" in reply
    return int(status)


@SETTINGS
@given(st.binary(max_size=2 * MAX_REQUEST_HEAD))
def test_request_line_of_any_bytes(head: bytes) -> None:
    parsed = parse_request_line(head)
    assert parsed is None or (
        isinstance(parsed.method, str)
        and isinstance(parsed.path, str)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.headers.items())
    )


@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=512),
        st.binary(max_size=64).map(lambda b: b + b"\r\n\r\n"),
        st.binary(min_size=MAX_REQUEST_HEAD, max_size=MAX_REQUEST_HEAD + 5000),
    )
)
def test_any_bytes_get_one_documented_answer(data: bytes) -> None:
    reply = trio.run(exchange, data)
    assert reply, "every connection that sends and closes gets an answer"
    assert status_of(reply) in (200, 400, 404, 405)


@SETTINGS
@given(
    method=st.one_of(
        st.sampled_from(["GET", "HEAD", "POST", "get"]), st.text("ABCDEFGHIJ", min_size=1, max_size=8)
    ),
    path=st.one_of(
        st.sampled_from([METRICS_PATH, METRICS_PATH + "?x=1", "/", "/metrics/", "*"]),
        st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
    ),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTX/1.1"]),
    headers=st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30), max_size=4),
)
def test_well_formed_requests_get_the_routed_status(
    method: str, path: str, version: str, headers: list[str]
) -> None:
    head = "\r\n".join([f"{method} {path} {version}", *headers]).encode() + b"\r\n\r\n"
    status = status_of(trio.run(exchange, head))
    if not version.startswith("HTTP/") or " " in method or not method:
        assert status == 400
    elif path.split("?", 1)[0] != METRICS_PATH:
        assert status == 404
    elif method not in ("GET", "HEAD"):
        assert status == 405
    else:
        assert status == 200
