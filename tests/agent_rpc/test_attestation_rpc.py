"""Attestation through the agent: fetch over gRPC with `cvmctl attest fetch`, verify offline.

The guest kernel's configfs-tsm is played by the attestation tests' fake, serving a real
SEV-SNP report (Milan, VLEK-signed) captured on hardware, so the report that crosses the
agent verifies against AMD's chain.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from cvm.v1 import agent_pb2, agent_pb2_grpc
from cvmcore.address import UnixAddress
from cvmcore.client import connect
from cvmcore.errors import RemoteError, UsageError
from cvmcore.serve import ServerOptions, serve_grpc
from guest_agent.attestation.guest import fetch_evidence
from guest_agent.server import GuestAgentService, agent_handlers
from guest_agent.tee import detect_tee
from tests.attestation.test_attest_guest import (
    VLEK_REPORT,
    FakeTsmKernel,
    _snp_outblob,
    _tree,
    _vlek_cert_table,
)

BIN = Path(sys.executable).parent


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=False)


@pytest.fixture
async def agent_with_snp_kernel(
    attestation_testdata: Path, tmp_path: Path, registry: CollectorRegistry
) -> AsyncIterator[tuple[str, bytes]]:
    template = (attestation_testdata / VLEK_REPORT).read_bytes()
    kernel = FakeTsmKernel("sev_guest", _snp_outblob(template), floor=1)
    kernel.auxblob = _vlek_cert_table(attestation_testdata)
    root = _tree(tmp_path / "guest")
    service = GuestAgentService(
        root=root,
        detect_tee=lambda: detect_tee(root),
        attestation_fetch=functools.partial(fetch_evidence, configfs=kernel),
        metrics=registry,
    )
    sock = tmp_path / "agent.sock"
    async with trio.open_nursery() as nursery:
        options = ServerOptions(listen=[UnixAddress(str(sock))], stop_grace=0.5)
        await nursery.start(serve_grpc, agent_handlers(service), options)
        yield f"unix://{sock}", template[0x50:0x90]
        nursery.cancel_scope.cancel()


async def test_fetch_through_the_agent_then_verify(
    agent_with_snp_kernel: tuple[str, bytes], tmp_path: Path, registry: CollectorRegistry
) -> None:
    address, nonce = agent_with_snp_kernel
    report, certs = tmp_path / "report.bin", tmp_path / "certs.bin"
    fetched = await trio.run_process(
        [
            str(BIN / "cvmctl"),
            "attest",
            "fetch",
            "--connect",
            address,
            "--nonce",
            nonce.hex(),
            "--vmpl",
            "1",
            "-o",
            str(report),
            "--certs-out",
            str(certs),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert b"sev-snp-report via configfs-tsm, 1184 bytes" in fetched.stdout
    assert b"step read_outblob" in fetched.stdout
    verified = await trio.run_process(
        [
            str(BIN / "cvmctl"),
            "attest",
            "verify",
            str(report),
            "--certs",
            str(certs),
            "--nonce",
            nonce.hex(),
            "--at",
            "2025-06-01T00:00:00Z",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    metrics = generate_latest(registry).decode()
    assert (
        'cvm_guest_attestation_requests_total{interface="configfs-tsm",result="success",tee="sev-snp"} 1.0'
        in metrics
    )
    assert 'cvm_guest_attestation_step_seconds{interface="configfs-tsm",step="read_outblob"}' in metrics
    assert "cvm_guest_attestation_last_success_timestamp_seconds" in metrics


async def test_bad_requests_are_refused_before_the_kernel(agent_with_snp_kernel: tuple[str, bytes]) -> None:
    address, _ = agent_with_snp_kernel
    async with connect(UnixAddress(address.removeprefix("unix://")), timeout=5) as client:
        stub = agent_pb2_grpc.GuestAgentStub(client.channel)
        with pytest.raises(UsageError, match="report_data must be exactly 64 bytes, got 3"):
            await client.call(
                stub.GetAttestationReport, agent_pb2.GetAttestationReportRequest(report_data=b"abc")
            )
        with pytest.raises(UsageError, match="unknown interface"):
            await client.call(
                stub.GetAttestationReport,
                agent_pb2.GetAttestationReportRequest(report_data=bytes(64), interface="/dev/mem"),
            )


async def test_no_interface_on_a_normal_vm_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    root.mkdir()
    service = GuestAgentService(root=root, detect_tee=lambda: detect_tee(root))
    sock = UnixAddress(str(tmp_path / "a.sock"))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_grpc, agent_handlers(service), ServerOptions(listen=[sock], stop_grace=0.5))
        async with connect(sock, timeout=5) as client:
            stub = agent_pb2_grpc.GuestAgentStub(client.channel)
            with pytest.raises(RemoteError, match="no attestation interface"):
                await client.call(
                    stub.GetAttestationReport, agent_pb2.GetAttestationReportRequest(report_data=bytes(64))
                )
        nursery.cancel_scope.cancel()


def test_fetch_rejects_a_long_nonce() -> None:
    result = subprocess.run(
        [
            str(BIN / "cvmctl"),
            "attest",
            "fetch",
            "--connect",
            "unix:///x.sock",
            "--nonce",
            "ab" * 65,
            "-o",
            "/tmp/x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--nonce is 65 bytes" in result.stderr
