"""What each workload needs, what each target offers, and the refusal before anything boots."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvm.v1 import host_pb2
from cvmctl import vm_target
from cvmctl.targets import BuiltinTarget
from cvmctl.vm_target import VMTarget, builtin_capabilities, spec_capabilities
from host_daemon.spec import parse_spec
from tests.workloads.conftest import cli
from workloads.capabilities import (
    CAPABILITIES,
    SCRATCH_DISK,
    Capabilities,
    WorkloadRefused,
    check,
    local_capabilities,
    refusal,
)
from workloads.catalogue import CATALOGUE, get
from workloads.runner import LocalTarget, RunRequest, params_for


@pytest.fixture
def user_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built-in targets on QEMU's user-mode network (no root for a tap, no passt installed)."""
    monkeypatch.setattr(vm_target, "builtin_network", lambda: "user")


#: The answer for the default target on the user-mode network (issue 15).
REFUSED_ON_VM = {"iperf-udp": "SLIRP", "ping": "SLIRP"}


def spec(network: str = 'mode = "user"', extra: str = "", image: str = 'image = "dev"') -> str:
    return f'name = "t"\n{image}\nvcpus = 2\nmemory = "1G"\n{extra}\n[network]\n{network}\n'


def test_every_need_is_a_known_capability() -> None:
    for workload in CATALOGUE.values():
        assert workload.needs <= set(CAPABILITIES), workload.name
    with pytest.raises(ValueError, match="unknown capability"):
        Capabilities({"telepathy": ""})


def test_local_runs_all_but_what_needs_a_vm() -> None:
    local = local_capabilities()
    refused = {name for name, w in CATALOGUE.items() if refusal(w, local) is not None}
    assert refused == {"boot", "attestation"}
    assert refusal(get("boot"), local) == (
        "boot is measured by the host daemon and the agent of a VM: use --target vm or vm:NAME (not local)"
    )


@pytest.mark.usefixtures("user_mode")
def test_the_dev_guest_today() -> None:
    caps = builtin_capabilities(BuiltinTarget("vm"))
    reasons = {name: refusal(w, caps) for name, w in CATALOGUE.items()}
    refused = {name: reason for name, reason in reasons.items() if reason is not None}
    assert set(refused) == set(REFUSED_ON_VM)
    for name, word in REFUSED_ON_VM.items():
        assert word in refused[name], refused[name]
    assert refused["ping"].startswith("ping needs ICMP echo from the host to the guest: target vm has")
    # every built-in target is the same guest, so the same answers
    for other in (BuiltinTarget("vm", ("swiotlb",)), BuiltinTarget("sev-snp", ("haltpoll",))):
        other_caps = builtin_capabilities(other)
        assert {n for n, w in CATALOGUE.items() if refusal(w, other_caps)} == set(REFUSED_ON_VM)


def test_network_modes() -> None:
    none = spec_capabilities(parse_spec(spec('mode = "none"')), "vm:t")
    assert {"nginx", "ping", "iperf-udp"} <= {n for n, w in CATALOGUE.items() if refusal(w, none)}
    assert "has no network" in str(refusal(get("nginx"), none))
    tap = spec_capabilities(parse_spec(spec('mode = "tap"\nifname = "tap0"')), "vm:t")
    assert all(refusal(get(name), tap) is None for name in ("ping", "iperf-udp", "nginx"))


def test_scratch_disk() -> None:
    """A [[disk]] root offers /var/tmp; the dev guest's [scratch] disk, which its /init mounts."""
    own_image = spec(image="", extra='[boot]\nkernel = "/k"\n\n[[disk]]\npath = "/dev/null"\n')
    assert spec_capabilities(parse_spec(own_image), "vm:t").offered[SCRATCH_DISK] == "/var/tmp"
    bare = spec_capabilities(parse_spec(spec()), "vm")
    assert "in-memory overlay" in bare.lacking[SCRATCH_DISK]
    caps = spec_capabilities(parse_spec(spec(extra='[scratch]\nsize = "2G"\n')), "vm")
    assert caps.offered[SCRATCH_DISK] == "/scratch"
    request = RunRequest(get("fio"), get("fio").validate({}), {"": LocalTarget()})
    fio = get("fio")
    assert fio.for_target(request.params, caps, frozenset())["filename"] == "/scratch/cvmctl-fio.scratch"
    explicit = {**request.params, "filename": "/tmp/mine"}
    assert fio.for_target(explicit, caps, frozenset({"filename"}))["filename"] == "/tmp/mine"


def test_local_target_keeps_fios_default() -> None:
    request = RunRequest(get("fio"), get("fio").validate({}), {"": LocalTarget()})
    assert params_for(request, LocalTarget())["filename"] == "/var/tmp/cvmctl-fio.scratch"


@pytest.mark.usefixtures("user_mode")
def test_check_raises_a_usage_error() -> None:
    with pytest.raises(WorkloadRefused, match="ping needs ICMP echo"):
        check(get("ping"), builtin_capabilities(BuiltinTarget("vm")))
    assert WorkloadRefused.exit_code == 2


@pytest.mark.usefixtures("user_mode")
def test_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No daemon is started, no VM booted, no run stored: one line with the reason, exit 2."""
    monkeypatch.setenv("CVM_HOSTD", f"unix://{tmp_path}/none.sock")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("CVMCTL_DATA_DIR", str(tmp_path / "data"))
    for name, word in REFUSED_ON_VM.items():
        assert cli("bench", name, "--duration", "1") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0] and err[0].startswith(f"cvmctl: error: {name} needs")
    assert cli("bench", "ping", "--compare", "local,vm") == 2
    assert "target vm has QEMU user-mode networking" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_vm_by_name_is_checked_against_its_spec_before_booting() -> None:
    target = VMTarget("mine")
    # before the daemon is asked nothing is refused: the spec decides, before the VM boots
    assert all(refusal(w, target.capabilities()) is None for w in CATALOGUE.values())
    target.expect(get("ping"), get("ping").validate({}))
    vm = host_pb2.VM(name="mine", spec_toml=spec(image="", extra='[boot]\nkernel = "/k"\n'))
    with pytest.raises(WorkloadRefused, match="SLIRP"):
        target._refuse_unrunnable(vm)
    # a server port the VM does not forward
    target.expect(get("nginx"), get("nginx").validate({"port": "9000"}))
    with pytest.raises(WorkloadRefused, match="guest port 9000, which VM mine does not forward"):
        target._refuse_unrunnable(vm)
    forwarded = spec(
        'mode = "user"\nforwards = [{ host_port = 40000, guest_port = 9000 }]',
        image="",
        extra='[boot]\nkernel = "/k"\n',
    )
    target._refuse_unrunnable(host_pb2.VM(name="mine", spec_toml=forwarded))


@pytest.mark.usefixtures("user_mode")
def test_list_says_where_each_workload_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("bench", "--list") == 0
    out = capsys.readouterr().out
    blocks = {block.split("  (")[0]: block for block in out.split("\n\n") if "  (" in block}
    assert "    runs on: local, vm\n" in blocks["nginx"]
    assert "    runs on: local\n    not on vm: ping needs ICMP echo" in blocks["ping"]
    assert "    runs on: vm\n    not on local: boot is measured" in blocks["boot"]
    assert "    runs on: local, vm\n" in blocks["fio"]  # on the dev guest's scratch disk


def test_the_dev_guest_on_the_tap_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, built-in targets get a tap in a namespace: ping and UDP run there too."""
    monkeypatch.setattr(vm_target, "builtin_network", lambda: "tap")
    caps = builtin_capabilities(BuiltinTarget("vm"))
    assert all(
        refusal(w, caps) is None for name, w in CATALOGUE.items() if name not in ("boot", "attestation")
    )
    assert 'mode = "tap"' in BuiltinTarget("vm").spec_toml(None)


def test_the_dev_guest_on_passt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without root but with passt, built-in targets get passt: UDP runs (each server port is
    forwarded for TCP and UDP from one host port), ping is refused up front with the reason."""
    monkeypatch.setattr(vm_target, "builtin_network", lambda: "passt")
    caps = builtin_capabilities(BuiltinTarget("vm"))
    refused = {
        name: reason
        for name, w in CATALOGUE.items()
        if name not in ("boot", "attestation") and (reason := refusal(w, caps)) is not None
    }
    assert list(refused) == ["ping"]
    assert "passt" in refused["ping"] and "no ICMP echo from the host to the guest" in refused["ping"]
    toml = BuiltinTarget("vm").spec_toml({7175: 40001}, passt=True)
    assert 'mode = "passt"' in toml
    assert '{ host_port = 40001, guest_port = 7175, proto = "udp" }' in toml


def test_a_passt_vm_without_the_udp_forward_is_refused_iperf_udp() -> None:
    """iperf3 -u sends its datagrams to the control port's number: a passt VM that forwards
    only TCP is refused before the run, with the forward to add."""
    from host_daemon.spec import parse_spec

    tcp_only = 'mode = "passt"\nforwards = [{ host_port = 40000, guest_port = 7175 }]'
    vm = parse_spec(spec(tcp_only))
    reason = vm_target._unforwarded(get("iperf-udp"), 7175, vm, "t")
    assert reason is not None and 'proto = "udp"' in reason
    assert vm_target._unforwarded(get("iperf-tcp"), 7175, vm, "t") is None
