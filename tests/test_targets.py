"""Built-in targets: parsing, pairing, the spec of each, and refusal before anything boots."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmcore.errors import HostNotReady, UsageError
from cvmctl.cli.main import main
from cvmctl.targets import BuiltinTarget, pair, parse_target
from host_daemon.devguest import wants_dev_guest
from host_daemon.hostcheck import evaluate, gather_host_facts
from host_daemon.qemu_args import kernel_cmdline
from host_daemon.spec import parse_spec

FORWARDS = {8080: 40001, 7175: 40002}
FIRMWARE = Path("/usr/share/ovmf/OVMF.fd")


def test_parse() -> None:
    assert parse_target("vm") == BuiltinTarget("vm")
    assert parse_target("local") is None and parse_target("vm:x") is None
    assert parse_target("sev-snp+idle-poll").modifiers == ("idle-poll",)  # type: ignore[union-attr]
    # modifiers are kept in one order, so vm+haltpoll+... names one VM however it is written
    assert parse_target("vm+haltpoll+swiotlb") == parse_target("vm+swiotlb+haltpoll")
    for bad, why in [
        ("vm+fast", "unknown modifier 'fast'"),
        ("vm+swiotlb+swiotlb", r"\+swiotlb twice"),
        ("tdx+swiotlb", "for a normal VM"),
        ("vm+haltpoll+idle-poll", "choose one of"),
    ]:
        with pytest.raises(UsageError, match=why):
            parse_target(bad)


def test_pairing_makes_the_vm_arm_a_baseline() -> None:
    a, b = pair(BuiltinTarget("vm"), BuiltinTarget("sev-snp"))
    assert (a.baseline_for, b.baseline_for) == ("sev-snp", "none")
    assert a.name == "vm" and a.vm_name == "cvmctl-vm-for-sev-snp"
    a, b = pair(BuiltinTarget("tdx", ("haltpoll",)), BuiltinTarget("vm", ("haltpoll",)))
    assert b.baseline_for == "tdx" and b.vm_name == "cvmctl-vm-for-tdx-haltpoll"
    assert pair(BuiltinTarget("vm"), BuiltinTarget("vm", ("swiotlb",)))[0].baseline_for == "none"
    with pytest.raises(UsageError, match="never run on the same host"):
        pair(BuiltinTarget("sev-snp"), BuiltinTarget("tdx"))


def test_each_spec_is_the_dev_guest_with_one_difference() -> None:
    plain = parse_spec(BuiltinTarget("vm").spec_toml(FORWARDS))
    swiotlb = parse_spec(BuiltinTarget("vm", ("swiotlb",)).spec_toml(FORWARDS))
    assert plain.name == "cvmctl-dev" and swiotlb.name == "cvmctl-dev-swiotlb"
    assert wants_dev_guest(plain) and wants_dev_guest(swiotlb)
    assert swiotlb.guest.swiotlb_force == 524288 and plain.guest.swiotlb_force is None
    assert "swiotlb=524288,force" in kernel_cmdline(swiotlb)
    same = ("vcpus", "memory_mib", "network", "accel", "cpu", "console", "image")
    assert all(getattr(plain, f) == getattr(swiotlb, f) for f in same)

    snp = parse_spec(BuiltinTarget("sev-snp", ("haltpoll",)).spec_toml(FORWARDS, FIRMWARE))
    base_target = pair(BuiltinTarget("vm", ("haltpoll",)), BuiltinTarget("sev-snp"))[0]
    base = parse_spec(base_target.spec_toml(FORWARDS, FIRMWARE))
    assert (snp.tee, base.baseline_for) == ("sev-snp", "sev-snp")
    assert snp.boot.firmware == base.boot.firmware == FIRMWARE
    assert wants_dev_guest(snp) and snp.guest.haltpoll and base.guest.haltpoll
    assert snp.console_device == base.console_device == "virtio"
    with pytest.raises(UsageError, match="needs a firmware image"):
        BuiltinTarget("tdx").spec_toml(FORWARDS)


def test_a_confidential_target_is_refused_before_anything_boots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a host without SEV-SNP (as here): exit 5 at once, the reasons named, nothing stored."""
    if evaluate(gather_host_facts(), "sev-snp").ready:
        pytest.skip("this host can run SEV-SNP guests")
    data = ["--data-dir", str(tmp_path / "store")]
    assert main(["bench", "nginx", "--compare", "vm,sev-snp", "--duration", "2", *data]) == 5
    err = capsys.readouterr().err
    assert "this host cannot run a sev-snp guest: cpu: /proc/cpuinfo has no sev_snp flag" in err
    assert "Traceback" not in err and "booting" not in err
    assert main(["results", "ls", "--json", *data]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    with pytest.raises(HostNotReady):
        from cvmctl.resolve import check_builtin_targets

        check_builtin_targets([BuiltinTarget("tdx")])


@pytest.mark.slow
def test_the_snp_baseline_boots_under_tcg(tmp_path: Path) -> None:
    """The normal arm of --compare vm,sev-snp runs here for real: OVMF.fd with -bios, the
    study's SNP CPU model, a virtio console (hvc0) and the dev guest; the kernel phase comes
    from the guest's uptime, since hvc0 shows the kernel's first line late."""
    import shutil
    import tempfile

    from host_daemon.firmware import check_firmware
    from tests.host_daemon.test_lifecycle import Daemon
    from workloads.runner import free_port

    if not check_firmware(FIRMWARE, "sev-snp").fits or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs Debian's ovmf (scripts/setup.sh installs it) and QEMU")
    short = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))  # unix socket paths are short
    daemon = Daemon(short / "s", short / "h.sock")
    (short / "s").mkdir()
    daemon.start()
    try:
        target = pair(BuiltinTarget("vm"), BuiltinTarget("sev-snp"))[0]
        (short / "spec.toml").write_text(target.spec_toml({8080: free_port()}, FIRMWARE))
        assert daemon.cvmctl("vm", "create", "-f", str(short / "spec.toml")).returncode == 0
        started = daemon.cvmctl("vm", "start", target.vm_name, timeout=300)
        assert started.returncode == 0, started.stderr
        vm = daemon.vm(target.vm_name)
        assert vm["state"] == "running", vm
        argv = vm["qemu_argv"]
        assert "-bios" in argv and str(FIRMWARE) in argv and "virtconsole,bus=vcon0.0,chardev=serial0" in argv
        assert any(a.startswith("EPYC-v4,host-phys-bits=true,+avx512f") for a in argv)
        phases = {p["name"]: p["seconds"] for p in vm["boot_phases"]}
        # hvc0 shows no early kernel line: firmware and kernel come from the guest's uptime,
        # unless a loaded TCG guest's clock disagrees with the host's (then not guessed)
        assert {"daemon", "spawn", "userspace"} <= set(phases) and all(v > 0 for v in phases.values())
        if not {"firmware", "kernel"} <= set(phases):  # then the daemon said why, and recorded neither
            assert not {"firmware", "kernel"} & set(phases), phases
            assert "boot_phases_unmeasured" in (short / "hostd.log").read_text()
        console = Path(vm["console_path"]).read_text(errors="replace")
        assert "cvm-boot: agent-exec" in console
    finally:
        daemon.cvmctl("vm", "kill", target.vm_name)
        daemon.stop()
        shutil.rmtree(short, ignore_errors=True)
