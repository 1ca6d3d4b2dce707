"""The HostDaemon API without booting anything: create, list, watch, destroy, bad input."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import trio

from cvm.v1 import host_pb2, host_pb2_grpc
from cvmcore.address import UnixAddress
from cvmcore.client import RpcClient, connect
from cvmcore.errors import RemoteError, UsageError
from cvmcore.serve import ServerOptions, serve_grpc
from host_daemon import process as proc
from host_daemon.server import HostDaemonService, daemon_handlers
from host_daemon.vms import VMManager


@asynccontextmanager
async def serve_daemon(
    manager: VMManager, sock: Path
) -> AsyncIterator[tuple[RpcClient, host_pb2_grpc.HostDaemonStub]]:
    """The daemon's API for ``manager`` served in this process on ``sock``, and a client."""
    service = HostDaemonService(state_dir=manager.state_dir, manager=manager)
    address = UnixAddress(str(sock))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await nursery.start(
            serve_grpc, daemon_handlers(service), ServerOptions(listen=[address], stop_grace=0.5)
        )
        async with connect(address, timeout=10) as client:
            yield client, host_pb2_grpc.HostDaemonStub(client.channel)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[RpcClient, host_pb2_grpc.HostDaemonStub]]:
    async with serve_daemon(VMManager(tmp_path / "state"), tmp_path / "h.sock") as served:
        yield served


async def test_create_list_watch_destroy(daemon: tuple[RpcClient, host_pb2_grpc.HostDaemonStub]) -> None:
    client, stub = daemon
    events: list[tuple[str, str, int]] = []
    subscribed = trio.Event()
    destroyed = trio.Event()
    # A VM that exists before the watch: its snapshot event says the watcher is subscribed
    # (waiting a fixed time instead lost the first change on a loaded machine).
    await client.call(stub.CreateVM, host_pb2.CreateVMRequest(spec_toml='name = "s"\n', source="s.toml"))

    async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for event in client.stream(stub.WatchVMs, host_pb2.WatchVMsRequest(), timeout=30):
            events.append((event.event, event.vm.name, event.vm.state))
            subscribed.set()
            if event.event == "destroyed":
                destroyed.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        with trio.fail_after(10):
            await subscribed.wait()
        vm = await client.call(
            stub.CreateVM, host_pb2.CreateVMRequest(spec_toml='name = "a"\n', source="a.toml")
        )
        assert (vm.name, vm.state) == ("a", host_pb2.VM_STATE_DEFINED)
        listing = await client.call(stub.ListVMs, host_pb2.ListVMsRequest())
        assert sorted(v.name for v in listing.vms) == ["a", "s"]
        await client.call(stub.DestroyVM, host_pb2.VMRef(name="a"))
        with trio.fail_after(5):
            await destroyed.wait()
        nursery.cancel_scope.cancel()
    assert [event[:2] for event in events] == [("snapshot", "s"), ("created", "a"), ("destroyed", "a")]


async def test_errors_name_what_is_wrong(daemon: tuple[RpcClient, host_pb2_grpc.HostDaemonStub]) -> None:
    client, stub = daemon
    with pytest.raises(UsageError, match=r"a\.toml: memory: 'lots'"):
        await client.call(
            stub.CreateVM,
            host_pb2.CreateVMRequest(spec_toml='name = "a"\nmemory = "lots"\n', source="a.toml"),
        )
    await client.call(stub.CreateVM, host_pb2.CreateVMRequest(spec_toml='name = "a"\n'))
    with pytest.raises(RemoteError, match="exists already"):
        await client.call(stub.CreateVM, host_pb2.CreateVMRequest(spec_toml='name = "a"\n'))
    with pytest.raises(RemoteError, match="no VM named 'zz'"):
        await client.call(stub.GetVM, host_pb2.VMRef(name="zz"))
    with pytest.raises(RemoteError, match="is defined, not running"):
        await client.call(stub.StopVM, host_pb2.StopVMRequest(name="a"))
    info = await client.call(stub.GetDaemonInfo, host_pb2.GetDaemonInfoRequest())
    assert info.daemon_version and info.default_accel in ("kvm", "tcg")


async def test_hostile_input_is_invalid_argument(
    daemon: tuple[RpcClient, host_pb2_grpc.HostDaemonStub],
) -> None:
    """Issue 13: a 1,000-deep spec was INTERNAL (RecursionError), undecodable bytes UNKNOWN."""
    client, stub = daemon
    for deep in ("x = " + "[" * 1000 + "]" * 1000, "x = " + "{a=" * 1000 + "1" + "}" * 1000):
        with pytest.raises(UsageError, match="nested too deeply"):
            await client.call(stub.CreateVM, host_pb2.CreateVMRequest(spec_toml=deep, source="deep.toml"))
    for method in ("GetVM", "CreateVM"):
        with pytest.raises(UsageError, match=f"not a valid {method} request"):
            await client.call(client.channel.unary_unary(f"/cvm.v1.HostDaemon/{method}", None, None), b"\x0f")
    watch = client.channel.unary_stream("/cvm.v1.HostDaemon/WatchVMs", None, None)
    with pytest.raises(grpc.RpcError) as raw:
        await trio.to_thread.run_sync(lambda: list(watch(b"\x0a\x05ab", timeout=10)))
    assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # a long name is echoed back bounded, not as RESOURCE_EXHAUSTED
    with pytest.raises(UsageError) as info:
        await client.call(
            stub.CreateVM, host_pb2.CreateVMRequest(spec_toml="name = 1\n", source="s" * 30_000)
        )
    assert len(str(info.value)) < 600


def test_signalling_a_closed_process_handle_finds_it_gone(tmp_path: Path) -> None:
    """Found by the storm (issue 13): KillVM while the exit task was closing QEMU's pidfd
    signalled a closed descriptor (OSError EBADF, answered INTERNAL)."""
    spawned = proc.spawn(["sleep", "30"], tmp_path / "sleep.log")
    try:
        spawned.close()
        assert not proc.send_signal(spawned, signal.SIGKILL)
    finally:
        os.kill(spawned.pid, signal.SIGKILL)
        os.waitpid(spawned.pid, 0)
