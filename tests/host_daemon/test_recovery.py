"""The daemon's recovery without booting a guest: helpers reaped, a boot finished after a restart.

A fake QEMU (``sleep``) stands in where the tests need a process to follow, a fake QMP monitor
(:mod:`tests.host_metrics.fake_qmp`) where they need QEMU to answer, and an in-process agent on
a unix socket where they need one to answer health.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from host_daemon import process as proc
from host_daemon.boottiming import PHASES, RESTARTED_MID_BOOT, console_has_init_marker
from host_daemon.store import VMRecord, VMState, VMStore, now
from host_daemon.vms import VMManager
from tests.host_metrics.fake_qmp import FakeQemu, serve_fake_qmp
from tests.spine.agent_fixtures import running_agent


def zombie_children() -> list[int]:
    """Children of this process that exited and were never waited for."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, parent = stat[stat.rfind(")") + 2 :].split()[:2]
        if state == "Z" and int(parent) == os.getpid():
            found.append(int(entry))
    return found


@asynccontextmanager
async def manager_running(state_dir: Path, **options: object) -> AsyncIterator[VMManager]:
    manager = VMManager(state_dir, **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        yield manager
        nursery.cancel_scope.cancel()


STARTS = 3


async def test_vhost_device_vsock_helpers_are_reaped(tmp_path: Path) -> None:
    if shutil.which("vhost-device-vsock") is None:
        if os.environ.get("CI"):
            pytest.fail("vhost-device-vsock not installed (scripts/install-vhost-device-vsock.sh)")
        pytest.skip("vhost-device-vsock not installed (scripts/install-vhost-device-vsock.sh)")
    fake_qemu = tmp_path / "qemu"
    fake_qemu.write_text("#!/bin/sh\nexec sleep 600\n")
    fake_qemu.chmod(0o755)
    before = set(zombie_children())
    async with manager_running(tmp_path / "s", qemu_binary=str(fake_qemu), boot_seconds=5) as manager:
        manager.create('name = "z"\naccel = "tcg"\n[agent]\nchannel = "vhost-user-vsock"\n')
        for _ in range(STARTS):
            started = await manager.start("z")
            assert len(started.helper_pids) == 1
            assert (await manager.kill("z")).state is VMState.STOPPED
        left = set(zombie_children()) - before
    print(f"zombies after {STARTS} starts and kills: {len(left)}")
    assert not left


# ---- a daemon killed while a VM was STARTING ---------------------------------------------------


@asynccontextmanager
async def starting_vm(tmp_path: Path, console_text: str) -> AsyncIterator[tuple[Path, Path, Path]]:
    """A VM record left STARTING by a killed daemon, after spawn and before the agent answered:
    its "QEMU" (sleep) runs, its QMP answers. Yields (state dir, console, agent socket)."""
    state_dir, agent_sock = tmp_path / "s", tmp_path / "agent.sock"
    run_dir = state_dir / "vms" / "v"
    run_dir.mkdir(parents=True)
    console = run_dir / "console-1.log"
    console.write_text(console_text)
    qemu = proc.spawn(["sleep", "600"], run_dir / "qemu.log")
    t = time.monotonic()
    store = VMStore(state_dir / "hostd.db")
    store.insert(
        VMRecord(
            name="v",
            spec_toml='name = "v"\naccel = "tcg"\n',
            created_at=now(),
            state=VMState.STARTING,
            state_reason="booting under tcg",
            qemu_pid=qemu.pid,
            qemu_start_ticks=qemu.start_ticks,
            boot_count=1,
            agent_address=f"unix://{agent_sock}",
            console_path=str(console),
            boot_phases={"daemon": 0.1, "spawn": 0.4},
            boot_marks={"request": t - 30.5, "exec": t - 30.4, "qmp": t - 30.0},
        )
    )
    store.close()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_fake_qmp, run_dir / "qmp.sock", FakeQemu(kvm=False))
            yield state_dir, console, agent_sock
            nursery.cancel_scope.cancel()
    finally:
        await proc.kill_and_reap(qemu)


async def wait_running(manager: VMManager) -> VMRecord:
    with trio.fail_after(60):
        async for _, record in manager.watch():
            if record is not None and record.name == "v" and record.state is VMState.RUNNING:
                return record
    raise AssertionError("the watch ended")


async def test_a_boot_cut_by_a_daemon_restart_is_timed_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The init marker comes after the new daemon looks: every phase has its figure."""
    looked = threading.Event()

    def spy(console: Path) -> bool:
        found = console_has_init_marker(console)
        looked.set()
        return found

    monkeypatch.setattr("host_daemon.vms.console_has_init_marker", spy)
    async with (
        starting_vm(tmp_path, "Linux version 6.12\n") as (state_dir, console, agent_sock),
        manager_running(state_dir) as manager,
    ):
        # The new daemon has reattached and looked at the console (a fixed wait lost this race
        # on a loaded machine): a marker written now came while it watched.
        assert await trio.to_thread.run_sync(looked.wait, 30), "the new daemon never looked"
        with console.open("a") as handle:
            handle.write("cvm-boot: init-start 5.00\n")
        with trio.fail_after(30):  # the daemon's console poll has timed it
            while "init" not in manager.get("v").boot_marks:  # noqa: ASYNC110 (a record, no event)
                await trio.sleep(0.05)
        async with running_agent(agent_sock):
            record = await wait_running(manager)
    assert set(record.boot_phases) == set(PHASES), record
    assert record.boot_phases["kernel"] == pytest.approx(5.0, abs=0.5)
    assert record.boot_phases["userspace"] > 0
    assert record.boot_unmeasured == {}


async def test_phases_that_ended_while_no_daemon_watched_are_marked_unmeasured(tmp_path: Path) -> None:
    """The init marker came while the daemon was dead: its moment is unknown, and said so."""
    async with (
        starting_vm(tmp_path, "Linux version 6.12\ncvm-boot: init-start 5.00\n") as (
            state_dir,
            _,
            agent_sock,
        ),
        manager_running(state_dir) as manager,
        running_agent(agent_sock),
    ):
        record = await wait_running(manager)
    assert record.boot_phases == {"daemon": 0.1, "spawn": 0.4}
    assert record.boot_unmeasured == dict.fromkeys(("firmware", "kernel", "userspace"), RESTARTED_MID_BOOT)
