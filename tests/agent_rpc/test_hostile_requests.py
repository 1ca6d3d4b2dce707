"""Requests the caller got wrong get INVALID_ARGUMENT from the agent: never UNKNOWN or INTERNAL.

The host is the adversary of a confidential guest: these are the reproductions of issue 13
(undecodable bytes answered UNKNOWN and never logged or counted; a 20 KB parameter echoed
into the status details, which then reached the client as RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import structlog

from cvm.v1 import agent_pb2
from cvmcore.grpc_bridge import (
    MAX_DETAILS_CHARS,
    UNDECODABLE_LOG_BURST,
    Undecodable,
    UndecodableRequests,
    bound_details,
)
from tests.conftest import REPO_ROOT
from tests.spine.agent_fixtures import agent_process

TREE = REPO_ROOT / "tests" / "fixtures" / "sysroots" / "snp-guest"
SERVICE = "/cvm.v1.GuestAgent"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[grpc.Channel]:
    sock = tmp_path / "a.sock"
    with (
        agent_process(sock, tmp_path / "state", "--root", str(TREE)),
        grpc.insecure_channel(f"unix://{sock}") as channel,
    ):
        yield channel


def raw(channel: grpc.Channel, method: str, payload: bytes, stream: bool = False) -> grpc.RpcError:
    """Send ``payload`` as the request bytes of ``method``; the error it gets."""
    if stream:
        call = channel.unary_stream(f"{SERVICE}/{method}", None, None)
        with pytest.raises(grpc.RpcError) as info:
            list(call(payload, timeout=10))
    else:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(f"{SERVICE}/{method}", None, None)(payload, timeout=10)
    return info.value


def test_undecodable_bytes_are_invalid_argument_and_counted(agent: grpc.Channel) -> None:
    channel = agent
    # a truncated length-delimited field; wire type 7 (there is none)
    cases = [
        (method, stream, payload)
        for payload in (b"\x0a\x05ab", b"\x0f")
        for method, stream in (("GetInfo", False), ("RunWorkload", True), ("SetIdlePolling", False))
    ]
    cases.append(("RunWorkload", True, b"\x0a\x02\xff\xfe"))  # workload: not UTF-8
    for method, stream, payload in cases:
        error = raw(channel, method, payload, stream)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, error)
        assert f"not a valid {method} request" in str(error.details())
    metrics = channel.unary_unary(
        f"{SERVICE}/GetMetrics",
        request_serializer=agent_pb2.GetMetricsRequest.SerializeToString,
        response_deserializer=agent_pb2.GetMetricsResponse.FromString,
    )(agent_pb2.GetMetricsRequest(), timeout=10)
    text = metrics.text.decode()
    assert 'cvm_guest_agent_rpc_undecodable_total{method="GetInfo"} 2.0' in text
    assert 'cvm_guest_agent_rpc_undecodable_total{method="RunWorkload"} 3.0' in text
    assert 'cvm_guest_agent_rpcs_total{code="INVALID_ARGUMENT",method="GetInfo"} 2.0' in text


def test_a_huge_parameter_is_invalid_argument_with_bounded_details(agent: grpc.Channel) -> None:
    channel = agent
    request = agent_pb2.RunWorkloadRequest(
        workload="vmexit", params={"cpu": "\u00e9" * 20_000}, role=agent_pb2.WORKLOAD_ROLE_RUN
    )
    error = raw(channel, "RunWorkload", request.SerializeToString(), stream=True)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = str(error.details())
    assert details.startswith("parameter cpu:") and "(20000 characters) is not allowed" in details
    assert len(details) <= MAX_DETAILS_CHARS
    # any other error quoting the host's input is cut by the bridge (test_bound_details)


def test_undecodable_requests_are_counted_all_and_logged_with_a_bound() -> None:
    tally = UndecodableRequests("t_undecodable")
    with structlog.testing.capture_logs() as logs:
        for _ in range(100):
            tally.record("/s/M", "unix:", Undecodable(3, "x" * 1000))
    assert tally.counts() == {"/s/M": 100}
    assert len(logs) == UNDECODABLE_LOG_BURST and len(logs[0]["error"]) <= 120
    (family,) = tally.collect()
    assert [(s.labels, s.value) for s in family.samples] == [({"method": "M"}, 100.0)]


def test_bound_details() -> None:
    assert bound_details("short") == "short"
    assert bound_details("x" * 600) == "x" * (MAX_DETAILS_CHARS - 3) + "..."
    wide = bound_details("\U0001f600" * 600)  # 4 UTF-8 bytes each: the byte bound applies
    assert wide.endswith("...") and len(wide.encode()) <= 2 * MAX_DETAILS_CHARS


def run_request(**params: str) -> bytes:
    return agent_pb2.RunWorkloadRequest(
        workload="vmexit", params=params, role=agent_pb2.WORKLOAD_ROLE_RUN
    ).SerializeToString()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 machine code")
def test_one_run_at_a_time_and_a_cancelled_run_is_stopped(agent: grpc.Channel) -> None:
    run = agent.unary_stream(f"{SERVICE}/RunWorkload", None, None)
    long = run(run_request(iterations="1000000", warmup="1000000", leaves="0,1,0x40000000"), timeout=120)
    next(iter(long))  # the progress event: the run has begun
    error = raw(agent, "RunWorkload", run_request(iterations="10", leaves="1", ports="0x80"), stream=True)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    long.cancel()  # type: ignore[no-untyped-call]
    started = time.monotonic()
    while True:  # the cancelled run stops within one chunk of its loop, then the next may run
        try:
            events = list(run(run_request(iterations="10", leaves="1", ports="0x80"), timeout=30))
            break
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - started < 10, "the cancelled run was not stopped"
            time.sleep(0.05)
    assert any(e.startswith(b"\x1a") for e in events)  # a sample (field 3 of WorkloadEvent)
