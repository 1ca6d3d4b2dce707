"""A VM this host cannot run is refused at start, with the host check's words, before QEMU."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cvm.v1 import host_pb2, host_pb2_grpc
from cvmcore.client import RpcClient
from cvmcore.errors import HostNotReady
from cvmctl.cli.main import main
from host_daemon.hostcheck import HostFacts, gather
from host_daemon.preflight import needs_facts, preflight
from host_daemon.spec import parse_spec
from host_daemon.vms import VMManager
from tests.host_daemon.test_daemon_api import serve_daemon
from tests.host_daemon.test_hostcheck import HOSTROOTS, QEMU_10_0, QEMU_10_1, firmware_image

SNP_SPEC = """\
name = "snp"
tee = "sev-snp"
[boot]
firmware = "{firmware}"
"""


def facts_of(tmp_path: Path, name: str, qemu: object = QEMU_10_0) -> HostFacts:
    root = tmp_path / name
    shutil.copytree(HOSTROOTS / name, root)
    firmware_image(root / "usr/share/ovmf/OVMF.fd", sev=True, tdx=True)
    return gather(root, qemu=qemu)  # type: ignore[arg-type]


def test_plain_vm_needs_no_host_facts() -> None:
    spec = parse_spec('name = "a"\n')
    assert not needs_facts(spec)
    assert preflight(spec, None).qgs is None


def test_snp_on_this_machine_kind_is_refused_with_every_reason(tmp_path: Path) -> None:
    firmware = tmp_path / "OVMF.fd"
    firmware_image(firmware, sev=True, tdx=False)
    spec = parse_spec(SNP_SPEC.format(firmware=firmware))
    with pytest.raises(HostNotReady) as refused:
        preflight(spec, facts_of(tmp_path, "nested-kvm-6.18"))
    text = str(refused.value)
    assert text.startswith("VM 'snp': this host cannot run a sev-snp guest: ")
    for name in ("cpu:", "kvm:", "kvm_amd.sev_snp:", "/dev/sev:"):
        assert name in text
    assert "firmware OVMF" not in text  # the spec's own image fits
    assert refused.value.exit_code == 5


def test_the_specs_own_firmware_is_checked(tmp_path: Path) -> None:
    firmware = tmp_path / "OVMF_CODE_4M.fd"  # the CODE half of a pflash pair
    firmware_image(firmware, sev=True, tdx=False)
    spec = parse_spec(SNP_SPEC.format(firmware=firmware))
    with pytest.raises(HostNotReady, match=r"firmware OVMF \(SNP-capable\): .*CODE half"):
        preflight(spec, facts_of(tmp_path, "snp-host"))
    good = tmp_path / "OVMF.fd"
    firmware_image(good, sev=True, tdx=False)
    assert (
        preflight(parse_spec(SNP_SPEC.format(firmware=good)), facts_of(tmp_path / "2", "snp-host")).qgs
        is None
    )


def test_tdx_gets_the_quote_service_the_check_found(tmp_path: Path) -> None:
    firmware = tmp_path / "OVMF.fd"
    firmware_image(firmware, sev=True, tdx=True)
    spec = parse_spec(f'name = "td"\ntee = "tdx"\n[boot]\nfirmware = "{firmware}"\n')
    facts = facts_of(tmp_path, "tdx-host", QEMU_10_1)
    grant = preflight(spec, facts)
    assert grant.qgs is not None and (grant.qgs.kind, grant.qgs.cid, grant.qgs.port) == ("vsock", 2, 4050)
    (tmp_path / "tdx-host/etc/qgs.conf").unlink()
    assert preflight(spec, gather(tmp_path / "tdx-host", qemu=QEMU_10_1)).qgs is None  # runs, no quotes
    opted_out = parse_spec(
        f'name = "td"\ntee = "tdx"\n[boot]\nfirmware = "{firmware}"\n'
        '[tdx]\nquote_generation_socket = "none"\n'
    )
    assert preflight(opted_out, gather(tmp_path / "tdx-host", qemu=QEMU_10_1)).qgs is None


def test_a_baseline_checks_its_firmware_and_numactl(tmp_path: Path) -> None:
    amdsev = tmp_path / "OVMF.amdsev.fd"
    firmware_image(amdsev, sev=True, tdx=False)
    spec = parse_spec(f'name = "b"\nbaseline_for = "sev-snp"\n[boot]\nfirmware = "{amdsev}"\n')
    assert needs_facts(spec)
    with pytest.raises(HostNotReady, match="AmdSev build"):
        preflight(spec, None)
    numa = parse_spec('name = "n"\n[pinning]\nnuma_node = 0\n')
    with pytest.raises(HostNotReady, match="numactl"):
        preflight(numa, None, which=lambda _: None)
    assert preflight(numa, None, which=lambda _: "/usr/bin/numactl").numactl == "/usr/bin/numactl"


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[RpcClient, host_pb2_grpc.HostDaemonStub, Path]]:
    nested = facts_of(tmp_path, "nested-kvm-6.18")
    manager = VMManager(tmp_path / "state", host_facts=lambda _qemu: nested)
    async with serve_daemon(manager, tmp_path / "h.sock") as (client, stub):
        yield client, stub, tmp_path


async def test_start_is_refused_over_grpc_as_host_not_ready(
    daemon: tuple[RpcClient, host_pb2_grpc.HostDaemonStub, Path],
) -> None:
    """The error class survives the trip (trailing metadata): the CLI can exit 5."""
    client, stub, tmp_path = daemon
    firmware = tmp_path / "OVMF.fd"
    firmware_image(firmware, sev=True, tdx=False)
    await client.call(stub.CreateVM, host_pb2.CreateVMRequest(spec_toml=SNP_SPEC.format(firmware=firmware)))
    started = time.monotonic()
    with pytest.raises(
        HostNotReady, match="this host cannot run a sev-snp guest: cpu: /proc/cpuinfo has no sev_snp"
    ):
        await client.call(stub.StartVM, host_pb2.VMRef(name="snp"))
    assert time.monotonic() - started < 5
    vm = await client.call(stub.GetVM, host_pb2.VMRef(name="snp"))
    assert vm.state == host_pb2.VM_STATE_DEFINED and not vm.qemu_pid  # QEMU never ran


async def test_cli_vm_start_exits_5(
    daemon: tuple[RpcClient, host_pb2_grpc.HostDaemonStub, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    client, stub, tmp_path = daemon
    firmware = tmp_path / "OVMF.fd"
    firmware_image(firmware, sev=True, tdx=False)
    await client.call(stub.CreateVM, host_pb2.CreateVMRequest(spec_toml=SNP_SPEC.format(firmware=firmware)))
    code = await trio.to_thread.run_sync(
        main, ["vm", "start", "snp", "--host", f"unix://{tmp_path / 'h.sock'}"]
    )
    assert code == 5
    err = capsys.readouterr().err
    assert "this host cannot run a sev-snp guest" in err and "Traceback" not in err


def test_a_measured_snp_boot_and_its_own_baseline_image(tmp_path: Path) -> None:
    """AmdSev + kernel_hashes for the SNP arm, a plain OVMF (no SEV metadata) for its baseline."""
    from tests.host_daemon.test_firmware import amdsev_ovmf, tdx_only_ovmf

    amdsev, plain = tmp_path / "OVMF.amdsev.fd", tmp_path / "plain.fd"
    amdsev.write_bytes(amdsev_ovmf())
    plain.write_bytes(tdx_only_ovmf())
    measured = parse_spec(
        f'name = "m"\ntee = "sev-snp"\n[boot]\nfirmware = "{amdsev}"\nkernel = "/k"\n'
        "[sev_snp]\nkernel_hashes = true\n"
    )
    preflight(measured, facts_of(tmp_path, "snp-host"))
    baseline = parse_spec(f'name = "b"\nbaseline_for = "sev-snp"\n[boot]\nfirmware = "{plain}"\n')
    preflight(baseline, None)
    without_hashes = parse_spec(SNP_SPEC.format(firmware=amdsev))
    with pytest.raises(HostNotReady, match="kernel_hashes is off"):
        preflight(without_hashes, facts_of(tmp_path / "2", "snp-host"))


def test_a_firmware_path_not_everyone_may_read_is_refused_unread(tmp_path: Path) -> None:
    """The daemon reads as root: a private file's size or contents must not leak."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 700)
    secret.chmod(0o600)
    spec = parse_spec(SNP_SPEC.format(firmware=secret))
    with pytest.raises(HostNotReady) as refused:
        preflight(spec, facts_of(tmp_path, "snp-host"))
    assert "not readable by everyone" in str(refused.value) and "700" not in str(refused.value)
