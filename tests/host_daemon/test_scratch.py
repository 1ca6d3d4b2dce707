"""The ``[scratch]`` disk: made for each boot in the run directory, gone when QEMU or the VM is.

Three levels: the pure decisions (aio and cache from O_DIRECT or not), the file itself on this
machine's file systems, the daemon's lifecycle with a stand-in QEMU (a shell script that
records what it was given and sleeps), and one real boot of the dev guest under TCG in which
QEMU shows the disk with its serial and O_DIRECT, the guest kernel reports it, and ``vm rm``
leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
from pathlib import Path

import pytest
import trio

import host_daemon.scratch as scratch_module
from cvmcore.errors import HostNotReady, UsageError
from cvmctl.targets import BASES, MODIFIERS, BuiltinTarget
from host_daemon.qmp import open_qmp
from host_daemon.scratch import (
    SCRATCH_FILE,
    create_scratch,
    direct_io_works,
    filesystem_type,
    remove_scratch,
    remove_stale_scratch,
    resolve_io,
)
from host_daemon.spec import SCRATCH_SERIAL, ScratchDisk, parse_spec
from host_daemon.store import VMState
from host_daemon.vms import VMManager

MIB = 2**20

# -- the decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aio", "cache", "direct", "expected"),
    [
        ("auto", "auto", True, ("native", "none")),  # the study's disk
        ("auto", "auto", False, ("threads", "writeback")),
        ("io_uring", "auto", False, ("io_uring", "writeback")),
        ("threads", "auto", True, ("threads", "none")),
        ("auto", "writeback", True, ("threads", "writeback")),
        ("auto", "directsync", True, ("native", "directsync")),
        ("native", "none", True, ("native", "none")),
    ],
)
def test_resolve_io(aio: str, cache: str, direct: bool, expected: tuple[str, str]) -> None:
    scratch = parse_spec(f'name = "x"\n[scratch]\naio = "{aio}"\ncache = "{cache}"').scratch
    assert scratch is not None
    assert resolve_io(scratch, direct) == expected


@pytest.mark.parametrize(("aio", "cache"), [("native", "auto"), ("auto", "none"), ("threads", "directsync")])
def test_resolve_io_refuses_o_direct_where_there_is_none(aio: str, cache: str) -> None:
    scratch = parse_spec(f'name = "x"\n[scratch]\naio = "{aio}"\ncache = "{cache}"').scratch
    assert scratch is not None
    with pytest.raises(HostNotReady, match="O_DIRECT, which the file system of /x refuses"):
        resolve_io(scratch, direct_io=False, where="/x")


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:21 / /dev/shm rw shared:3 - tmpfs tmpfs rw
26 22 0:22 / /srv/my\\040data rw shared:4 - xfs /dev/sdb1 rw
27 22 0:23 / /srv/my rw shared:5 - btrfs /dev/sdc1 rw
"""


def test_filesystem_type_is_the_longest_mount_point() -> None:
    assert filesystem_type(Path("/var/lib/cvm"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/dev/shm/x"), MOUNTINFO) == "tmpfs"
    assert filesystem_type(Path("/srv/my data/vms"), MOUNTINFO) == "xfs"
    assert filesystem_type(Path("/srv/my/vms"), MOUNTINFO) == "btrfs"
    assert filesystem_type(Path("/srv/mydata"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/x"), "") == "unknown"


def test_every_builtin_target_has_the_scratch_disk() -> None:
    firmware = Path("/usr/share/ovmf/OVMF.fd")
    for base in BASES:
        for modifiers in [(), *((m,) for m in MODIFIERS)]:
            if "swiotlb" in modifiers and base != "vm":
                continue
            spec = parse_spec(BuiltinTarget(base, modifiers).spec_toml({80: 8080}, firmware))
            assert spec.scratch == ScratchDisk(size_mib=2048), (base, modifiers)


# -- the file --------------------------------------------------------------------------------


def test_create_and_remove(tmp_path: Path) -> None:
    run_dir = tmp_path / "vms" / "a"
    run_dir.mkdir(parents=True)
    (run_dir / SCRATCH_FILE).write_bytes(b"left from an earlier boot")
    made = create_scratch(run_dir, ScratchDisk(size_mib=64))
    path = run_dir / SCRATCH_FILE
    assert made.drive.path == path
    info = path.stat()
    assert info.st_size == 64 * MIB and stat.S_IMODE(info.st_mode) == 0o600
    assert made.filesystem == filesystem_type(run_dir)
    assert made.direct_io == direct_io_works(path)
    if made.direct_io:  # ext4 here: the study's modes, the space reserved
        assert (made.drive.aio, made.drive.cache) == ("native", "none")
    else:
        assert (made.drive.aio, made.drive.cache) == ("threads", "writeback")
    if made.filesystem in ("ext4", "xfs", "btrfs"):
        assert made.allocation == "fallocate" and info.st_blocks * 512 >= 64 * MIB
    assert remove_scratch(run_dir) and not path.exists()
    assert not remove_scratch(run_dir)  # nothing there: no error


def test_tmpfs_stays_sparse(tmp_path: Path) -> None:
    """fallocate on tmpfs would pin memory: the file stays sparse there."""
    shm = Path("/dev/shm")
    if filesystem_type(shm) != "tmpfs" or not os.access(shm, os.W_OK):
        pytest.skip("no writable tmpfs at /dev/shm")
    run_dir = Path(os.path.realpath(shm)) / f"cvm-scratch-test-{os.getpid()}"
    run_dir.mkdir()
    try:
        made = create_scratch(run_dir, ScratchDisk(size_mib=256))
        assert made.allocation == "sparse"
        assert (run_dir / SCRATCH_FILE).stat().st_blocks * 512 < 256 * MIB
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_no_room_is_refused_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scratch_module, "_fallocate", lambda fd, size: errno.ENOSPC)
    with pytest.raises(HostNotReady, match=r"cannot reserve 2\.0 GiB for the scratch disk in .*free"):
        create_scratch(tmp_path, ScratchDisk(size_mib=2048))
    assert not (tmp_path / SCRATCH_FILE).exists()
    # without fallocate the file system's free space is checked instead
    monkeypatch.setattr(scratch_module, "_fallocate", lambda fd, size: errno.EOPNOTSUPP)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: os.statvfs_result((4096,) * 2 + (0,) * 8))
    with pytest.raises(HostNotReady, match=r"has 0\.0 GiB free, less than the scratch disk's 2\.0 GiB"):
        create_scratch(tmp_path, ScratchDisk(size_mib=2048))
    assert not (tmp_path / SCRATCH_FILE).exists()


def test_a_refused_mode_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scratch_module, "direct_io_works", lambda path: False)
    with pytest.raises(HostNotReady, match=r'scratch\.cache = "none" opens the disk with O_DIRECT'):
        create_scratch(tmp_path, ScratchDisk(size_mib=8, cache="none"))
    assert not (tmp_path / SCRATCH_FILE).exists()
    made = create_scratch(tmp_path, ScratchDisk(size_mib=8))  # auto: buffered instead
    assert (made.drive.aio, made.drive.cache) == ("threads", "writeback")


def test_a_symlink_in_its_place_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / SCRATCH_FILE).symlink_to(victim)
    create_scratch(run_dir, ScratchDisk(size_mib=1))
    assert victim.read_text() == "keep me"
    assert not (run_dir / SCRATCH_FILE).is_symlink()


def test_remove_stale_keeps_the_running(tmp_path: Path) -> None:
    for name in ("running", "stopped", "orphan"):
        (tmp_path / name).mkdir()
        (tmp_path / name / SCRATCH_FILE).write_bytes(b"")
    (tmp_path / "nodisk").mkdir()
    removed = remove_stale_scratch(tmp_path, {"running"})
    assert removed == [tmp_path / "orphan" / SCRATCH_FILE, tmp_path / "stopped" / SCRATCH_FILE]
    assert (tmp_path / "running" / SCRATCH_FILE).exists()


# -- the daemon, with a stand-in QEMU ----------------------------------------------------------

SPEC = 'name = "s"\n[boot]\nkernel = "/k"\n[scratch]\nsize = "64M"\n[agent]\nchannel = "none"\n'


def fake_qemu(tmp_path: Path) -> Path:
    """A "QEMU" that notes whether the scratch file exists when it starts, then sleeps."""
    script = tmp_path / "fake-qemu"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in file=*) f=${a#file=}; f=${f%%,*} ;; esac; done\n'
        f'if [ -f "$f" ]; then echo "$f" >> {tmp_path}/seen; fi\n'
        "exec sleep 120\n"
    )
    script.chmod(0o755)
    return script


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2] != "Z"


async def test_the_daemon_makes_it_at_start_and_removes_it_when_qemu_ends(tmp_path: Path) -> None:
    state = tmp_path / "state"
    run_dir = state / "vms" / "s"
    disk = run_dir / SCRATCH_FILE
    manager = VMManager(state, qemu_binary=str(fake_qemu(tmp_path)), boot_seconds=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        manager.create(SPEC)
        record = await manager.start("s")
        assert disk.stat().st_size == 64 * MIB
        assert f"file={disk},if=none,id=scratch,format=raw" in " ".join(record.qemu_argv)
        assert any(f"serial={SCRATCH_SERIAL}" in a for a in record.qemu_argv)
        seen = tmp_path / "seen"
        with trio.fail_after(10):
            # The fake QEMU's shell creates the file, then writes the line: wait for the line.
            while not (seen.exists() and seen.read_text().endswith("\n")):  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert seen.read_text() == f"{disk}\n"  # there before QEMU ran

        await manager.kill("s")
        assert manager.get("s").state is VMState.STOPPED
        assert not disk.exists()  # gone with QEMU: a scratch disk does not survive a reboot

        await manager.start("s")
        assert disk.exists()  # a fresh one for the next boot
        live = manager.live_vm("s")
        assert live is not None
        os.kill(live.qemu.pid, signal.SIGKILL)  # QEMU dies on its own: crashed
        with trio.fail_after(5):
            await live.exited.wait()
        assert manager.get("s").state is VMState.CRASHED
        assert not disk.exists()

        await manager.destroy("s")
        assert not run_dir.exists()
        nursery.cancel_scope.cancel()


async def test_a_failed_start_leaves_no_disk(tmp_path: Path) -> None:
    state = tmp_path / "state"
    manager = VMManager(state, qemu_binary=str(tmp_path / "no-such-qemu"))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        manager.create(SPEC)
        with pytest.raises(UsageError, match="cannot start QEMU"):
            await manager.start("s")
        assert not (state / "vms" / "s" / SCRATCH_FILE).exists()
        assert manager.get("s").state is VMState.DEFINED
        nursery.cancel_scope.cancel()


async def test_a_restarted_daemon_keeps_the_running_and_removes_the_rest(tmp_path: Path) -> None:
    state = tmp_path / "state"
    qemu = str(fake_qemu(tmp_path))
    disk = state / "vms" / "s" / SCRATCH_FILE
    orphan = state / "vms" / "ghost" / SCRATCH_FILE  # a removal cut short: no record, a file
    pids: list[int] = []
    try:
        # The daemon goes away while QEMU runs: the next one reattaches and keeps the disk.
        manager = VMManager(state, qemu_binary=qemu, boot_seconds=5)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            manager.create(SPEC)
            pids.append((await manager.start("s")).qemu_pid)
            nursery.cancel_scope.cancel()
        orphan.parent.mkdir()
        orphan.write_bytes(b"")
        manager = VMManager(state, qemu_binary=qemu, boot_seconds=5)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            assert manager.get("s").state.live and disk.exists()
            assert not orphan.exists()
            nursery.cancel_scope.cancel()

        # QEMU ends while no daemon runs: the next daemon removes its disk. (This test's
        # process spawned it, so it reaps it, as init would reap a real daemon's QEMU.)
        os.kill(pids[0], signal.SIGKILL)
        await trio.to_thread.run_sync(os.waitpid, pids[0], 0)
        assert disk.exists()
        manager = VMManager(state, qemu_binary=qemu, boot_seconds=5)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            assert manager.get("s").state is VMState.CRASHED
            assert not disk.exists()
            nursery.cancel_scope.cancel()
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- for real: the dev guest under TCG ---------------------------------------------------------


@pytest.mark.slow
async def test_the_dev_guest_sees_the_disk_and_vm_rm_leaves_nothing(tmp_path: Path) -> None:
    """One boot: QEMU has the disk (QMP: serial cvm-scratch, O_DIRECT, the run dir's file), the
    guest kernel reports it, the file outlives a daemon restart while the VM runs, and after
    ``vm stop`` and ``vm rm`` nothing of it is left on the host."""
    from tests.host_daemon.test_lifecycle import START_WAIT, Daemon

    if shutil.which("qemu-system-x86_64") is None or shutil.which("vhost-device-vsock") is None:
        pytest.skip("needs QEMU and vhost-device-vsock (scripts/setup.sh)")
    d = Daemon(tmp_path / "s", tmp_path / "h.sock")
    d.start()
    try:
        spec = tmp_path / "dev.toml"
        spec.write_text('name = "dev"\nvcpus = 1\nmemory = "1G"\n[scratch]\nsize = "256M"\n')
        assert d.cvmctl("vm", "create", "-f", str(spec)).returncode == 0
        started = await trio.to_thread.run_sync(
            lambda: d.cvmctl(
                "vm", "start", "dev", "--json", "--wait-timeout", str(START_WAIT), timeout=START_WAIT + 30
            )
        )
        assert started.returncode == 0, started.stderr + started.stdout
        vm = json.loads(started.stdout)
        assert vm["state"] == "running", vm
        run_dir = tmp_path / "s" / "vms" / "dev"
        disk = run_dir / SCRATCH_FILE
        assert disk.stat().st_size == 256 * MIB
        drive = next(a for a in vm["qemu_argv"] if a.startswith("file=") and SCRATCH_FILE in a)
        direct = direct_io_works(disk)
        modes = "aio=native,cache=none" if direct else "aio=threads,cache=writeback"
        assert drive == f"file={disk},if=none,id=scratch,format=raw,{modes}"

        # The guest kernel found a 256 MiB virtio disk (virtio_blk: "[vda] 524288 512-byte
        # logical blocks"); the dev guest's 9p root means the scratch disk is its only one.
        console = Path(vm["console_path"]).read_text(errors="replace")
        assert re.search(r"\[vd[a-z]+\] 524288 512-byte logical blocks", console), console[-3000:]

        # QEMU's view, over QMP (one client at a time: the daemon steps aside, and its
        # successor reattaches, leaving the disk of the running VM where it is).
        d.kill9()
        async with open_qmp(run_dir / "qmp.sock", deadline=10) as qmp:
            blocks = await qmp.execute("query-block", deadline=10)
            qdev = "/machine/peripheral/scratch0/virtio-backend"
            block = next(b for b in blocks if b.get("qdev") == qdev)
            assert block["inserted"]["file"] == str(disk)
            assert block["inserted"]["cache"]["direct"] is direct
            assert block["inserted"]["cache"]["no-flush"] is False
            serial = await qmp.execute("qom-get", {"path": qdev, "property": "serial"}, deadline=10)
            assert serial == SCRATCH_SERIAL
            threads = await qmp.execute("query-iothreads", deadline=10)
            assert [t["id"] for t in threads] == ["iothread-scratch"]
        d.start()
        assert d.vm("dev")["state"] == "running" and disk.exists()

        stopped = await trio.to_thread.run_sync(
            lambda: d.cvmctl("vm", "stop", "dev", "--grace", "20", "--json", timeout=120)
        )
        assert stopped.returncode == 0, stopped.stderr
        assert not disk.exists()
        assert d.cvmctl("vm", "rm", "dev").returncode == 0
        assert not run_dir.exists()
        assert not list((tmp_path / "s").rglob(f"*{SCRATCH_FILE}*"))
    finally:
        if d.process is not None and d.process.poll() is None:
            for item in json.loads(d.cvmctl("vm", "ls", "--json").stdout or "[]"):
                if item["qemu_pid"]:
                    d.cvmctl("vm", "kill", item["name"])
        d.stop()
        _kill_left_qemu(tmp_path / "s" / "vms" / "dev" / "qemu.pid")


def _kill_left_qemu(pidfile: Path) -> None:
    """A QEMU this test started and no daemon took back (after a failure): by its pid."""
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if str(pidfile.parent).encode() in cmdline and _alive(pid):
        os.kill(pid, signal.SIGKILL)
