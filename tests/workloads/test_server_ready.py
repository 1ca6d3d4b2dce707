"""A guest server is ready when its port is in LISTEN state, seen without connecting to it."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from workloads.execute import listening_ports, wait_for_port

#: /proc/net/tcp and tcp6 as Linux 6.x prints them (proc_net_tcp): listeners on
#: 127.0.0.1:37679, 0.0.0.0:2024 and [::]:7175, and an established connection from port 8080
#: (not a listener).
PROC = Path(__file__).parent / "fixtures" / "proc-net"


def test_listening_ports_from_a_recorded_proc_net() -> None:
    assert listening_ports(PROC) == {0x932F, 2024, 7175}


def test_no_proc_net_means_no_listener(tmp_path: Path) -> None:
    assert listening_ports(tmp_path) == set()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process that stays alive: the "server" whose exit wait_for_port watches for."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield process
    process.kill()
    process.wait()


@pytest.mark.trio
async def test_ready_without_a_connection_to_the_server(sleeper: subprocess.Popen[bytes]) -> None:
    """The readiness check never connects: a server counting its accepted connections has none."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    try:
        with trio.move_on_after(0.3) as waited:
            await wait_for_port("127.0.0.1", port, sleeper, timeout=5)
        assert waited.cancelled_caught, "ready before anything listened"
        sock.listen(1)
        sock.setblocking(False)
        await wait_for_port("127.0.0.1", port, sleeper, timeout=5)
        with pytest.raises(BlockingIOError):
            sock.accept()  # nobody connected
    finally:
        sock.close()
