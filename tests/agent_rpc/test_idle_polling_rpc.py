"""Idle polling through the agent's RPCs and the CLI, on a copy of a recorded sysfs tree."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from cvm.v1 import agent_pb2, agent_pb2_grpc
from cvmcore.address import UnixAddress
from cvmcore.client import RpcClient, connect
from cvmcore.errors import RemoteError, UsageError
from cvmcore.serve import ServerOptions, serve_grpc
from guest_agent.idle_polling import IdlePollingController
from guest_agent.server import GuestAgentService, agent_handlers
from guest_agent.tee import detect_tee
from tests.conftest import REPO_ROOT
from tests.spine.agent_fixtures import spawn_agent, wait_for_socket

SNP_TREE = REPO_ROOT / "tests" / "fixtures" / "sysroots" / "snp-guest"
HALTPOLL_NS = "sys/module/haltpoll/parameters/guest_halt_poll_ns"


def trees_identical(a: Path, b: Path) -> bool:
    comparison = filecmp.dircmp(a, b)
    stack = [comparison]
    while stack:
        current = stack.pop()
        if current.left_only or current.right_only or current.diff_files or current.funny_files:
            return False
        # dircmp compares shallowly by stat; compare contents to be sure.
        for name in current.same_files:
            if (Path(current.left) / name).read_bytes() != (Path(current.right) / name).read_bytes():
                return False
        stack.extend(current.subdirs.values())
    return True


@pytest.fixture
def guest_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(SNP_TREE, root)
    return root


@pytest.fixture
async def agent(guest_root: Path, tmp_path: Path) -> AsyncIterator[RpcClient]:
    service = GuestAgentService(
        root=guest_root,
        detect_tee=lambda: detect_tee(guest_root),
        idle_polling=IdlePollingController(guest_root, tmp_path / "state"),
    )
    sock = UnixAddress(str(tmp_path / "agent.sock"))
    (tmp_path / "state").mkdir()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_grpc, agent_handlers(service), ServerOptions(listen=[sock], stop_grace=0.5))
        async with connect(sock, timeout=5) as client:
            yield client
        nursery.cancel_scope.cancel()


async def test_set_then_revert_restores_every_byte(agent: RpcClient, guest_root: Path) -> None:
    stub = agent_pb2_grpc.GuestAgentStub(agent.channel)
    before = await agent.call(stub.GetIdlePolling, agent_pb2.GetIdlePollingRequest())
    assert before.mode == agent_pb2.IDLE_MODE_HALTPOLL
    assert before.applied_mode == agent_pb2.IDLE_MODE_UNSPECIFIED
    assert before.params.guest_halt_poll_ns == 200000

    request = agent_pb2.SetIdlePollingRequest(
        mode=agent_pb2.IDLE_MODE_HALTPOLL, params=agent_pb2.HaltpollParams(guest_halt_poll_ns=400000)
    )
    after = await agent.call(stub.SetIdlePolling, request)
    assert after.applied_mode == agent_pb2.IDLE_MODE_HALTPOLL
    assert after.params.guest_halt_poll_ns == 400000
    assert (guest_root / HALTPOLL_NS).read_text().strip() == "400000"

    reverted = await agent.call(stub.RevertIdlePolling, agent_pb2.RevertIdlePollingRequest())
    assert reverted.applied_mode == agent_pb2.IDLE_MODE_UNSPECIFIED
    assert trees_identical(guest_root, SNP_TREE)


async def test_full_polling_names_the_kernel_parameter(agent: RpcClient) -> None:
    stub = agent_pb2_grpc.GuestAgentStub(agent.channel)
    with pytest.raises(RemoteError, match="add the kernel command-line parameter 'idle=poll' and reboot"):
        await agent.call(stub.SetIdlePolling, agent_pb2.SetIdlePollingRequest(mode=agent_pb2.IDLE_MODE_POLL))


async def test_hostile_values_are_rejected_before_any_write(agent: RpcClient, guest_root: Path) -> None:
    stub = agent_pb2_grpc.GuestAgentStub(agent.channel)
    absurd = agent_pb2.SetIdlePollingRequest(
        mode=agent_pb2.IDLE_MODE_HALTPOLL, params=agent_pb2.HaltpollParams(guest_halt_poll_ns=2**63)
    )
    with pytest.raises(UsageError, match=r"guest_halt_poll_ns = 9223372036854775808 is out of range"):
        await agent.call(stub.SetIdlePolling, absurd)
    with pytest.raises(UsageError, match="mode must be one of"):
        await agent.call(stub.SetIdlePolling, agent_pb2.SetIdlePollingRequest())
    assert trees_identical(guest_root, SNP_TREE)


@pytest.fixture
def agent_process(guest_root: Path, tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    sock = tmp_path / "a.sock"
    process = spawn_agent(sock, tmp_path / "state", "--root", str(guest_root))
    try:
        wait_for_socket(sock, process)
        yield f"unix://{sock}", tmp_path / "state", process
    finally:
        process.kill()
        process.wait(10)


def cvmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "cvmctl"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_set_show_revert(
    agent_process: tuple[str, Path, subprocess.Popen[str]], guest_root: Path
) -> None:
    address, _, _ = agent_process
    result = cvmctl("idle-poll", "set", "haltpoll", "--guest-halt-poll-ns", "50000", "--connect", address)
    assert result.returncode == 0, result.stderr
    assert "applied by the agent" in result.stdout and "50000" in result.stdout
    shown = cvmctl("idle-poll", "show", "--json", "--connect", address)
    assert '"applied_mode": "haltpoll"' in shown.stdout
    assert cvmctl("idle-poll", "revert", "--connect", address).returncode == 0
    assert trees_identical(guest_root, SNP_TREE)
    bad = cvmctl("idle-poll", "set", "haltpoll", "--guest-halt-poll-ns", "-5", "--connect", address)
    assert bad.returncode == 2 and "-5 is negative" in bad.stderr


def test_agent_killed_after_apply_restores_on_next_start(
    agent_process: tuple[str, Path, subprocess.Popen[str]], guest_root: Path, tmp_path: Path
) -> None:
    address, state_dir, first_agent = agent_process
    assert (
        cvmctl("idle-poll", "set", "haltpoll", "--guest-halt-poll-ns", "1", "--connect", address).returncode
        == 0
    )
    assert (guest_root / HALTPOLL_NS).read_text().strip() == "1"
    first_agent.kill()  # SIGKILL: no chance to clean up
    first_agent.wait(10)
    assert (guest_root / HALTPOLL_NS).read_text().strip() == "1"
    # A new agent on the same state dir finds the record and restores the originals.
    sock = tmp_path / "b.sock"
    process = spawn_agent(sock, state_dir, "--root", str(guest_root))
    try:
        wait_for_socket(sock, process)
        assert trees_identical(guest_root, SNP_TREE)
    finally:
        process.terminate()
        process.wait(10)
