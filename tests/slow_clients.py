"""Slow HTTP clients (slowloris) against the daemons' /metrics servers, for the tests of both."""

from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.request

import trio


def _status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


SLOW_CONNECTIONS = 200


async def open_slow_connections(port: int, count: int = SLOW_CONNECTIONS) -> list[trio.SocketStream]:
    """``count`` slowloris clients: each sends the start of a request head and then nothing."""
    streams = []
    for _ in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        streams.append(stream)
    await trio.sleep(0.2)  # the server has accepted them all
    return streams


async def scrape_beside_slow_clients(url: str, port: int) -> tuple[int, float, int]:
    """(status, seconds, connections the server dropped) of a scrape while 200 slow clients are open."""
    streams = await open_slow_connections(port)
    try:
        started = time.monotonic()
        status = await trio.to_thread.run_sync(_status_of, url)
        seconds = time.monotonic() - started
        dropped = 0
        for stream in streams:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                with trio.move_on_after(0.01):
                    if await stream.receive_some(100) == b"":
                        dropped += 1
        return status, seconds, dropped
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
