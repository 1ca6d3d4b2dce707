"""GetMetrics: the agent's exposition over gRPC matches what its collectors read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cvm.v1 import agent_pb2, agent_pb2_grpc
from cvmcore.address import UnixAddress
from cvmcore.client import connect
from tests.conftest import REPO_ROOT
from tests.spine.agent_fixtures import agent_process

TREE = REPO_ROOT / "tests" / "fixtures" / "sysroots" / "snp-guest"


@pytest.fixture
def agent_on_snp_tree(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "a.sock"
    with agent_process(sock, tmp_path / "state", "--root", str(TREE)):
        yield sock


async def test_get_metrics_over_grpc(agent_on_snp_tree: Path) -> None:
    async with connect(UnixAddress(str(agent_on_snp_tree)), timeout=10) as client:
        stub = agent_pb2_grpc.GuestAgentStub(client.channel)
        await client.call(stub.GetInfo, agent_pb2.GetInfoRequest())
        response = await client.call(stub.GetMetrics, agent_pb2.GetMetricsRequest())
    text = response.text.decode()
    assert response.content_type.startswith("text/plain")
    assert 'cvm_guest_info{kernel="' in text and 'tee="sev-snp"' in text
    assert 'cvm_guest_cpuidle_info{driver="haltpoll",governor="haltpoll"} 1.0' in text
    assert "cvm_guest_swiotlb_size_bytes 1.073741824e+09" in text  # 524288 slabs of 2 KiB
    assert 'cvm_guest_agent_rpcs_total{code="OK",method="GetInfo"} 1.0' in text
