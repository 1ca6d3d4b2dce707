"""vCPU pinning: the plan, the procfs edge, the record, `vm show`, and a real TCG guest.

The real test boots the dev guest under TCG (``-accel tcg,thread=multi``: one host thread
per vCPU) with ``[pinning] host_cpus = [1]`` and reads each QEMU thread's
``Cpus_allowed_list``; then moves the vCPU by hand, kills cvm-hostd with SIGKILL, restarts
it, and sees the vCPU put back on CPU 1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Set
from pathlib import Path

import pytest
import trio

from cvm.v1 import host_pb2
from cvmcore.affinity import format_cpu_list, parse_cpu_list
from cvmcore.errors import HostNotReady
from cvmctl.cli.vm import print_vm
from host_daemon.pinning import (
    PinningError,
    apply,
    check_host_cpus,
    parse_allowed_list,
    plan,
)
from host_daemon.server import vm_to_proto
from host_daemon.store import VcpuPin, VMRecord, VMStore
from host_daemon.vms import VMManager
from tests.host_daemon.test_lifecycle import START_WAIT, Daemon, require_tools, running

# -- the plan ---------------------------------------------------------------------------


def test_plan_pins_each_vcpu_and_keeps_the_rest_off_their_cores() -> None:
    planned = plan([2, 3], [101, 102], [100, 101, 102, 103, 104], {0, 1, 2, 3})
    assert planned.threads == {
        101: {2},
        102: {3},
        100: {0, 1},  # the main thread: threads QEMU starts later inherit this
        103: {0, 1},
        104: {0, 1},
    }
    assert planned.vcpus == ((0, 101, 2), (1, 102, 3))
    assert planned.emulator == {0, 1}
    assert planned.notes == ()


def test_plan_leaves_the_other_threads_when_no_cpu_is_left_and_says_so() -> None:
    planned = plan([1], [101], [100, 101, 102], {1})
    assert planned.threads == {101: {1}}
    assert planned.emulator == frozenset()
    assert len(planned.notes) == 1
    assert "no CPU left for QEMU's other threads" in planned.notes[0]
    assert "left as they are" in planned.notes[0]


def test_plan_pins_outside_the_allowed_set_and_shares_a_thread() -> None:
    # A host CPU outside QEMU's inherited set (e.g. another NUMA node) is still the vCPU's.
    assert plan([5], [101], [100, 101], {0, 1}).threads == {101: {5}, 100: {0, 1}}
    # One thread running two vCPUs (TCG thread=single) gets both CPUs, and a note.
    shared = plan([2, 3], [101, 101], [100, 101], {0, 1, 2, 3})
    assert shared.threads == {101: {2, 3}, 100: {0, 1}}
    assert any("share thread 101" in note for note in shared.notes)
    mismatch = plan([2, 3], [101], [100, 101], {0, 1, 2, 3})
    assert mismatch.threads == {101: {2}, 100: {0, 1}}
    assert any("1 vCPU threads" in note for note in mismatch.notes)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("1", {1}), ("0-3", {0, 1, 2, 3}), ("0-1,4,6-7", {0, 1, 4, 6, 7}), ("", set()), ("5\n", {5})],
)
def test_parse_cpu_list(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


def test_parse_allowed_list() -> None:
    status = "Name:\tCPU 0/TCG\nCpus_allowed:\t2\nCpus_allowed_list:\t1\nMems_allowed_list:\t0\n"
    assert parse_allowed_list(status) == "1"
    assert parse_allowed_list("Name:\tx\n") is None


def test_check_host_cpus_names_the_cpu() -> None:
    check_host_cpus([1], usable={0, 1}, present=2)
    check_host_cpus([], usable=set(), present=0)  # nothing pinned, nothing to check
    with pytest.raises(HostNotReady, match=r"CPU 7, which this host does not have \(it has 2 CPUs: 0-1\)"):
        check_host_cpus([0, 7], usable={0, 1}, present=2, name="p")
    with pytest.raises(
        HostNotReady, match=r"VM 'p': .*CPU 1, which cvm-hostd may not use \(its CPU set is 0:"
    ):
        check_host_cpus([1], usable={0}, present=2, name="p")


# -- the procfs edge, on a fake tree ---------------------------------------------------


class FakeKernel:
    """A ``<root>/<pid>/task/<tid>/status`` tree and a ``sched_setaffinity`` that rewrites it."""

    def __init__(self, root: Path, pid: int, threads: dict[int, str], allowed: Set[int]) -> None:
        self.root, self.pid = root, pid
        self.calls: list[tuple[int, frozenset[int]]] = []
        self.vanish: set[int] = set()  # threads that end when pinned
        self.refuse: set[int] = set()  # CPUs the kernel refuses (EINVAL)
        self.spawn_on_main: dict[int, str] = {}  # threads QEMU starts just as the main is pinned
        self.initial = frozenset(allowed)
        for tid, name in threads.items():
            self.add(tid, name, allowed)

    def add(self, tid: int, name: str, allowed: Set[int]) -> None:
        task = self.root / str(self.pid) / "task" / str(tid)
        task.mkdir(parents=True, exist_ok=True)
        self.write(tid, name, allowed)

    def write(self, tid: int, name: str, allowed: Set[int]) -> None:
        status = self.root / str(self.pid) / "task" / str(tid) / "status"
        status.write_text(
            f"Name:\t{name}\nTgid:\t{self.pid}\nPid:\t{tid}\n"
            f"Cpus_allowed:\tff\nCpus_allowed_list:\t{format_cpu_list(allowed)}\nMems_allowed_list:\t0\n"
        )

    def name(self, tid: int) -> str:
        status = (self.root / str(self.pid) / "task" / str(tid) / "status").read_text()
        return status.split("\n", 1)[0].split("\t", 1)[1]

    def allowed(self, tid: int) -> str | None:
        return parse_allowed_list((self.root / str(self.pid) / "task" / str(tid) / "status").read_text())

    def setaffinity(self, tid: int, cpus: Set[int]) -> None:
        self.calls.append((tid, frozenset(cpus)))
        if tid in self.vanish:
            shutil.rmtree(self.root / str(self.pid) / "task" / str(tid))
            raise ProcessLookupError(errno.ESRCH, "No such process")
        if cpus & self.refuse:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self.write(tid, self.name(tid), cpus)
        if tid == self.pid:
            for new, name in self.spawn_on_main.items():
                self.add(new, name, self.initial)  # created from the main thread's old set


def qemu_tree(tmp_path: Path) -> FakeKernel:
    return FakeKernel(
        tmp_path / "proc",
        100,
        {100: "qemu-system-x86", 101: "call_rcu", 102: "CPU 0/TCG", 103: "CPU 1/TCG", 104: "IO io0"},
        {0, 1, 2, 3},
    )


def test_apply_pins_and_reads_back(tmp_path: Path) -> None:
    kernel = qemu_tree(tmp_path)
    applied = apply(100, [2, 3], [102, 103], procfs=kernel.root, setaffinity=kernel.setaffinity)
    assert kernel.calls[0] == (100, frozenset({0, 1}))  # the main thread first
    assert applied.vcpus == (VcpuPin(0, 102, 2, "2"), VcpuPin(1, 103, 3, "3"))
    assert applied.emulator_cpus == "0-1"
    assert applied.notes == ()
    assert [kernel.allowed(tid) for tid in (100, 101, 104)] == ["0-1", "0-1", "0-1"]

    # Applied again (a restarted daemon) after someone moved a vCPU: the same result.
    kernel.write(102, "CPU 0/TCG", {0, 1, 2, 3})
    again = apply(100, [2, 3], [102, 103], procfs=kernel.root, setaffinity=kernel.setaffinity)
    assert again == applied


def test_apply_skips_a_thread_that_ended_and_pins_one_that_started(tmp_path: Path) -> None:
    kernel = qemu_tree(tmp_path)
    kernel.vanish = {104}
    kernel.spawn_on_main = {105: "worker"}
    applied = apply(100, [2, 3], [102, 103], procfs=kernel.root, setaffinity=kernel.setaffinity)
    assert (104, frozenset({0, 1})) in kernel.calls
    assert kernel.allowed(105) == "0-1"  # caught by the second pass
    assert [pin.allowed_cpus for pin in applied.vcpus] == ["2", "3"]


def test_apply_never_touches_a_thread_that_is_not_qemus(tmp_path: Path) -> None:
    kernel = qemu_tree(tmp_path)
    applied = apply(100, [2, 3], [102, 999], procfs=kernel.root, setaffinity=kernel.setaffinity)
    assert 999 not in {tid for tid, _ in kernel.calls}
    assert applied.vcpus[1] == VcpuPin(1, 999, 3, "")
    assert any("999 is not a thread of QEMU" in note for note in applied.notes)


def test_apply_names_the_cpu_the_kernel_refuses(tmp_path: Path) -> None:
    kernel = qemu_tree(tmp_path)
    kernel.refuse = {3}
    with pytest.raises(PinningError, match=r"vCPU thread 103 \(pid 100\) to CPU 3: Invalid argument"):
        apply(100, [2, 3], [102, 103], procfs=kernel.root, setaffinity=kernel.setaffinity)
    with pytest.raises(PinningError, match="it exited"):
        apply(200, [2], [201], procfs=kernel.root, setaffinity=kernel.setaffinity)


def test_apply_for_real_on_this_process_threads() -> None:
    """sched_setaffinity and /proc on a thread of the test process itself."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two usable CPUs")
    target = max(allowed)
    ready, done = threading.Event(), threading.Event()
    tids: list[int] = []

    def worker() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait(10)
    # A pid whose main thread is not ours to change: pin a fake "QEMU" made of our own threads
    # through a setter that only touches the worker, and read the real procfs back.
    pid = os.getpid()
    calls: list[int] = []

    def only_worker(tid: int, cpus: Set[int]) -> None:
        calls.append(tid)
        if tid == tids[0]:
            os.sched_setaffinity(tid, cpus)

    try:
        applied = apply(pid, [target], tids, setaffinity=only_worker)
        assert applied.vcpus == (VcpuPin(0, tids[0], target, str(target)),)
        assert Path(f"/proc/{pid}/task/{tids[0]}/status").read_text().count(f"Cpus_allowed_list:\t{target}\n")
    finally:
        done.set()
        thread.join()


# -- the record, the API and `vm show` ----------------------------------------------------


def test_an_old_database_loads_and_the_new_fields_round_trip(tmp_path: Path) -> None:
    store = VMStore(tmp_path / "hostd.db")
    store.insert(VMRecord(name="old", spec_toml='name = "old"\n', created_at=1.0))
    store.close()
    # A row as the daemon wrote it before pinning was recorded: no such keys in ``extra``.
    db = sqlite3.connect(tmp_path / "hostd.db")
    old_extra = {
        "boot_phases": {"spawn": 0.5},
        "vcpu_thread_ids": [7],
        "last_console_lines": [],
        "helper_pids": [],
    }
    db.execute("UPDATE vms SET extra=? WHERE name='old'", (json.dumps(old_extra),))
    db.commit()
    db.close()
    store = VMStore(tmp_path / "hostd.db")
    try:
        old = store.get("old")
        assert old is not None
        assert (old.vcpu_thread_ids, old.qemu_argv, old.vcpu_pins, old.emulator_cpus) == ((7,), (), (), "")
        pinned = VMRecord(
            name="new",
            spec_toml='name = "new"\n',
            created_at=2.0,
            qemu_argv=("qemu-system-x86_64", "-name", "guest=new,debug-threads=on"),
            vcpu_pins=(VcpuPin(0, 1234, 1, "1"),),
            emulator_cpus="0",
        )
        store.insert(pinned)
        assert store.get("new") == pinned
    finally:
        store.close()


def test_vm_show_prints_the_pinning(capsys: pytest.CaptureFixture[str]) -> None:
    record = VMRecord(
        name="p",
        spec_toml='name = "p"\nvcpus = 2\n[pinning]\nhost_cpus = [1, 2]\n',
        created_at=1.0,
        qemu_argv=("qemu-system-x86_64", "-accel", "tcg,thread=multi"),
        vcpu_thread_ids=(1234, 1235),
        vcpu_pins=(VcpuPin(0, 1234, 1, "1"), VcpuPin(1, 1235, 2, "2")),
        emulator_cpus="0,3",
    )
    message = vm_to_proto(record)
    print_vm(message, as_json=False)
    out = capsys.readouterr().out
    assert "vCPU 0  thread 1234  -> CPU 1 (allowed: 1)\n" in out
    assert "vCPU 1  thread 1235  -> CPU 2 (allowed: 2)\n" in out
    assert "emulator cpus  0,3 (QEMU's other threads)" in out
    print_vm(message, as_json=True)
    data = json.loads(capsys.readouterr().out)
    assert data["vcpu_pins"] == [
        {"vcpu": 0, "thread_id": 1234, "host_cpu": 1, "allowed_cpus": "1"},
        {"vcpu": 1, "thread_id": 1235, "host_cpu": 2, "allowed_cpus": "2"},
    ]
    assert data["emulator_cpus"] == "0,3"
    assert data["qemu_argv"] == ["qemu-system-x86_64", "-accel", "tcg,thread=multi"]
    unpinned = json.loads(_printed(capsys, host_pb2.VM(name="u")))
    assert (unpinned["vcpu_pins"], unpinned["emulator_cpus"], unpinned["qemu_argv"]) == ([], "", [])


def _printed(capsys: pytest.CaptureFixture[str], vm: host_pb2.VM) -> str:
    print_vm(vm, as_json=True)
    return capsys.readouterr().out


async def test_start_refuses_a_cpu_the_daemon_cannot_use_before_qemu_runs(tmp_path: Path) -> None:
    missing = max(os.cpu_count() or 1, max(os.sched_getaffinity(0)) + 1)
    manager = VMManager(tmp_path / "state", qemu_binary="/nonexistent/qemu")
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        manager.create(f'name = "p"\nvcpus = 1\n[pinning]\nhost_cpus = [{missing}]\n')
        with pytest.raises(
            HostNotReady, match=f"host_cpus names CPU {missing}, which this host does not have"
        ):
            await manager.start("p")
        record = manager.get("p")
        assert (record.state, record.boot_count, record.qemu_pid) == ("defined", 0, 0)
        assert not (tmp_path / "state" / "vms" / "p" / "qemu.argv").exists()
        nursery.cancel_scope.cancel()


# -- for real: the dev guest under TCG ---------------------------------------------------


def _allowed(pid: int, tid: int) -> str:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    value = parse_allowed_list(status)
    assert value is not None
    return value


def _threads(pid: int) -> dict[int, str]:
    names: dict[int, str] = {}
    for entry in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
    return names


def _others_exclude(pid: int, vcpu_tid: int, cpu: int) -> dict[int, str]:
    """The threads (tid -> allowed list) other than the vCPU whose set still contains ``cpu``."""
    wrong: dict[int, str] = {}
    for tid, name in _threads(pid).items():
        if tid == vcpu_tid:
            continue
        try:
            allowed = _allowed(pid, tid)
        except OSError:
            continue
        if cpu in parse_cpu_list(allowed):
            wrong[tid] = f"{name}: {allowed}"
    return wrong


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: the VM's unix sockets live under it, and sun_path holds 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pin-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_vcpu_pinned_under_tcg_and_again_after_the_daemon_is_killed(short_dir: Path) -> None:
    allowed = os.sched_getaffinity(0)
    if 1 not in allowed or not allowed - {1}:
        pytest.skip(f"needs CPU 1 and another CPU (this process may use CPUs {format_cpu_list(allowed)})")
    require_tools("qemu-system-x86_64", "vhost-device-vsock")
    daemon = Daemon(short_dir / "s", short_dir / "h.sock")
    daemon.start()
    try:
        spec = short_dir / "pin.toml"
        spec.write_text('name = "pin"\nvcpus = 1\nmemory = "1G"\n\n[pinning]\nhost_cpus = [1]\n')
        created = daemon.cvmctl("vm", "create", "-f", str(spec))
        assert created.returncode == 0, created.stderr
        started = daemon.cvmctl(
            "vm", "start", "pin", "--json", "--wait-timeout", str(START_WAIT), timeout=START_WAIT + 30
        )
        assert started.returncode == 0, started.stderr + started.stdout
        vm = json.loads(started.stdout)
        assert vm["state"] == "running", vm
        qemu_pid = vm["qemu_pid"]
        (vcpu_tid,) = vm["vcpu_thread_ids"]

        # The kernel's view: the vCPU thread (named by QEMU itself) on CPU 1 alone, every other
        # thread of QEMU off CPU 1.
        assert _threads(qemu_pid)[vcpu_tid] == "CPU 0/TCG"
        assert _allowed(qemu_pid, vcpu_tid) == "1"
        assert _others_exclude(qemu_pid, vcpu_tid, 1) == {}
        emulator = format_cpu_list(allowed - {1})
        assert _allowed(qemu_pid, qemu_pid) == emulator

        # What the daemon reports, in JSON and as text; the argv of the boot is recorded too.
        assert vm["vcpu_pins"] == [{"vcpu": 0, "thread_id": vcpu_tid, "host_cpu": 1, "allowed_cpus": "1"}]
        assert vm["emulator_cpus"] == emulator
        argv_file = short_dir / "s" / "vms" / "pin" / "qemu.argv"
        assert vm["qemu_argv"] == argv_file.read_text().splitlines()
        assert "tcg,thread=multi" in " ".join(vm["qemu_argv"])
        shown = daemon.cvmctl("vm", "show", "pin")
        assert f"vCPU 0  thread {vcpu_tid}  -> CPU 1 (allowed: 1)" in shown.stdout, shown.stdout

        # Someone moves the vCPU and the main thread while the daemon is gone; a restarted
        # daemon puts them back.
        os.sched_setaffinity(vcpu_tid, allowed)
        os.sched_setaffinity(qemu_pid, allowed)
        assert _allowed(qemu_pid, vcpu_tid) == format_cpu_list(allowed)
        daemon.kill9()
        assert running(qemu_pid)
        restarted = time.monotonic()
        daemon.start()
        while _allowed(qemu_pid, vcpu_tid) != "1" or _others_exclude(qemu_pid, vcpu_tid, 1):
            assert time.monotonic() - restarted < 10, (
                _allowed(qemu_pid, vcpu_tid),
                _others_exclude(qemu_pid, vcpu_tid, 1),
            )
            time.sleep(0.1)
        print(f"re-pinned {time.monotonic() - restarted:.2f} s after the daemon was started again")

        def pinned_logged() -> int:
            return [entry["event"] for entry in daemon.log()].count("vcpus_pinned")

        # The affinity is set before the daemon records the pins and logs them: wait for the log.
        while pinned_logged() < 2:
            assert time.monotonic() - restarted < 20, pinned_logged()
            time.sleep(0.1)
        assert pinned_logged() == 2  # at boot, and by the new daemon
        again = daemon.vm("pin")
        assert again["state"] == "running" and again["qemu_pid"] == qemu_pid
        assert again["vcpu_pins"] == vm["vcpu_pins"]
        assert again["emulator_cpus"] == emulator
        health = daemon.cvmctl("agent", "health", "--connect", vm["agent_address"], "--timeout", "30")
        assert health.stdout == "SERVING\n", health.stderr
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.cvmctl("vm", "kill", "pin")
            daemon.stop()
        # The daemon gone before it could (a failed assertion in between): end, by pid, what
        # this test started (QEMU, vhost-device-vsock), found by the state directory in its argv.
        for pid in _started_under(short_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _started_under(directory: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if str(directory).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


async def test_a_vm_that_died_while_the_daemon_was_down_loses_its_pins(tmp_path: Path) -> None:
    """Pins name threads of a process: when the process is found gone, so are they."""
    from host_daemon.store import VMState, VMStore
    from host_daemon.vms import VMManager

    (tmp_path / "vms").mkdir()
    store = VMStore(tmp_path / "hostd.db")
    store.insert(VMRecord(name="gone", spec_toml='name = "gone"\n', created_at=1.0))
    store.save(
        VMRecord(
            name="gone",
            spec_toml='name = "gone"\n',
            created_at=1.0,
            state=VMState.RUNNING,
            qemu_pid=999_999_999,
            qemu_start_ticks=1,
            vcpu_pins=(VcpuPin(0, 4242, 0, "0"),),
            emulator_cpus="1-3",
        )
    )
    store.close()
    manager = VMManager(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        record = manager.get("gone")
        nursery.cancel_scope.cancel()
    assert record.state is VMState.CRASHED
    assert (record.vcpu_pins, record.emulator_cpus) == ((), "")
