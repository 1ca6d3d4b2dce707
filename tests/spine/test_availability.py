"""Both daemons stay available and recover: one per socket and state directory, a taken
metrics port is one line, a thousand idle peers do not exhaust descriptors, a bad record
does not stop a start, and a killed process leaves no private directory behind."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmcore.errors import AlreadyRunning
from guest_agent.idle_polling import STATE_FILE_NAME
from tests.spine.agent_fixtures import agent_process, spawn_agent, wait_for_socket

BIN = Path(sys.executable).parent


def health(sock: Path, timeout: float = 20) -> str:
    result = subprocess.run(
        [str(BIN / "cvmctl"), "agent", "health", "--connect", f"unix://{sock}", "--timeout", "10"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.stdout.strip() or result.stderr.strip()


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)


def one_line_error(result: subprocess.CompletedProcess[str], prog: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def hostd_argv(state: Path, sock: Path, *extra: str) -> list[str]:
    return [str(BIN / "cvm-hostd"), "--state-dir", str(state), "--listen", f"unix://{sock}", *extra]


@pytest.fixture
def hostd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    state, sock = tmp_path / "state", tmp_path / "h.sock"
    process = subprocess.Popen(
        hostd_argv(state, sock), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_socket(sock, process, 30)
        yield state, sock
    finally:
        process.terminate()
        process.wait(10)


# ---- one daemon per socket and per state directory -------------------------------------------


def test_a_second_agent_refuses_a_socket_a_live_agent_serves(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    with agent_process(sock, tmp_path / "state1"):
        second = spawn_agent(sock, tmp_path / "state2")
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == AlreadyRunning.exit_code, stderr
        assert "another server is listening there" in stderr and "Traceback" not in stderr
        assert health(sock) == "SERVING"  # the first still owns its socket


def test_a_second_agent_refuses_a_state_directory_in_use(tmp_path: Path) -> None:
    with agent_process(tmp_path / "a.sock", tmp_path / "state") as first:
        second = spawn_agent(tmp_path / "b.sock", tmp_path / "state")
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == AlreadyRunning.exit_code, stderr
        assert f"another cvm-agent (pid {first.pid}) is using the state directory" in stderr


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens: what a killed agent leaves
    with agent_process(sock, tmp_path / "state") as process:
        deadline = time.monotonic() + 30  # the file was there before the agent listened
        while (answer := health(sock)) != "SERVING" and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.2)
        assert answer == "SERVING"


def test_a_second_hostd_refuses_a_state_directory_in_use(hostd: tuple[Path, Path], tmp_path: Path) -> None:
    state, _ = hostd
    result = run(hostd_argv(state, tmp_path / "other.sock"))
    assert result.returncode == AlreadyRunning.exit_code
    assert "another cvm-hostd (pid " in one_line_error(result, "cvm-hostd")
    assert not (tmp_path / "other.sock").exists()


def test_a_second_hostd_refuses_a_socket_in_use(hostd: tuple[Path, Path], tmp_path: Path) -> None:
    _, sock = hostd
    result = run(hostd_argv(tmp_path / "state2", sock))
    assert result.returncode == AlreadyRunning.exit_code
    assert "another server is listening there" in one_line_error(result, "cvm-hostd")
    assert health(sock) == "SERVING"


# ---- a taken --metrics-listen port ------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_agent_metrics_port_in_use_is_one_line(tmp_path: Path, taken_port: int) -> None:
    process = spawn_agent(
        tmp_path / "a.sock", tmp_path / "state", "--metrics-listen", f"tcp://127.0.0.1:{taken_port}"
    )
    _, stderr = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    line = one_line_error(result, "cvm-agent")
    assert process.returncode == 2
    assert f"cannot serve /metrics on tcp://127.0.0.1:{taken_port}: Address already in use" in line


def test_hostd_metrics_port_in_use_is_one_line(tmp_path: Path, taken_port: int) -> None:
    result = run(
        hostd_argv(
            tmp_path / "state", tmp_path / "h.sock", "--metrics-listen", f"tcp://127.0.0.1:{taken_port}"
        )
    )
    line = one_line_error(result, "cvm-hostd")
    assert result.returncode == 2
    assert f"cannot serve /metrics on tcp://127.0.0.1:{taken_port}: Address already in use" in line


# ---- descriptors ------------------------------------------------------------------------------

IDLE_CONNECTIONS = 1100
DEFAULT_SOFT_LIMIT = 1024  # what a service gets unless it raises it


def _soft_limit_1024() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (DEFAULT_SOFT_LIMIT, hard))


@pytest.mark.parametrize("daemon", ["cvm-agent", "cvm-hostd"])
def test_1100_idle_connections_leave_the_daemon_answering(tmp_path: Path, daemon: str) -> None:
    """Started with the service default of 1024 open files, each daemon raises its own limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * IDLE_CONNECTIONS:
        pytest.skip(f"the hard limit on open files here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test holds 1,100 itself
    sock = tmp_path / "d.sock"
    argv = [str(BIN / daemon), "--listen", f"unix://{sock}", "--state-dir", str(tmp_path / "s")]
    if daemon == "cvm-agent":
        argv.append("--no-mount-debugfs")
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_soft_limit_1024
    )
    idle: list[socket.socket] = []
    try:
        wait_for_socket(sock, process, 30)
        for _ in range(IDLE_CONNECTIONS):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(sock))
            idle.append(client)
        assert health(sock, timeout=60) == "SERVING"
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        assert f"Max open files            {hard}" in limits
    finally:
        for client in idle:
            client.close()
        process.terminate()
        process.wait(10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---- recovery at start ------------------------------------------------------------------------


def test_a_truncated_idle_polling_record_does_not_stop_the_agent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE_NAME).write_text('{"format": 1, "mode": "halt')
    sock = tmp_path / "a.sock"
    process = spawn_agent(sock, state, "--log-format", "json")
    try:
        wait_for_socket(sock, process, 30)
        assert health(sock) == "SERVING"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    (report,) = [e for e in events if e.get("event") == "idle_polling_recovery_incomplete"]
    assert report["outcome"] == "discarded"
    aside = Path(report["set_aside"])
    assert aside.parent == state and aside.read_text() == '{"format": 1, "mode": "halt'
    assert not (state / STATE_FILE_NAME).exists()


# ---- private directories ----------------------------------------------------------------------


def test_a_killed_agent_leaves_no_private_directory(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    first = spawn_agent(tmp_path / "a.sock", tmp_path / "s1", env=env)
    wait_for_socket(tmp_path / "a.sock", first, 30)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    leftover = [p.name for p in tmp.iterdir() if p.name.startswith("cvm-grpc-")]
    assert len(leftover) == 1  # what SIGKILL leaves ...
    with agent_process(tmp_path / "b.sock", tmp_path / "s2", env=env):
        now = [p.name for p in tmp.iterdir() if p.name.startswith("cvm-grpc-")]
        assert len(now) == 1 and now != leftover  # ... the next start removes
