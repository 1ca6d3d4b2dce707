"""One benchmark server after another on the same port: the new one is the one reported ready.

The host ends a server's stream and asks for the next at once (the next repetition of a
run, or the next workload on the same port). The agent must not report the new server
ready while the previous one still holds the port, nor refuse it as "already runs" while
the previous one is only stopping: the client would meet the old server going away
("Connection refused", seen in the workload matrix with iperf-udp after iperf-tcp).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from cvm.v1 import agent_pb2, agent_pb2_grpc
from tests.spine.agent_fixtures import agent_process
from workloads.catalogue import get
from workloads.runner import free_port


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed (scripts/setup.sh)")
def test_back_to_back_servers_on_one_port_each_serve_a_client(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    port = free_port()
    iperf = get("iperf-tcp")
    params = iperf.format_params({**iperf.defaults(), "port": port, "listen": "127.0.0.1"})
    request = agent_pb2.RunWorkloadRequest(
        workload="iperf-tcp", params=params, role=agent_pb2.WORKLOAD_ROLE_SERVER
    )
    with agent_process(sock, tmp_path / "state", "--log-level", "warning") as agent:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = agent_pb2_grpc.GuestAgentStub(channel)
            for i in range(4):
                call: Any = stub.RunWorkload(request, timeout=60)
                first = next(iter(call))
                assert first.HasField("server_ready"), first
                client = subprocess.run(
                    ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", "64K", "-J"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                assert client.returncode == 0, (i, client.stdout[-400:], client.stderr)
                call.cancel()  # and at once the next one, with no pause
        assert agent.poll() is None
