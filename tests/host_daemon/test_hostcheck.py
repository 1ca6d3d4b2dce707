"""``cvmctl host check``: the facts read from host trees, the verdict per TEE, the CLI."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from cvmctl.cli.main import main
from host_daemon.hostcheck import (
    QemuCaps,
    evaluate,
    find_qgs,
    gather,
    parse_object_help,
    parse_qemu_version,
    parse_qgs_config,
    parse_sev_status,
    probe_qemu,
)

HOSTROOTS = Path(__file__).resolve().parent.parent / "fixtures" / "hostroots"
QEMU_10_0 = QemuCaps(
    "qemu-system-x86_64",
    found=True,
    version=(10, 0, 2),
    version_text="QEMU emulator version 10.0.2",
    object_types=frozenset({"sev-guest", "sev-snp-guest", "memory-backend-memfd", "iothread"}),
)
QEMU_10_1 = QemuCaps(
    "qemu-system-x86_64",
    found=True,
    version=(10, 1, 0),
    version_text="QEMU emulator version 10.1.0",
    object_types=QEMU_10_0.object_types | {"tdx-guest"},
)


def tree(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(HOSTROOTS / name, root)
    return root


def firmware_image(path: Path, *, sev: bool, tdx: bool) -> None:
    """A 64 KiB image whose OVMF footer table carries SEV and/or TDX metadata entries."""
    size = 64 * 1024
    image = bytearray(size)
    entries = b""

    def guid(text: str) -> bytes:
        import uuid

        return uuid.UUID(text).bytes_le

    if sev:
        header = size - 0x2000
        struct.pack_into("<4sIII", image, header, b"ASEV", 16, 1, 0)
        entries += (
            struct.pack("<I", size - header)
            + struct.pack("<H", 22)
            + guid("dc886566-984a-4798-a75e-5585a7bf67cc")
        )
    if tdx:
        header = size - 0x3000
        struct.pack_into("<4sIII", image, header, b"TDVF", 16 + 32 * 2, 1, 2)  # two sections
        entries += (
            struct.pack("<I", size - header)
            + struct.pack("<H", 22)
            + guid("e47a6535-984a-4798-865e-4685a7bf8ec2")
        )
    footer = struct.pack("<H", len(entries) + 18) + guid("96b582de-1fb2-45f7-baea-a366c55a082d")
    table = entries + footer
    end = size - 32
    image[end - len(table) : end] = table
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(image))


def test_parsers() -> None:
    assert parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)") == (10, 0, 2)
    assert parse_qemu_version("nonsense") == ()
    help_text = "List of user creatable objects:\n  authz-list\n  sev-snp-guest\n  tdx-guest\n"
    assert parse_object_help(help_text) == {"authz-list", "sev-snp-guest", "tdx-guest"}
    assert parse_qgs_config("# comment\nport = 4050\nnumber_threads = 4\n") == 4050
    assert parse_qgs_config("port = 0\n") is None
    assert parse_qgs_config("number_threads = 4\n") is None
    status = struct.pack("<BBBIBI", 1, 55, 1, 0, 21, 3)
    assert parse_sev_status(status) == (1, 55, 21)


def test_this_machine_kind_runs_normal_vms_under_tcg_only(tmp_path: Path) -> None:
    """The recorded nested-KVM host: normal ready (TCG), SNP and TDX not, each reason named."""
    facts = gather(tree(tmp_path, "nested-kvm-6.18"), qemu=QEMU_10_0)
    normal = evaluate(facts, "normal")
    assert normal.ready and normal.accel == "tcg"
    kvm = next(c for c in normal.checks if c.name == "kvm")
    assert kvm.status == "warn" and "neither vmx nor svm" in kvm.detail
    snp = evaluate(facts, "sev-snp")
    assert not snp.ready
    missing = {c.name for c in snp.missing()}
    assert {"cpu", "kvm", "kvm_amd.sev_snp", "/dev/sev", "firmware OVMF (SNP-capable)"} <= missing
    assert "qemu sev-snp-guest" not in missing  # QEMU 10.0 knows it
    tdx = evaluate(facts, "tdx")
    assert {"cpu", "kvm", "kvm_intel.tdx", "qemu tdx-guest", "firmware TDVF"} <= {
        c.name for c in tdx.missing()
    }
    assert next(c for c in tdx.checks if c.name == "quote generation service").status == "warn"
    qemu = next(c for c in tdx.checks if c.name == "qemu tdx-guest")
    assert (
        qemu.detail == "QEMU 10.0.2 does not know -object tdx-guest"
        and qemu.remedy == "use QEMU 10.1 or later"
    )
    assert "sev_snp" in snp.reasons() and snp.reasons().startswith("this host cannot run a sev-snp guest")


def test_snp_host_is_ready_and_each_requirement_counts(tmp_path: Path) -> None:
    root = tree(tmp_path, "snp-host")
    firmware_image(root / "usr/share/ovmf/OVMF.fd", sev=True, tdx=True)
    report = evaluate(gather(root, qemu=QEMU_10_0), "sev-snp")
    assert report.ready, report.reasons()
    assert report.accel == "kvm"
    by_name = {c.name: c for c in report.checks}
    assert by_name["firmware OVMF (SNP-capable)"].detail == "/usr/share/ovmf/OVMF.fd"
    # the firmware version cannot be read from a test tree: a warning, not a blocker
    assert by_name["snp firmware"].status == "warn"

    (root / "sys/module/kvm_amd/parameters/sev_snp").write_text("N\n")
    off = evaluate(gather(root, qemu=QEMU_10_0), "sev-snp")
    assert [c.name for c in off.missing()] == ["kvm_amd.sev_snp"]
    assert "add kvm_amd.sev_snp=1" in off.missing()[0].remedy

    (root / "sys/module/kvm_amd/parameters/sev_snp").write_text("Y\n")
    (root / "dev/sev").unlink()
    no_dev = evaluate(gather(root, qemu=QEMU_10_0), "sev-snp")
    assert [c.name for c in no_dev.missing()] == ["/dev/sev"]

    old_qemu = QemuCaps("qemu", True, (8, 2, 0), "QEMU emulator version 8.2.0", frozenset({"sev-guest"}))
    (root / "dev/sev").write_text("")
    old = evaluate(gather(root, qemu=old_qemu), "sev-snp")
    assert [c.name for c in old.missing()] == ["qemu sev-snp-guest"]
    assert old.missing()[0].remedy == "use QEMU 9.1 or later"


def test_snp_firmware_too_old_is_missing(tmp_path: Path) -> None:
    root = tree(tmp_path, "snp-host")
    firmware_image(root / "usr/share/ovmf/OVMF.fd", sev=True, tdx=False)
    facts = gather(root, qemu=QEMU_10_0)
    import dataclasses

    old = evaluate(dataclasses.replace(facts, snp_firmware=(1, 49, 3)), "sev-snp")
    assert [c.name for c in old.missing()] == ["snp firmware"]
    new = evaluate(dataclasses.replace(facts, snp_firmware=(1, 55, 21)), "sev-snp")
    assert new.ready


def test_tdx_host_needs_qemu_10_1_and_finds_the_quote_service(tmp_path: Path) -> None:
    root = tree(tmp_path, "tdx-host")
    firmware_image(root / "usr/share/ovmf/OVMF.fd", sev=True, tdx=True)
    assert [c.name for c in evaluate(gather(root, qemu=QEMU_10_0), "tdx").missing()] == ["qemu tdx-guest"]
    report = evaluate(gather(root, qemu=QEMU_10_1), "tdx")
    assert report.ready, report.reasons()
    qgs = next(c for c in report.checks if c.name == "quote generation service")
    assert "vsock 2:4050" in qgs.detail


def test_qgs_unix_socket_wins_over_the_config(tmp_path: Path) -> None:
    root = tree(tmp_path, "tdx-host")
    sock_path = root / "var/run/tdx-qgs/qgs.socket"
    sock_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        address, how = find_qgs(root)
    assert address is not None and address.kind == "unix" and address.path == "/var/run/tdx-qgs/qgs.socket"
    assert "unix socket" in how
    (root / "etc/qgs.conf").write_text("port = 0\n")
    sock_path.unlink()
    assert find_qgs(root)[0] is None


def test_the_real_qemu_is_asked() -> None:
    """The QEMU installed here answers; its object list decides, not its version."""
    caps = probe_qemu()
    if not caps.found:
        pytest.skip("no qemu-system-x86_64")
    assert caps.version >= (10, 0)
    assert "sev-snp-guest" in caps.object_types
    assert ("tdx-guest" in caps.object_types) == (caps.version >= (10, 1))
    assert probe_qemu("/nonexistent/qemu").error == "not installed"


def test_cli_json_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """On this machine: normal ready, SEV-SNP and TDX not; exit 0 / 1 / 2."""
    assert main(["host", "check", "--json"]) in (0, 1)
    reports = {r["tee"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(reports) == {"normal", "sev-snp", "tdx"}
    for tee in ("sev-snp", "tdx"):
        if not reports[tee]["ready"]:
            assert any(c["status"] == "missing" and c.get("remedy") for c in reports[tee]["checks"])
    assert main(["host", "check", "--tee", "normal"]) == (0 if reports["normal"]["ready"] else 1)
    out = capsys.readouterr().out
    assert out.startswith("normal: ")
    if not reports["sev-snp"]["ready"]:
        assert main(["host", "check", "--tee", "sev-snp"]) == 1
        assert "missing" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        main(["host", "check", "--tee", "sgx"])
    assert bad.value.code == 2


def test_cli_as_a_program() -> None:
    """The installed program prints one line per requirement and no traceback."""
    done = subprocess.run(
        [
            str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "cvmctl"),
            "host",
            "check",
            "--tee",
            "tdx",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith("tdx: ")
