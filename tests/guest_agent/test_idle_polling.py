"""The idle-polling state machine against fixture trees: apply, verify, revert, recover, faults."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from cvmcore.errors import CvmError
from guest_agent.idle_polling import (
    CPUIDLE_DIR,
    HALTPOLL_DRIVER_MODULE_DIR,
    HALTPOLL_PARAMS_DIR,
    KVM_CPUID_SIGNATURE_LEAF,
    STATE_FILE_NAME,
    HaltpollParams,
    HaltpollUnavailable,
    IdleMode,
    IdlePollingController,
    IdlePollingError,
    KernelCommandLineRequired,
    Modprobe,
    ModuleError,
    RecoveryOutcome,
    StateFileError,
    SysfsWriteError,
    cmdline_has_idle_poll,
    kvm_realtime_hint,
    parse_haltpoll_params,
    write_attribute,
)

Sysroot = Callable[[str], Path]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` with its exact content (for byte-exact comparisons)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class FakeModules:
    """modprobe for a fixture tree: loading cpuidle_haltpoll registers the haltpoll driver.

    As the kernel does, loading makes ``current_driver`` read ``haltpoll`` and creates
    ``/sys/module/cpuidle_haltpoll/`` (``initstate``, ``parameters/force``); unloading undoes it.
    """

    def __init__(self, root: Path, *, fail_load: str = "") -> None:
        self.root = root
        self.fail_load = fail_load
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self._driver_before = ""

    def load(self, name: str, parameters: Mapping[str, str]) -> None:
        self.calls.append(("load", name, dict(parameters)))
        if self.fail_load:
            raise ModuleError(f"modprobe {name} failed: {self.fail_load}")
        driver = self.root / CPUIDLE_DIR / "current_driver"
        self._driver_before = driver.read_text()
        driver.write_text("haltpoll\n")
        module = self.root / HALTPOLL_DRIVER_MODULE_DIR
        (module / "parameters").mkdir(parents=True)
        (module / "initstate").write_text("live\n")
        force = "Y" if parameters.get("force") in ("1", "Y", "y") else "N"
        (module / "parameters" / "force").write_text(f"{force}\n")

    def unload(self, name: str) -> None:
        self.calls.append(("unload", name, {}))
        driver = self.root / CPUIDLE_DIR / "current_driver"
        driver.write_text(self._driver_before or "none\n")
        shutil.rmtree(self.root / HALTPOLL_DRIVER_MODULE_DIR, ignore_errors=True)


def controller(
    root: Path,
    state_dir: Path,
    *,
    hint: bool | None = None,
    writer: Callable[[Path, bytes], None] | None = None,
) -> tuple[IdlePollingController, FakeModules]:
    modules = FakeModules(root)
    ctl = IdlePollingController(
        root, state_dir, modules=modules, realtime_hint=lambda: hint, writer=writer or write_attribute
    )
    return ctl, modules


def read(root: Path, relative: str) -> str:
    return (root / relative).read_text()


# ---- pure parsing ------------------------------------------------------------------------------


def test_parse_haltpoll_params() -> None:
    params = parse_haltpoll_params(
        {"guest_halt_poll_ns": "200000\n", "guest_halt_poll_allow_shrink": "N\n", "guest_halt_poll_grow": "4"}
    )
    assert params == HaltpollParams(200000, 4, None, None, False)


def test_idle_poll_on_the_command_line_is_a_whole_word() -> None:
    assert cmdline_has_idle_poll("root=/dev/vda idle=poll quiet")
    assert not cmdline_has_idle_poll("root=/dev/vda idle=halt")
    assert not cmdline_has_idle_poll("xidle=poll")


def test_params_are_written_as_the_kernel_spells_them() -> None:
    assert HaltpollParams(guest_halt_poll_ns=100, guest_halt_poll_allow_shrink=False).as_file_values() == {
        "guest_halt_poll_ns": b"100",
        "guest_halt_poll_allow_shrink": b"N",
    }
    with pytest.raises(IdlePollingError, match="negative"):
        HaltpollParams(guest_halt_poll_grow=-1).as_file_values()


# ---- status ------------------------------------------------------------------------------------


def test_status_of_the_recorded_machine(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-6.18")
    status = controller(root, tmp_path / "state")[0].status()
    assert status.mode is IdleMode.HALTPOLL
    assert (status.driver, status.governor) == ("haltpoll", "haltpoll")
    assert status.available_governors == ("ladder", "menu", "haltpoll")
    assert status.params == HaltpollParams(0, 2, 50000, 2, True)
    assert status.applied_mode is None
    assert not status.kernel_cmdline_idle_poll
    assert "guest_halt_poll_ns is 0: the haltpoll governor never polls" in status.notes


def test_status_of_the_default_tree(sysroot: Sysroot, tmp_path: Path) -> None:
    status = controller(sysroot("kvm-guest-default"), tmp_path / "state")[0].status()
    assert status.mode is IdleMode.DEFAULT
    assert (status.driver, status.governor) == ("none", "menu")
    assert status.params == HaltpollParams(200000, 2, 50000, 2, True)


# ---- apply / verify / revert -------------------------------------------------------------------


def test_apply_haltpoll_then_revert_restores_every_byte(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    ctl, modules = controller(root, tmp_path / "state")

    status = ctl.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=400000, guest_halt_poll_grow=4))

    assert status.mode is IdleMode.HALTPOLL
    assert status.applied_mode is IdleMode.HALTPOLL
    assert read(root, f"{CPUIDLE_DIR}/current_governor") == "haltpoll"
    assert read(root, f"{HALTPOLL_PARAMS_DIR}/guest_halt_poll_ns") == "400000"
    assert read(root, f"{HALTPOLL_PARAMS_DIR}/guest_halt_poll_grow") == "4"
    assert modules.calls == [("load", "cpuidle_haltpoll", {"force": "1"})]
    assert ctl.verify().ok
    assert tree_bytes(root) != before

    reverted = ctl.revert()

    assert reverted.mode is IdleMode.DEFAULT
    assert reverted.applied_mode is None
    assert tree_bytes(root) == before
    assert modules.calls[-1] == ("unload", "cpuidle_haltpoll", {})
    assert not (tmp_path / "state" / STATE_FILE_NAME).exists()


def test_default_mode_is_revert(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    ctl, _ = controller(root, tmp_path / "state")
    ctl.apply(IdleMode.HALTPOLL)
    assert ctl.apply(IdleMode.DEFAULT).mode is IdleMode.DEFAULT
    assert tree_bytes(root) == before
    with pytest.raises(IdlePollingError, match="only be set with mode haltpoll"):
        ctl.apply(IdleMode.DEFAULT, HaltpollParams(guest_halt_poll_ns=1))


def test_realtime_hint_means_no_force(sysroot: Sysroot, tmp_path: Path) -> None:
    ctl, modules = controller(sysroot("kvm-guest-default"), tmp_path / "state", hint=True)
    ctl.apply(IdleMode.HALTPOLL)
    assert modules.calls == [("load", "cpuidle_haltpoll", {})]


def test_originals_are_durable_before_the_first_write(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    state_file = tmp_path / "state" / STATE_FILE_NAME
    seen: list[dict[str, object]] = []

    def spying_writer(path: Path, value: bytes) -> None:
        seen.append(json.loads(state_file.read_bytes()))
        write_attribute(path, value)

    ctl, _ = controller(root, tmp_path / "state", writer=spying_writer)
    ctl.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=1000))
    first = seen[0]
    assert dict(first["originals"]) == {  # type: ignore[call-overload]
        f"{CPUIDLE_DIR}/current_governor": "menu\n",
        f"{HALTPOLL_PARAMS_DIR}/guest_halt_poll_ns": "200000\n",
    }
    assert first["module_loaded_by_agent"] is True


def test_a_second_apply_keeps_the_kernel_originals(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    ctl, modules = controller(root, tmp_path / "state")
    ctl.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=1000))
    ctl.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=2000, guest_halt_poll_shrink=4))
    assert read(root, f"{HALTPOLL_PARAMS_DIR}/guest_halt_poll_ns") == "2000"
    assert [c[0] for c in modules.calls] == ["load"]  # the driver was already there the second time
    ctl.revert()
    assert tree_bytes(root) == before


def test_haltpoll_on_the_recorded_machine_needs_no_module(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-6.18")
    before = tree_bytes(root)
    ctl, modules = controller(root, tmp_path / "state")
    ctl.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=200000))
    assert modules.calls == []
    assert ctl.status().notes == ()
    ctl.revert()
    assert tree_bytes(root) == before


def test_verify_sees_a_value_changed_behind_the_agents_back(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    ctl, _ = controller(root, tmp_path / "state")
    assert ctl.verify().applied_mode is None
    ctl.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=5000))
    (root / HALTPOLL_PARAMS_DIR / "guest_halt_poll_ns").write_text("7\n")
    result = ctl.verify()
    assert not result.ok
    assert [(m.path, m.wanted, m.actual) for m in result.mismatches] == [
        (f"{HALTPOLL_PARAMS_DIR}/guest_halt_poll_ns", "5000", "7")
    ]


# ---- modes that cannot be switched -------------------------------------------------------------


def test_full_polling_names_the_kernel_parameter(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    ctl, _ = controller(root, tmp_path / "state")
    with pytest.raises(KernelCommandLineRequired) as caught:
        ctl.apply(IdleMode.POLL)
    assert "'idle=poll'" in str(caught.value)
    assert isinstance(caught.value, CvmError)
    assert tree_bytes(root) == before


def test_full_polling_already_on_the_command_line(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    (root / "proc/cmdline").write_text("root=/dev/vda idle=poll\n")
    ctl, _ = controller(root, tmp_path / "state")
    assert ctl.apply(IdleMode.POLL).mode is IdleMode.POLL


def test_built_in_driver_that_did_not_register(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    (root / "sys/module/cpuidle_haltpoll/parameters").mkdir(parents=True)
    (root / "sys/module/cpuidle_haltpoll/parameters/force").write_text("N\n")
    before = tree_bytes(root)
    ctl, modules = controller(root, tmp_path / "state")
    with pytest.raises(HaltpollUnavailable, match=r"cpuidle_haltpoll\.force=Y"):
        ctl.apply(IdleMode.HALTPOLL)
    assert modules.calls == []
    assert tree_bytes(root) == before
    assert not (tmp_path / "state" / STATE_FILE_NAME).exists()


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("current_driver", "acpi_idle\n", "'acpi_idle' is registered"),
        (
            "available_governors",
            "ladder menu \n",
            "CONFIG_CPU_IDLE_GOV_HALTPOLL and registers only under KVM",
        ),
    ],
    ids=["another-driver-registered", "no-haltpoll-governor"],
)
def test_haltpoll_unavailable(
    sysroot: Sysroot, tmp_path: Path, file: str, content: str, message: str
) -> None:
    root = sysroot("kvm-guest-default")
    (root / CPUIDLE_DIR / file).write_text(content)
    ctl, _ = controller(root, tmp_path / "state")
    with pytest.raises(HaltpollUnavailable, match=message):
        ctl.apply(IdleMode.HALTPOLL)


def test_module_load_failure_leaves_nothing_behind(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    modules = FakeModules(root, fail_load="Module cpuidle_haltpoll not found")
    ctl = IdlePollingController(root, tmp_path / "state", modules=modules, realtime_hint=lambda: None)
    with pytest.raises(ModuleError, match="not found"):
        ctl.apply(IdleMode.HALTPOLL)
    assert tree_bytes(root) == before
    assert not (tmp_path / "state" / STATE_FILE_NAME).exists()


# ---- refused writes ----------------------------------------------------------------------------


def test_a_refused_write_names_file_and_errno_and_rolls_back(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    refused = root / HALTPOLL_PARAMS_DIR / "guest_halt_poll_shrink"

    def kernel(path: Path, value: bytes) -> None:
        if path == refused:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
        write_attribute(path, value)

    ctl, modules = controller(root, tmp_path / "state", writer=kernel)
    with pytest.raises(SysfsWriteError) as caught:
        ctl.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=1, guest_halt_poll_shrink=0))
    error = caught.value
    assert error.path == refused
    assert error.errno == errno.EINVAL
    assert str(refused) in str(error) and "EINVAL" in str(error)
    assert error.rolled_back == 2  # current_governor and guest_halt_poll_ns were written, then restored
    assert tree_bytes(root) == before
    assert modules.calls[-1][0] == "unload"
    assert not (tmp_path / "state" / STATE_FILE_NAME).exists()


def _make_read_only(path: Path) -> Callable[[], None]:
    """Make ``path`` unwritable even for root (read-only bind mount); return the undo."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return lambda: path.chmod(0o644)
    done = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount as root here: {done.stderr.decode().strip()}")
    remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, check=False)
    if remount.returncode != 0:
        subprocess.run(["umount", str(path)], check=False)
        pytest.skip(f"cannot remount read-only here: {remount.stderr.decode().strip()}")
    return lambda: subprocess.run(["umount", str(path)], check=True).check_returncode()


def test_a_read_only_file_gives_a_clear_error_and_changes_nothing(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    read_only = root / HALTPOLL_PARAMS_DIR / "guest_halt_poll_grow"
    undo = _make_read_only(read_only)
    try:
        ctl, _ = controller(root, tmp_path / "state")
        with pytest.raises(SysfsWriteError) as caught:
            ctl.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=1, guest_halt_poll_grow=3))
    finally:
        undo()
    assert caught.value.path == read_only
    assert caught.value.errno in (errno.EROFS, errno.EACCES)
    assert str(read_only) in str(caught.value)
    assert tree_bytes(root) == before
    assert not (tmp_path / "state" / STATE_FILE_NAME).exists()


# ---- crashes and recovery ----------------------------------------------------------------------


def test_crash_between_apply_and_revert_then_recover(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    first, _ = controller(root, tmp_path / "state")
    first.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=9))
    del first  # the agent dies: nothing in memory survives

    restarted, _ = controller(root, tmp_path / "state")
    assert restarted.status().applied_mode is IdleMode.HALTPOLL
    assert restarted.recover().outcome is RecoveryOutcome.RESTORED
    assert tree_bytes(root) == before
    assert restarted.recover().outcome is RecoveryOutcome.NOTHING_TO_RECOVER


def test_recover_can_keep_the_applied_values(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    controller(root, tmp_path / "state")[0].apply(IdleMode.HALTPOLL)
    applied = tree_bytes(root)
    restarted, _ = controller(root, tmp_path / "state")
    assert restarted.recover(keep=True).outcome is RecoveryOutcome.KEPT
    assert tree_bytes(root) == applied
    restarted.revert()
    assert tree_bytes(root) == before


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "mode": "haltpoll", "origi', ""])
def test_an_unreadable_state_file_is_set_aside_and_changes_nothing(
    sysroot: Sysroot, tmp_path: Path, content: str
) -> None:
    """A truncated record must not keep the agent from starting, ever: it is moved aside
    (kept for a person to read) and nothing is written to the kernel."""
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE_NAME).write_text(content)
    ctl, _ = controller(root, state)
    with pytest.raises(StateFileError, match="unreadable"):
        ctl.status()  # an RPC names the problem ...
    recovery = ctl.recover()  # ... and the start sets the file aside
    assert recovery.outcome is RecoveryOutcome.DISCARDED
    assert "unreadable" in recovery.problem
    assert recovery.set_aside is not None and recovery.set_aside.read_text() == content
    assert recovery.set_aside.name.startswith(f"{STATE_FILE_NAME}.corrupt-")
    assert not (state / STATE_FILE_NAME).exists()
    assert tree_bytes(root) == before
    assert ctl.recover().outcome is RecoveryOutcome.NOTHING_TO_RECOVER
    assert ctl.status().applied_mode is None


def test_a_recorded_file_that_is_gone_is_skipped_and_named(sysroot: Sysroot, tmp_path: Path) -> None:
    """After a reboot a recorded parameter file may not exist: nothing to restore there."""
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    controller(root, tmp_path / "state")[0].apply(
        IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=9, guest_halt_poll_grow=3)
    )
    gone = f"{HALTPOLL_PARAMS_DIR}/guest_halt_poll_ns"
    (root / gone).unlink()
    recovery = controller(root, tmp_path / "state")[0].recover()
    assert recovery.outcome is RecoveryOutcome.RESTORED
    assert recovery.gone == (gone,)
    del before[gone]
    assert tree_bytes(root) == before
    assert not (tmp_path / "state" / STATE_FILE_NAME).exists()


def test_a_refused_restore_keeps_the_record_and_does_not_raise(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    controller(root, tmp_path / "state")[0].apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=9))

    def refuse(path: Path, value: bytes) -> None:
        raise OSError(errno.EINVAL, "Invalid argument", str(path))

    recovery = controller(root, tmp_path / "state", writer=refuse)[0].recover()
    assert recovery.outcome is RecoveryOutcome.RESTORE_FAILED
    assert "revert incomplete" in recovery.problem
    assert (tmp_path / "state" / STATE_FILE_NAME).exists()  # for a later revert


def test_a_record_from_an_earlier_boot_is_dropped_unapplied(sysroot: Sysroot, tmp_path: Path) -> None:
    root = sysroot("kvm-guest-default")
    boot_id = root / "proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True, exist_ok=True)
    boot_id.write_text("11111111-1111-1111-1111-111111111111\n")
    controller(root, tmp_path / "state")[0].apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=9))
    boot_id.write_text("22222222-2222-2222-2222-222222222222\n")  # rebooted
    this_boot = tree_bytes(root)
    recovery = controller(root, tmp_path / "state")[0].recover()
    assert recovery.outcome is RecoveryOutcome.PREVIOUS_BOOT
    assert f"{HALTPOLL_PARAMS_DIR}/guest_halt_poll_ns" in recovery.gone
    assert tree_bytes(root) == this_boot  # the new boot's settings are left alone
    assert not (tmp_path / "state" / STATE_FILE_NAME).exists()


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_idle_polling import FakeModules
    from guest_agent.idle_polling import HaltpollParams, IdleMode, IdlePollingController, write_attribute

    root, state, stop_after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    writes = 0

    def writer(path, value):
        global writes
        write_attribute(path, value)
        writes += 1
        if writes == stop_after:
            print("paused", flush=True)
            time.sleep(600)

    ctl = IdlePollingController(root, state, modules=FakeModules(root), realtime_hint=lambda: None,
                                writer=writer)
    ctl.apply(IdleMode.HALTPOLL, HaltpollParams(guest_halt_poll_ns=123, guest_halt_poll_grow=3))
    print("applied", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("stop_after", [0, 2], ids=["after-apply", "mid-apply"])
def test_kill_9_then_restart_restores_originals(sysroot: Sysroot, tmp_path: Path, stop_after: int) -> None:
    root = sysroot("kvm-guest-default")
    before = tree_bytes(root)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    child = subprocess.Popen(
        [sys.executable, str(script), str(root), str(tmp_path / "state"), str(stop_after)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == ("applied" if stop_after == 0 else "paused")
        assert tree_bytes(root) != before
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    restarted, _ = controller(root, tmp_path / "state")
    assert restarted.recover().outcome is RecoveryOutcome.RESTORED
    assert tree_bytes(root) == before


# ---- the real modprobe wrapper (never the real modprobe) ---------------------------------------


def test_modprobe_failure_becomes_a_module_error() -> None:
    with pytest.raises(ModuleError, match="failed"):
        Modprobe(executable="false").load("cpuidle_haltpoll", {"force": "1"})
    with pytest.raises(ModuleError, match="could not run"):
        Modprobe(executable="/nonexistent/modprobe").unload("cpuidle_haltpoll")
    Modprobe(executable="true").load("cpuidle_haltpoll", {"force": "1"})


# ---- the realtime hint (through a stand-in for /dev/cpu/0/cpuid) ---------------------------------


def test_realtime_hint_from_the_cpuid_device(tmp_path: Path) -> None:
    assert kvm_realtime_hint(tmp_path) is None  # no cpuid driver: unknown
    device = tmp_path / "dev/cpu/0/cpuid"
    device.parent.mkdir(parents=True)
    with device.open("wb") as handle:  # sparse: the file offset is the CPUID leaf
        handle.seek(KVM_CPUID_SIGNATURE_LEAF)
        handle.write((0x40000001).to_bytes(4, "little") + b"KVMKVMKVM\0\0\0" + b"\0")
    # In a regular file leaf 0x40000001 overlaps the signature: its EDX bytes are zero.
    assert kvm_realtime_hint(tmp_path) is False
    with device.open("r+b") as handle:
        handle.seek(KVM_CPUID_SIGNATURE_LEAF + 4)
        handle.write(b"Microsoft Hv")
    assert kvm_realtime_hint(tmp_path) is None  # not KVM


def test_haltpoll_under_tcg_is_explained(sysroot: Sysroot, tmp_path: Path) -> None:
    """Recorded 6.12 guest under TCG: no haltpoll governor (it registers only under KVM)."""
    root = sysroot("tcg-guest-6.12")
    before = tree_bytes(root)
    ctl, modules = controller(root, tmp_path / "state")
    status = ctl.status()
    assert (status.mode, status.driver, status.governor) == (IdleMode.DEFAULT, "none", "menu")
    assert status.available_governors == ("ladder", "menu")
    with pytest.raises(HaltpollUnavailable, match="registers only under KVM"):
        ctl.apply(IdleMode.HALTPOLL)
    assert modules.calls == []
    assert tree_bytes(root) == before
