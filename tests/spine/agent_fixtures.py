"""An in-process guest agent on a unix socket, for tests that need a real server."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import trio

from cvmcore.address import Address, UnixAddress
from cvmcore.serve import ServerOptions, serve_grpc
from guest_agent.server import GuestAgentService, agent_handlers
from guest_agent.tee import detect_tee


@asynccontextmanager
async def running_agent(socket_path: Path, root: Path = Path("/")) -> AsyncIterator[list[Address]]:
    service = GuestAgentService(root=root, detect_tee=lambda: detect_tee(root))
    options = ServerOptions(listen=[UnixAddress(str(socket_path))], stop_grace=0.5)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_grpc, agent_handlers(service), options)
        yield bound
        nursery.cancel_scope.cancel()


def agent_argv(sock: Path, state_dir: Path, *extra: str) -> list[str]:
    """The installed ``cvm-agent`` on a unix socket, with a private state dir and without
    mounting debugfs on this machine; ``extra`` arguments follow (``--root``, ...)."""
    return [
        str(Path(sys.executable).parent / "cvm-agent"),
        "--listen",
        f"unix://{sock}",
        "--state-dir",
        str(state_dir),
        "--no-mount-debugfs",
        *extra,
    ]


def spawn_agent(
    sock: Path, state_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """:func:`agent_argv` started, its stderr piped to the test."""
    return subprocess.Popen(
        agent_argv(sock, state_dir, *extra),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_socket(path: Path, process: subprocess.Popen[str], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited early: {process.stderr.read() if process.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {seconds} s")
        time.sleep(0.02)


@contextmanager
def agent_process(
    sock: Path, state_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """:func:`spawn_agent`, once its socket is there; terminated (SIGTERM) afterwards."""
    process = spawn_agent(sock, state_dir, *extra, env=env)
    try:
        wait_for_socket(sock, process)
        yield process
    finally:
        process.terminate()
        process.wait(10)
