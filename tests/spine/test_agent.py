"""The agent end to end in-process: health and GetInfo over unix and through hybrid vsock."""

from __future__ import annotations

from pathlib import Path

import trio

from cvm.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from cvmcore.address import HybridVsockAddress, UnixAddress
from cvmcore.client import connect
from cvmcore.relay import RelayStats, dialer_for, serve_hybrid_vsock
from tests.spine.agent_fixtures import running_agent

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "guest-root"


async def test_health_and_info_over_unix(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    async with running_agent(sock, root=FIXTURE_ROOT), connect(UnixAddress(str(sock)), timeout=5) as client:
        assert await client.health() == "SERVING"
        assert await client.health("cvm.v1.GuestAgent") == "SERVING"
        info = await client.call(
            agent_pb2_grpc.GuestAgentStub(client.channel).GetInfo, agent_pb2.GetInfoRequest()
        )
    assert info.kernel_release == "6.12.9+bpo-amd64"
    assert info.hostname == "snp-guest"
    assert info.boot_id == "3c1f6a0e-8f59-4a43-9a0c-1f2e3d4c5b6a"
    assert info.uptime_seconds == 12.5
    assert info.kernel_cmdline.startswith("console=ttyS0")
    assert info.tee == common_pb2.TEE_SEV_SNP
    assert "sev_snp" in info.tee_evidence


async def test_grpc_through_hybrid_vsock(tmp_path: Path) -> None:
    """The host side of a hybrid vsock socket (CONNECT handshake) in front of a real agent."""
    agent_sock, hybrid_sock = tmp_path / "agent.sock", tmp_path / "vm.vsock"
    stats = RelayStats()
    async with running_agent(agent_sock), trio.open_nursery() as nursery:
        await nursery.start(
            serve_hybrid_vsock, str(hybrid_sock), {1024: dialer_for(UnixAddress(str(agent_sock)))}, stats
        )
        async with connect(HybridVsockAddress(str(hybrid_sock), 1024), timeout=5) as client:
            assert await client.health() == "SERVING"
            stub = agent_pb2_grpc.GuestAgentStub(client.channel)
            for _ in range(3):
                info = await client.call(stub.GetInfo, agent_pb2.GetInfoRequest())
                assert info.agent_version
        nursery.cancel_scope.cancel()
    assert stats.connections_total >= 2  # the reachability probe, then grpcio's connection
    assert stats.bytes_total["in"] > 0 and stats.bytes_total["out"] > 0
