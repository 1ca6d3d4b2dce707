"""Forking while gRPC serves: grpcio's fork handlers stay out of the way (cvmctl/__init__.py).

The agent starts benchmark servers with fork and exec while grpc.aio serves. grpcio's fork
handlers, meant for children that keep using gRPC, ran at each of those forks (logging
"skipping fork() handlers") and once crashed an nginx child with SIGSEGV in the dev guest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from cvm.v1 import agent_pb2, agent_pb2_grpc
from tests.spine.agent_fixtures import agent_process
from workloads.catalogue import get
from workloads.runner import free_port


def test_every_program_disables_grpc_fork_handlers_before_importing_grpc() -> None:
    for module in ("guest_agent.main", "host_daemon.main", "cvmctl.cli.main"):
        script = f"import {module}, grpc, os; print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"
        env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        assert (done.returncode, done.stdout) == (0, "false\n"), (module, done.stderr)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (scripts/setup.sh)")
def test_agent_starts_a_benchmark_server_without_grpc_fork_handlers(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    with agent_process(sock, tmp_path / "state", "--log-level", "warning", env=env) as agent:
        nginx = get("nginx")
        request = agent_pb2.RunWorkloadRequest(
            workload="nginx",
            params=nginx.format_params({**nginx.defaults(), "port": free_port()}),
            role=agent_pb2.WORKLOAD_ROLE_SERVER,
        )
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            for _ in range(3):
                call: Any = agent_pb2_grpc.GuestAgentStub(channel).RunWorkload(request, timeout=30)
                first = next(iter(call))
                assert first.HasField("server_ready"), first
                call.cancel()
                time.sleep(0.3)
    assert agent.stderr is not None
    stderr = agent.stderr.read()
    assert "fork() handlers" not in stderr
