"""Running processes with deadlines: commands, servers, their failures."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import trio

from cvmcore.errors import DeadlineExceeded, RemoteError, UsageError
from tests.workloads.conftest import require
from workloads.catalogue import get
from workloads.execute import (
    COMPLETE_GRACE,
    ServerProcess,
    own_scratch_dir,
    run_command,
    run_guest_request,
    start_server_request,
    write_server_files,
)
from workloads.model import ServerPlan
from workloads.runner import LocalTarget, free_port


async def test_command_output_failure_and_deadline() -> None:
    assert await run_command(["echo", "hi"], 5, "t") == "hi\n"
    with pytest.raises(RemoteError, match=r"t: sh exited with 3: boom"):
        await run_command(["sh", "-c", "echo boom >&2; exit 3"], 5, "t")
    with pytest.raises(DeadlineExceeded, match=r"t: sleep did not finish within 0\.2 s"):
        await run_command(["sleep", "5"], 0.2, "t")


async def test_a_complete_output_ends_a_client_that_hangs_after_it() -> None:
    """memaslap through QEMU's user networking: the summary, then a hang in its teardown."""
    done = lambda out: "summary\n" in out  # noqa: E731
    hangs = ["sh", "-c", "echo partial; sleep 0.2; echo summary; exec sleep 60"]
    started = trio.current_time()
    assert await run_command(hangs, 30, "t", done) == "partial\nsummary\n"
    assert trio.current_time() - started < COMPLETE_GRACE + 5
    # exiting by itself within the grace: no wait beyond it, its status does not matter then
    assert await run_command(["sh", "-c", "echo summary; exit 1"], 30, "t", done) == "summary\n"
    # never complete: the usual failure and deadline
    with pytest.raises(RemoteError, match=r"t: sh exited with 3: boom"):
        await run_command(["sh", "-c", "echo boom >&2; exit 3"], 5, "t", done)
    with pytest.raises(DeadlineExceeded, match=r"t: sh did not finish within 0\.3 s"):
        await run_command(["sh", "-c", "echo partial; exec sleep 5"], 0.3, "t", done)


def test_memcached_allows_for_opening_its_connections() -> None:
    memcached = get("memcached")
    study = memcached.validate({"duration": "2"})  # 8 threads x 100 connections
    assert memcached.timeout(study) >= 2 * 2 + 30 + 800 * 0.1
    assert memcached.output_complete is not None and get("nginx").output_complete is None
    assert not memcached.output_complete("cmd_get: 1\nRun time: 2.0s Ops: 5 TPS: 2")
    assert memcached.output_complete("cmd_get: 1\n\nRun time: 2.0s Ops: 5 TPS: 2 Net_rate: 0.1M/s\n")


async def test_a_server_that_dies_reports_its_stderr() -> None:
    server = ServerProcess()
    plan = ServerPlan(["sh", "-c", "echo cannot bind >&2; exit 1"], {}, free_port())
    with pytest.raises(RemoteError, match=r"exited with 1 before listening.*cannot bind"):
        await server.start(plan)
    assert not server.running


async def test_nginx_plan_serves_the_page() -> None:
    require("nginx")
    nginx = get("nginx")
    port = free_port()
    plan = nginx.guest_server(nginx.validate({"listen": "127.0.0.1", "port": str(port), "page_bytes": "100"}))
    assert plan is not None
    server = ServerProcess()
    await server.start(plan)
    try:
        assert server.running
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some():
                    data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"</body></html>\n")
    finally:
        await server.stop()
    assert not server.running


def test_server_files_stay_inside(tmp_path: Path) -> None:
    write_server_files(tmp_path, {"www/index.html": b"x"})
    assert (tmp_path / "www" / "index.html").stat().st_mode & 0o777 == 0o644
    with pytest.raises(UsageError, match="escapes"):
        write_server_files(tmp_path, {"../evil": b"x"})


async def test_the_agent_entry_points() -> None:
    samples, unavailable = await run_guest_request(
        "vmexit", {"iterations": "500", "leaves": "1", "ports": "0x80"}
    )
    assert {s.metric for s in samples} >= {"cpuid_1_ns", "cpuid_1_cycles"}
    assert "hypercall" in {u.metric for u in unavailable}
    with pytest.raises(UsageError, match="unknown workload"):
        await run_guest_request("rm -rf /", {})
    with pytest.raises(UsageError, match="nginx has no guest-only work"):
        await run_guest_request("nginx", {})
    with pytest.raises(UsageError, match="parameter directory"):
        await run_guest_request("fio", {"directory": "/dev"})
    require("iperf3")
    server = ServerProcess()
    port = free_port()
    try:
        assert (
            await start_server_request("iperf-tcp", {"port": str(port), "listen": "127.0.0.1"}, server)
            == port
        )
        assert server.running
    finally:
        await server.stop()
    with pytest.raises(UsageError, match="ping has no server"):
        await start_server_request("ping", {}, server)


async def test_full_params_run_every_case(tmp_path: Path) -> None:
    """The agent may get a workload's full params (fio jobs=all): every case runs."""
    require("fio")
    fio = get("fio")
    params = fio.validate(
        {
            "directory": str(tmp_path),
            "jobs": "alat-read,alat-write",
            "runtime": "1",
            "ramp": "0",
            "size_mb": "4",
        }
    )
    samples = await LocalTarget().run_guest(fio, params)
    assert {s.metadata["job"] for s in samples} == {"alat-read", "alat-write"}


async def test_fio_never_touches_a_file_it_did_not_create() -> None:
    """Issue 13: ``fio filename=/tmp/victim`` laid fio over the guest's file and unlinked it.

    fio now writes only in a private directory the runner makes for the run; a directory
    the caller got wrong is INVALID_ARGUMENT (UsageError), never INTERNAL.
    """
    require("fio")
    top = Path(tempfile.mkdtemp(prefix="cvmctl-victim-", dir="/tmp"))
    try:
        victim = top / "cvmctl-fio.scratch"  # the name fio's file has in its directory
        victim.write_bytes(b"the guest's data")
        params = {"runtime": "1", "ramp": "0", "size_mb": "1", "jobs": "alat-read", "direct": "no"}
        samples, _ = await run_guest_request("fio", {**params, "directory": str(top)})
        assert samples
        assert victim.read_bytes() == b"the guest's data"
        assert list(top.iterdir()) == [victim]  # the private directory is gone
        for wrong, why in ((victim, "Not a directory"), (top / "none", "No such file or directory")):
            with pytest.raises(
                UsageError, match=f"parameter directory: cannot make a scratch directory .*{why}"
            ):
                await run_guest_request("fio", {**params, "directory": str(wrong)})
        (top / "link").symlink_to("/etc")
        with pytest.raises(UsageError, match="parameter directory: it leads to '/etc', which is not below"):
            await run_guest_request("fio", {**params, "directory": str(top / "link")})
        with pytest.raises(UsageError, match="fio has no parameter 'filename'"):
            await run_guest_request("fio", {**params, "filename": str(victim)})
        assert victim.read_bytes() == b"the guest's data"
    finally:
        shutil.rmtree(top)


def test_the_scratch_directory_is_private_and_removed(tmp_path: Path) -> None:
    fio = get("fio")
    params = fio.validate({"directory": "/tmp"})
    with own_scratch_dir(fio, {**params, "directory": str(tmp_path)}) as private:
        made = Path(private["directory"])
        assert made.parent == tmp_path and made.stat().st_mode & 0o777 == 0o700
        (made / "cvmctl-fio.scratch").write_text("x")
    assert not made.exists()
    assert next(iter(own_scratch_dir(get("vmexit"), {"a": 1}).__enter__().items())) == ("a", 1)


async def test_a_scratch_directory_the_agent_cannot_write_is_made_where_the_workload_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd the agent's /mnt, /srv and /scratch are read-only (ProtectSystem=strict)
    while the workload unit's are not: there mktemp and rm run as workload-unit commands.
    Here a directory the agent "cannot write" stands in, and the unit runs the command as is."""
    from workloads import execute
    from workloads.sandbox import Sandbox

    ran: list[list[str]] = []

    def in_unit(sandbox: Sandbox, unit: str, argv: list[str]) -> list[str]:
        ran.append(argv)
        return argv

    async def no_unit(unit: str, *, kill: bool = False) -> None:
        return None

    monkeypatch.setattr(execute, "run_argv", in_unit)
    monkeypatch.setattr(execute, "stop_unit", no_unit)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path) and access(path, mode))
    fio = get("fio")
    params = {**fio.validate({"directory": "/tmp"}), "directory": str(tmp_path)}
    async with execute.scratch_dir_where_it_runs(fio, params, Sandbox("systemd")) as private:
        made = Path(private["directory"])
        assert made.parent == tmp_path and made.stat().st_mode & 0o777 == 0o700
        (made / "cvmctl-fio.scratch").write_text("x")
    assert not made.exists()
    assert [argv[0] for argv in ran] == ["mktemp", "rm"]
    # Direct (the dev guest, the CLI) and a directory the agent can write: made by the agent.
    async with execute.scratch_dir_where_it_runs(fio, params) as private:
        assert Path(private["directory"]).parent == tmp_path
    assert len(ran) == 2
    with pytest.raises(UsageError, match=r"cannot make a scratch directory .*No such file"):
        async with execute.scratch_dir_where_it_runs(
            fio, {**params, "directory": str(tmp_path / "none")}, Sandbox("systemd")
        ):
            pass
