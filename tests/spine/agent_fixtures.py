"""An in-process guest agent on a unix socket, for tests that need a real server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from cvmctl.address import Address, UnixAddress
from cvmctl.serve import ServerOptions, serve_grpc
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


def spawn_agent(
    sock: Path, state_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """The installed ``cvm-agent`` on a unix socket, with a private state dir and without
    mounting debugfs on this machine; ``extra`` arguments follow (``--root``, ...)."""
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "cvm-agent"),
            "--listen",
            f"unix://{sock}",
            "--state-dir",
            str(state_dir),
            "--no-mount-debugfs",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
