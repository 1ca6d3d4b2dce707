"""The installed programs as a user runs them: cvm-agent, cvm-hostd and cvmctl, as subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.spine.agent_fixtures import agent_process, spawn_agent, wait_for_socket

BIN = Path(sys.executable).parent


def cvmctl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "cvmctl"), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "a.sock"
    with agent_process(sock, tmp_path / "state", "--log-format", "json"):
        yield sock


def test_health_prints_serving(agent: Path) -> None:
    result = cvmctl("agent", "health", "--connect", f"unix://{agent}")
    assert (result.returncode, result.stdout, result.stderr) == (0, "SERVING\n", "")


def test_info_table_and_json(agent: Path) -> None:
    table = cvmctl("agent", "info", "--connect", f"unix://{agent}")
    assert table.returncode == 0, table.stderr
    assert "agent version" in table.stdout and "TEE" in table.stdout
    as_json = cvmctl("agent", "info", "--connect", f"unix://{agent}", "--json")
    import json

    data = json.loads(as_json.stdout)
    assert data["tee"] == "none"
    assert data["kernel_release"] == os.uname().release


@pytest.fixture
def silent_listener(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that accepts connections and never says a word."""
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    try:
        yield path
    finally:
        server.close()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--connect", "foo"], 2, "invalid address 'foo': expected one of unix:///path/to.sock"),
        (["--connect", "tcp://127.0.0.1:70000"], 2, "port 70000 is out of range (1..65535)"),
        (["--connect", "vsock://3:99999999999"], 2, "port 99999999999 is out of range"),
        (
            ["--connect", "unix:///nonexistent/a.sock"],
            3,
            "nothing is listening at unix:///nonexistent/a.sock (No such file or directory)",
        ),
        (
            ["--connect", "tcp://127.0.0.1:1"],
            3,
            "nothing is listening at tcp://127.0.0.1:1 (Connection refused)",
        ),
        (["--connect", "hvsock:///nonexistent/vm.vsock:1024"], 3, "no such socket"),
        (["--connect", "unix:///x.sock", "--timeout", "0"], 2, "--timeout must be a positive number"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], code: int, message: str) -> None:
    result = cvmctl("agent", "health", *args)
    assert result.returncode == code
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert result.stderr.startswith("cvmctl: error: ")
    assert message in result.stderr


def test_deadline_exceeded(silent_listener: Path) -> None:
    started = time.monotonic()
    result = cvmctl("agent", "health", "--connect", f"unix://{silent_listener}", "--timeout", "0.5")
    assert result.returncode == 4
    assert result.stderr == (f"cvmctl: error: unix://{silent_listener}: no answer to Check within 0.5 s\n")
    assert time.monotonic() - started < 5


def test_usage_errors_from_argparse() -> None:
    result = cvmctl("agent", "health")
    assert result.returncode == 2
    assert "--connect" in result.stderr
    assert "Traceback" not in result.stderr
    assert cvmctl("--help").stdout.count("hvsock://") >= 1


def test_sigterm_stops_within_5_s_and_sd_notify_ready(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(15)
    sock = tmp_path / "a.sock"
    process = spawn_agent(sock, tmp_path / "state", env={**os.environ, "NOTIFY_SOCKET": str(notify_path)})
    try:
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving on unix://")
        assert cvmctl("agent", "health", "--connect", f"unix://{sock}").stdout == "SERVING\n"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(5) == 0
        assert time.monotonic() - started < 5
        assert notify.recv(4096) == b"STOPPING=1"
        assert not sock.exists()  # the socket file is cleaned up
    finally:
        process.kill()
        notify.close()


def test_agent_rejects_hvsock_listen() -> None:
    result = subprocess.run(
        [str(BIN / "cvm-agent"), "--listen", "hvsock:///tmp/x.sock:1024"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert "hybrid vsock is the host side" in result.stderr
    assert "Traceback" not in result.stderr


def test_hostd_serves_its_api(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "hostd.sock"
    process = subprocess.Popen(
        [str(BIN / "cvm-hostd"), "--state-dir", str(tmp_path / "state"), "--listen", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_socket(sock, process)
        assert oct(sock.stat().st_mode & 0o777) == "0o660"
        result = cvmctl("agent", "health", "--connect", f"unix://{sock}")
        assert result.stdout == "SERVING\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(5) == 0
    finally:
        process.kill()
