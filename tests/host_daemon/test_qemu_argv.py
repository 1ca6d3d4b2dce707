"""The QEMU command line: golden files per case, rules of the builder, and the real QEMU.

Golden files (in the spirit of libvirt's ``.args`` fixtures): each ``golden/<case>.toml`` is
a spec and ``golden/<case>.args`` the argv it must produce, one argument per line. After an
intended change, rewrite them with ``CVM_UPDATE_GOLDEN=1 pytest tests/host_daemon`` and
review the diff.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from host_daemon.accel import ResolvedChannel
from host_daemon.qemu_args import (
    RESTRICTED_VIRTIO,
    SNP_CPU_MODEL,
    ArgvError,
    Runtime,
    ScratchDrive,
    build_qemu_argv,
    format_argv,
    kernel_cmdline,
    opt_value,
)
from host_daemon.qmp import ConnectError as QMPConnectError
from host_daemon.qmp import Disconnected, open_qmp
from host_daemon.scratch import SCRATCH_FILE, create_scratch, resolve_io
from host_daemon.spec import SCRATCH_SERIAL, GuestKnobs, QgsAddress, VMSpec, load_spec, parse_spec

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.toml"))
QEMU = shutil.which("qemu-system-x86_64")


GOLDEN_QGS = QgsAddress("vsock", cid=2, port=4050)
"""The quote generation service the golden host has: Intel DCAP's shipped qgs.conf (port 4050)."""


def golden_runtime(spec: VMSpec) -> Runtime:
    """The paths a daemon with state dir /run/cvmctl would choose for this VM's first boot,
    on a file system where O_DIRECT works (the scratch disk's ``auto`` modes resolved so)."""
    vm_dir = Path("/run/cvmctl/vms") / spec.name
    scratch = None
    if spec.scratch is not None:
        aio, cache = resolve_io(spec.scratch, direct_io=True)
        scratch = ScratchDrive(vm_dir / SCRATCH_FILE, aio, cache)
    return Runtime(
        accel="tcg" if spec.accel == "tcg" else "kvm",
        qmp_socket=vm_dir / "qmp.sock",
        pidfile=vm_dir / "qemu.pid",
        serial_log=vm_dir / "boot-1" / "console.log",
        agent_socket=vm_dir / "agent.sock",
        guest_cid=3,
        qgs=GOLDEN_QGS,
        scratch=scratch,
        vhost_net=True,
        passt_socket=vm_dir / "passt.sock" if spec.network.mode == "passt" else None,
    )


GOLDEN_CASES = {
    "normal-tcg-devguest",
    "sev-snp",
    "sev-snp-baseline",
    "tdx",
    "tdx-baseline",
    "forced-swiotlb",
    "haltpoll",
    "idle-poll",
    "sev-snp-haltpoll",
    "sev-snp-idle-poll",
    "vhost-user-vsock",
    "scratch-devguest",
    "sev-snp-scratch",
    "tap-devguest",
    "passt-devguest",
}
"""The cases issue 11 asks for: normal, both CVMs and their baselines, and each ablation; and
issue 15's scratch disk on a normal VM and on a CVM, its tap network path and its rootless
passt one."""


def test_every_case_has_both_files() -> None:
    assert {p.stem for p in GOLDEN.glob("*.args")} == set(CASES)
    assert set(CASES) >= GOLDEN_CASES


@pytest.mark.parametrize("case", CASES)
def test_golden_args(case: str) -> None:
    spec = load_spec(GOLDEN / f"{case}.toml")
    got = format_argv(build_qemu_argv(spec, golden_runtime(spec)))
    path = GOLDEN / f"{case}.args"
    if os.environ.get("CVM_UPDATE_GOLDEN") == "1":
        path.write_text(got)
    assert got == path.read_text(), f"argv for {case} changed; CVM_UPDATE_GOLDEN=1 rewrites the golden files"


def _argv(text: str, **runtime: Any) -> list[str]:
    spec = parse_spec(text)
    return build_qemu_argv(spec, dataclasses.replace(golden_runtime(spec), **runtime))


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_minimal_spec_is_a_complete_command_line() -> None:
    argv = _argv('name = "x"', agent_channel="none")
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert "-daemonize" not in argv
    assert _after(argv, "-display") == ["none"]
    assert _after(argv, "-machine") == ["q35,memory-backend=ram1"]
    assert _after(argv, "-object") == ["memory-backend-ram,id=ram1,size=512M,prealloc=off"]
    assert _after(argv, "-qmp") == ["unix:/run/cvmctl/vms/x/qmp.sock,server=on,wait=off"]
    assert _after(argv, "-pidfile") == ["/run/cvmctl/vms/x/qemu.pid"]
    assert _after(argv, "-serial") == ["chardev:serial0"]
    assert "-kernel" not in argv
    assert _after(argv, "-device") == ["pvpanic-pci"]  # only the panic device
    assert _after(argv, "-accel") == ["kvm"]


def test_tcg_gives_each_vcpu_a_thread() -> None:
    assert _after(_argv('name = "x"', agent_channel="none", accel="tcg"), "-accel") == ["tcg,thread=multi"]


def test_cpu_model_follows_accel_and_platform() -> None:
    assert _after(_argv('name = "x"', agent_channel="none", accel="tcg"), "-cpu") == ["max"]
    assert _after(_argv('name = "x"', agent_channel="none"), "-cpu") == ["host"]
    tdx_base = 'name = "x"\nbaseline_for = "tdx"'
    assert _after(_argv(tdx_base, agent_channel="none"), "-cpu") == ["host,pmu=off"]
    assert _after(_argv(tdx_base, agent_channel="none", accel="tcg"), "-cpu") == ["max,pmu=off"]
    assert _after(_argv('name = "x"\ncpu = "EPYC-v4,+avx512f"', agent_channel="none"), "-cpu") == [
        "EPYC-v4,+avx512f"
    ]


def test_snp_pair_runs_one_cpu_model() -> None:
    """The SNP guest and its baseline differ in SEV only: the study's EPYC-v4 + AVX-512 on both."""
    snp = _argv('name = "x"\ntee = "sev-snp"\n[boot]\nfirmware = "/fw"', agent_channel="none")
    base = _argv('name = "x"\nbaseline_for = "sev-snp"', agent_channel="none")
    assert _after(snp, "-cpu") == _after(base, "-cpu") == [SNP_CPU_MODEL]
    assert SNP_CPU_MODEL.startswith("EPYC-v4,host-phys-bits=true,+avx512f,")
    assert SNP_CPU_MODEL.count("+avx512") == 10


def test_kernel_hashes_only_when_asked_for() -> None:
    base = 'name = "x"\ntee = "sev-snp"\n[boot]\nfirmware = "/fw"\nkernel = "/k"\n'
    snp = _after(_argv(base, agent_channel="none"), "-object")[1]
    assert snp == "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000"
    on = _after(_argv(base + "[sev_snp]\nkernel_hashes = true", agent_channel="none"), "-object")[1]
    assert on.endswith(",kernel-hashes=on")


@pytest.mark.parametrize("flavour", ["sev-snp", "tdx"])
def test_a_baseline_loads_its_firmware_like_its_cvm(flavour: str) -> None:
    cvm = _argv(
        f'name = "x"\ntee = "{flavour}"\n[boot]\nfirmware = "/fw/OVMF.fd"\n[tdx]\n'.replace(
            "[tdx]\n", "" if flavour == "sev-snp" else "[tdx]\n"
        ),
        agent_channel="none",
    )
    base = _argv(
        f'name = "x"\nbaseline_for = "{flavour}"\n[boot]\nfirmware = "/fw/OVMF.fd"', agent_channel="none"
    )
    assert _after(cvm, "-bios") == _after(base, "-bios") == ["/fw/OVMF.fd"]
    assert "-drive" not in base and "-pflash" not in base


def test_cvm_flavours_get_a_virtio_console() -> None:
    """hvc0 on a virtconsole instead of the 8250 for CVMs and their baselines (docs/study.md)."""
    snp = _argv('name = "x"\ntee = "sev-snp"\n[boot]\nfirmware = "/fw"\nkernel = "/k"', agent_channel="none")
    assert _after(snp, "-serial") == ["none"]
    assert _after(snp, "-chardev") == ["file,id=serial0,path=/run/cvmctl/vms/x/boot-1/console.log"]
    assert _after(snp, "-device")[:2] == [
        f"virtio-serial-pci,id=vcon0,{RESTRICTED_VIRTIO}",
        "virtconsole,bus=vcon0.0,chardev=serial0",
    ]
    assert _after(snp, "-append") == ["console=hvc0"]
    base = _argv('name = "x"\nbaseline_for = "sev-snp"\n[boot]\nkernel = "/k"', agent_channel="none")
    assert _after(base, "-device")[:2] == [
        "virtio-serial-pci,id=vcon0",
        "virtconsole,bus=vcon0.0,chardev=serial0",
    ]
    assert _after(base, "-append") == ["console=hvc0"]
    serial = _argv('name = "x"\nbaseline_for = "tdx"\nconsole = "serial"', agent_channel="none")
    assert _after(serial, "-serial") == ["chardev:serial0"]
    virtio = _argv('name = "x"\nconsole = "virtio"', agent_channel="none")
    assert _after(virtio, "-serial") == ["none"]


def test_numa_node_binds_the_whole_qemu_process() -> None:
    """numactl in front of QEMU, for every flavour; the backend keeps host-nodes for shared memory."""
    for text in ('name = "x"', 'name = "x"\ntee = "sev-snp"\n[boot]\nfirmware = "/fw"'):
        argv = _argv(text + "\n[pinning]\nnuma_node = 1", agent_channel="none", numactl="/usr/bin/numactl")
        assert argv[:5] == ["/usr/bin/numactl", "--membind=1", "--cpunodebind=1", "--", "qemu-system-x86_64"]
        assert _after(argv, "-object")[0].endswith(",host-nodes=1,policy=bind")
    assert _argv('name = "x"', agent_channel="none")[0] == "qemu-system-x86_64"


def test_commas_in_paths_are_doubled_in_option_values() -> None:
    assert opt_value("/a,b/c") == "/a,,b/c"
    argv = _argv('name = "x"\n[[share]]\npath = "/srv/a,b"\ntag = "t"', agent_channel="none")
    assert _after(argv, "-fsdev") == ["local,id=fs0,path=/srv/a,,b,security_model=none,readonly=on"]
    argv = _argv('name = "x"\n[boot]\nkernel = "/k,1"', agent_channel="none")
    assert _after(argv, "-kernel") == ["/k,1"]  # a plain-string option: not escaped


def test_kernel_cmdline_knobs() -> None:
    base = 'name = "x"\n[boot]\nkernel = "/k"\n'
    assert kernel_cmdline(parse_spec(base)) == "console=ttyS0"
    assert kernel_cmdline(parse_spec(base.replace("\n", '\nconsole = "virtio"\n', 1))) == "console=hvc0"
    spec = parse_spec(base + "[guest]\nswiotlb_force = 524288\nhaltpoll = true\n")
    assert kernel_cmdline(spec) == "console=ttyS0 swiotlb=524288,force cpuidle_haltpoll.force=Y"
    assert kernel_cmdline(parse_spec(base + "[guest]\nidle_poll = true\n")) == "console=ttyS0 idle=poll"


def test_forced_swiotlb_restricts_every_virtio_device() -> None:
    text = """name = "x"
[boot]
kernel = "/k"
[guest]
swiotlb_force = 1024
[network]
mode = "user"
[[disk]]
path = "/d.img"
[[share]]
path = "/"
tag = "root"
"""
    devices = _after(_argv(text, agent_channel="virtio-serial"), "-device")
    virtio = [d for d in devices if d.startswith("virtio-") or d.startswith("vhost-")]
    assert len(virtio) == 4
    assert all(d.endswith(RESTRICTED_VIRTIO) for d in virtio)
    plain = _after(
        _argv(text.replace("[guest]\nswiotlb_force = 1024\n", ""), agent_channel="none"), "-device"
    )
    assert not any(RESTRICTED_VIRTIO in d for d in plain)


@pytest.mark.parametrize(
    ("text", "channel", "backend"),
    [
        ('name = "x"', "none", "memory-backend-ram,id=ram1,size=512M,prealloc=off"),
        ('name = "x"', "vhost-user-vsock", "memory-backend-memfd,id=ram1,size=512M,share=on,prealloc=off"),
        (
            'name = "x"\nmemory_backend = "file"\nmemory_path = "/dev/hugepages"\nprealloc = true',
            "none",
            "memory-backend-file,id=ram1,size=512M,mem-path=/dev/hugepages,share=on,prealloc=on",
        ),
        (
            'name = "x"\n[pinning]\nnuma_node = 1',
            "none",
            "memory-backend-ram,id=ram1,size=512M,prealloc=off,host-nodes=1,policy=bind",
        ),
    ],
)
def test_memory_backend(text: str, channel: ResolvedChannel, backend: str) -> None:
    assert _after(_argv(text, agent_channel=channel), "-object") == [backend]


def test_builder_refusals() -> None:
    snp = 'name = "x"\ntee = "sev-snp"\n[boot]\nfirmware = "/fw"'
    with pytest.raises(ArgvError, match="needs KVM"):
        _argv(snp, accel="tcg", agent_channel="none")
    with pytest.raises(ArgvError, match="resolved by the daemon"):
        _argv('name = "x"')
    with pytest.raises(ArgvError, match="guest CID"):
        _argv('name = "x"\n[agent]\nchannel = "vhost-vsock"', guest_cid=None)
    with pytest.raises(ArgvError, match="needs a socket path"):
        _argv('name = "x"\n[agent]\nchannel = "virtio-serial"', agent_socket=None)
    with pytest.raises(ArgvError, match="AF_UNIX"):
        _argv('name = "x"', agent_channel="none", qmp_socket=Path("/" + "q" * 120))
    with pytest.raises(ArgvError, match="cannot be shared"):
        _argv('name = "x"\nmemory_backend = "ram"', agent_channel="vhost-user-vsock")


def test_scratch_disk_argv() -> None:
    """The study's disk: raw, the daemon's file and modes, an iothread, the fixed serial."""
    text = 'name = "x"\n[scratch]\n'
    drive = ScratchDrive(Path("/run/cvmctl/vms/x/scratch.raw"), "native", "none")
    argv = _argv(text, agent_channel="none", scratch=drive)
    assert _after(argv, "-drive") == [
        "file=/run/cvmctl/vms/x/scratch.raw,if=none,id=scratch,format=raw,aio=native,cache=none"
    ]
    assert _after(argv, "-object")[-1] == "iothread,id=iothread-scratch"
    assert _after(argv, "-device")[-1] == (
        "virtio-blk-pci,drive=scratch,id=scratch0,serial=cvm-scratch,iothread=iothread-scratch"
    )
    # without O_DIRECT the daemon passes writeback + threads; without an iothread no object
    buffered = ScratchDrive(Path("/s,1/scratch.raw"), "threads", "writeback")
    argv = _argv(text + "iothread = false\n", agent_channel="none", scratch=buffered)
    assert _after(argv, "-drive") == [
        "file=/s,,1/scratch.raw,if=none,id=scratch,format=raw,aio=threads,cache=writeback"
    ]
    assert "iothread,id=iothread-scratch" not in argv
    assert _after(argv, "-device")[-1] == "virtio-blk-pci,drive=scratch,id=scratch0,serial=cvm-scratch"
    # after the user's disks, with the restricted-virtio flags where every device has them
    snp = 'name = "x"\ntee = "sev-snp"\n[boot]\nfirmware = "/fw"\n[[disk]]\npath = "/d"\n[scratch]\n'
    devices = _after(_argv(snp, agent_channel="none", scratch=drive), "-device")
    blk = [d for d in devices if d.startswith("virtio-blk-pci")]
    assert blk[0].startswith("virtio-blk-pci,drive=disk0") and blk[1].startswith(
        "virtio-blk-pci,drive=scratch,"
    )
    assert all(d.endswith(RESTRICTED_VIRTIO) for d in blk)
    # no [scratch]: nothing, whatever the runtime holds
    assert "-drive" not in _argv('name = "x"', agent_channel="none", scratch=drive)


def test_scratch_disk_refusals() -> None:
    with pytest.raises(ArgvError, match="daemon must create the scratch disk"):
        _argv('name = "x"\n[scratch]\n', agent_channel="none", scratch=None)
    writeback = ScratchDrive(Path("/s.raw"), "threads", "writeback")
    with pytest.raises(ArgvError, match=r"scratch\.cache: the spec asks for 'none'"):
        _argv(
            'name = "x"\n[scratch]\ncache = "none"\naio = "threads"', agent_channel="none", scratch=writeback
        )


def test_tdx_quote_generation_socket_forms() -> None:
    base = 'name = "x"\ntee = "tdx"\n[boot]\nfirmware = "/fw"\n[tdx]\n'
    none = _after(_argv(base + 'quote_generation_socket = "none"', agent_channel="none"), "-object")
    assert none[1] == "tdx-guest,id=tdx0"
    vsock = _after(_argv(base + 'quote_generation_socket = "vsock:2:4050"', agent_channel="none"), "-object")
    assert vsock[1] == (
        '{"qom-type":"tdx-guest","id":"tdx0","quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}'
    )
    unix = _after(
        _argv(base + 'quote_generation_socket = "/var/run/tdx-qgs/qgs.socket"', agent_channel="none"),
        "-object",
    )
    assert unix[1] == (
        '{"qom-type":"tdx-guest","id":"tdx0",'
        '"quote-generation-socket":{"type":"unix","path":"/var/run/tdx-qgs/qgs.socket"}}'
    )
    # "auto" (the default): what the daemon found; with none, a TD without quotes
    found = QgsAddress("unix", path="/run/qgs.sock")
    auto = _after(_argv(base, agent_channel="none", qgs=found), "-object")
    assert auto[1].endswith('"quote-generation-socket":{"type":"unix","path":"/run/qgs.sock"}}')
    assert _after(_argv(base, agent_channel="none", qgs=None), "-object")[1] == "tdx-guest,id=tdx0"


# --------------------------------------------------------------------------------------------
# Against the installed QEMU

OPTION_PARSE_ERRORS = re.compile(
    r"Parameter '|Invalid parameter|does not accept value|Property '.*' not found|invalid option"
    r"|unrecognized option|is not a valid|Invalid argument: |Expected '|could not load"
)
NEEDS_HARDWARE = re.compile(
    r"not supported by KVM|KVM required|/dev/sev|Could not access KVM kernel module|failed to initialize kvm"
    r"|sev_.*init|SEV",
    re.IGNORECASE,
)


def qemu_knows_object(qom_type: str) -> bool:
    assert QEMU is not None
    out = subprocess.run(
        [QEMU, "-object", f"{qom_type},help"], capture_output=True, text=True, timeout=30, check=False
    )
    return out.stdout.startswith(f"{qom_type} options")


def qemu_version() -> str:
    assert QEMU is not None
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


async def run_qemu(argv: list[str], deadline: float = 30.0) -> tuple[int | None, str]:
    """Run QEMU (stopped before the first instruction with -S); None = still running at the deadline."""
    with trio.move_on_after(deadline):
        done = await trio.run_process([*argv, "-S"], capture_stdout=True, capture_stderr=True, check=False)
        return done.returncode, done.stderr.decode(errors="replace")
    return None, ""


def _qemu_knowing(qom_type: str, since: str) -> str:
    """The QEMU binary if it knows ``qom_type``, else skip (from sync fixtures, so reasons show)."""
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/install-qemu.sh)")
    if not qemu_knows_object(qom_type):
        pytest.skip(f"{qemu_version()} does not know -object {qom_type} (QEMU >= {since} does)")
    return QEMU


async def qemu_status_after_init(argv: list[str], qmp_socket: Path, deadline: float = 60.0) -> str:
    """Start QEMU with -S and return its QMP run status.

    QEMU may greet from its monitor thread while still creating devices, but it runs commands
    only from its main loop, after every device was created: an answer proves the whole
    command line was accepted. An early exit fails the test with QEMU's stderr.
    """
    errors_file = qmp_socket.with_name("qemu.stderr")
    with errors_file.open("wb") as stderr, trio.fail_after(deadline):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(trio.run_process, [*argv, "-S"], check=False, stderr=stderr)
            )
            try:
                while process.returncode is None:
                    try:
                        # QEMU answers only once its devices are made: seconds on a loaded machine
                        async with open_qmp(qmp_socket, deadline=10) as qmp:
                            status = await qmp.execute("query-status", deadline=10)
                            return str(status["status"])
                    except (QMPConnectError, Disconnected):  # not listening yet, or gone
                        await trio.sleep(0.01)
            finally:
                process.kill()
    pytest.fail(f"QEMU exited ({process.returncode}):\n{errors_file.read_text()}")


@pytest.fixture
def qemu_with_snp() -> str:
    return _qemu_knowing("sev-snp-guest", "9.1")


@pytest.fixture
def qemu_with_tdx() -> str:
    return _qemu_knowing("tdx-guest", "10.1")


def _real_files_runtime(spec_text: str, tmp_path: Path) -> tuple[VMSpec, Runtime]:
    for name in ("OVMF.fd", "bzImage", "initrd.img"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
    spec_file = tmp_path / "vm.toml"
    spec_file.write_text(spec_text)
    spec = load_spec(spec_file)
    assert QEMU is not None
    runtime = Runtime(
        accel="kvm",
        qmp_socket=tmp_path / "qmp.sock",
        pidfile=tmp_path / "qemu.pid",
        serial_log=tmp_path / "console.log",
        qemu_binary=QEMU,
        guest_cid=3,
    )
    return spec, runtime


async def test_snp_command_line_is_accepted_by_qemu(tmp_path: Path, qemu_with_snp: str) -> None:
    text = (GOLDEN / "sev-snp.toml").read_text()
    text = re.sub(r'"/srv/cvm/(firmware|kernel)/([^"]+)"', lambda m: f'"{m.group(2)}"', text)
    text = text.replace('"/srv/cvm/images/root.qcow2"', '"root.img"').replace(
        'format = "qcow2"', 'format = "raw"'
    )
    text = text.replace('memory = "64G"', 'memory = "256M"').replace("prealloc = true", "prealloc = false")
    text = text.replace("vcpus = 8", "vcpus = 1").replace("host_cpus = [8, 9, 10, 11, 12, 13, 14, 15]", "")
    text = text.replace("numa_node = 0", "")  # numactl is checked on its own (it may be missing)
    text = text.replace('cmdline = "root=/dev/vda console=hvc0"', 'cmdline = "console=hvc0"')
    (tmp_path / "root.img").write_bytes(b"\0" * 65536)
    spec, runtime = _real_files_runtime(text, tmp_path)
    assert spec.tee == "sev-snp"
    argv = build_qemu_argv(spec, runtime)
    assert any(a.startswith("sev-snp-guest,") for a in argv)
    rc, stderr = await run_qemu(argv)
    print(f"{qemu_version()}: exit {rc}: {stderr.strip()}")
    if rc is None:
        return  # it started: this host has SEV-SNP, so everything parsed
    assert rc != 0
    assert not OPTION_PARSE_ERRORS.search(stderr), f"QEMU rejected the command line:\n{stderr}"
    assert NEEDS_HARDWARE.search(stderr), f"QEMU failed, but not for want of SEV-SNP hardware:\n{stderr}"


async def test_tdx_command_line_is_accepted_by_qemu(tmp_path: Path, qemu_with_tdx: str) -> None:
    text = """name = "td"
tee = "tdx"
memory = "256M"
[boot]
firmware = "OVMF.fd"
kernel = "bzImage"
[tdx]
quote_generation_socket = "/var/run/tdx-qgs/qgs.socket"
[agent]
channel = "none"
"""
    spec, runtime = _real_files_runtime(text, tmp_path)
    rc, stderr = await run_qemu(build_qemu_argv(spec, runtime))
    if rc is None:
        return
    assert not OPTION_PARSE_ERRORS.search(stderr), f"QEMU rejected the command line:\n{stderr}"
    assert re.search(r"TDX|KVM|kvm", stderr), f"QEMU failed, but not for want of TDX hardware:\n{stderr}"


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install-qemu.sh)")
async def test_normal_tcg_command_line_starts(tmp_path: Path) -> None:
    """The dev-guest-like argv (under TCG, every device but the vhost-user backend) starts and stays up."""
    text = (GOLDEN / "normal-tcg-devguest.toml").read_text()
    # No kernel (QEMU would load it before -S takes effect), no host port, a private share.
    text = re.sub(r"\[boot\][^\[]*", "", text)
    text = re.sub(r"forwards = .*", "", text)
    text = text.replace('path = "/"', f'path = "{tmp_path}"')
    spec, runtime = _real_files_runtime(text, tmp_path)
    runtime = dataclasses.replace(runtime, accel="tcg", agent_socket=tmp_path / "agent.sock")
    assert await qemu_status_after_init(build_qemu_argv(spec, runtime), runtime.qmp_socket) == "prelaunch"


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install-qemu.sh)")
async def test_restricted_devices_and_disks_start_under_tcg(tmp_path: Path) -> None:
    """Device options are checked only after accelerator init, which the SNP test never passes.

    So the device strings of a CVM (virtio with iommu_platform etc.), an iothread disk with
    native AIO and O_DIRECT, user networking and 9p are started here under TCG. The spec is
    changed after parsing (dataclasses.replace) to force bounce buffering without a kernel,
    which QEMU would otherwise load before the devices are created.
    """
    text = f"""name = "restricted"
[[disk]]
path = "{tmp_path}/data.img"
iothread = true
aio = "native"
cache = "none"
[network]
mode = "user"
[[share]]
path = "{tmp_path}"
tag = "share"
"""
    (tmp_path / "data.img").write_bytes(b"\0" * 1024 * 1024)
    spec, runtime = _real_files_runtime(text, tmp_path)
    spec = dataclasses.replace(spec, guest=GuestKnobs(swiotlb_force=1024))
    runtime = dataclasses.replace(
        runtime, accel="tcg", agent_channel="virtio-serial", agent_socket=tmp_path / "agent.sock"
    )
    argv = build_qemu_argv(spec, runtime)
    assert sum(RESTRICTED_VIRTIO in a for a in argv) == 4
    assert await qemu_status_after_init(argv, runtime.qmp_socket) == "prelaunch"


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install-qemu.sh)")
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
@pytest.mark.parametrize("case", ["sev-snp-baseline", "tdx-baseline"])
async def test_baseline_machine_flags_are_accepted_under_kvm(tmp_path: Path, case: str) -> None:
    """The baselines' machine and CPU flags (kernel_irqchip=split, hpet=off, pmu=off, vmport=off)
    under KVM. Devices and boot files are left out (they need a tap, /dev/vhost-vsock, images):
    this is about the platform flags. On a host whose KVM cannot run guests (the CI machines'
    nested "PVM") QEMU then aborts setting MSRs, after every option was accepted."""
    spec = load_spec(GOLDEN / f"{case}.toml")
    spec = dataclasses.replace(
        spec,
        memory_mib=256,
        prealloc=False,
        pinning=dataclasses.replace(spec.pinning, numa_node=None),
        boot=dataclasses.replace(spec.boot, firmware=None, kernel=None, initrd=None, cmdline=""),
        disks=(),
        network=dataclasses.replace(spec.network, mode="none"),
        agent=dataclasses.replace(spec.agent, channel="none", cid=None),
    )
    assert QEMU is not None
    runtime = dataclasses.replace(golden_runtime(spec), qemu_binary=QEMU, qmp_socket=tmp_path / "q.sock")
    runtime = dataclasses.replace(runtime, pidfile=tmp_path / "q.pid", serial_log=tmp_path / "c.log")
    _, stderr = await run_qemu(build_qemu_argv(spec, runtime), deadline=5.0)
    assert not OPTION_PARSE_ERRORS.search(stderr), f"QEMU rejected the command line:\n{stderr}"


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install-qemu.sh)")
async def test_scratch_disk_starts_under_tcg(tmp_path: Path) -> None:
    """The scratch disk's options (a file the daemon made, O_DIRECT where it works, native AIO,
    its iothread, the serial) on a restricted virtio-blk-pci: QEMU creates the device, and QMP
    shows the serial and the cache mode the guest will get."""
    spec, runtime = _real_files_runtime('name = "scratch"\n[scratch]\nsize = "16M"\n', tmp_path)
    assert spec.scratch is not None
    made = create_scratch(tmp_path, spec.scratch)
    spec = dataclasses.replace(spec, guest=GuestKnobs(swiotlb_force=1024))  # restricted devices
    runtime = dataclasses.replace(runtime, accel="tcg", agent_channel="none", scratch=made.drive)
    argv = build_qemu_argv(spec, runtime)
    assert f"serial={SCRATCH_SERIAL}" in _after(argv, "-device")[-1]
    assert QEMU is not None
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, [*argv, "-S"], check=False, stderr=subprocess.DEVNULL)
        )
        try:
            with trio.fail_after(60):
                while True:
                    try:
                        async with open_qmp(runtime.qmp_socket, deadline=10) as qmp:
                            await qmp.execute("query-status", deadline=10)  # all devices made
                            blocks = await qmp.execute("query-block", deadline=5)
                            serial = await qmp.execute(
                                "qom-get",
                                {"path": "/machine/peripheral/scratch0/virtio-backend", "property": "serial"},
                                deadline=5,
                            )
                            break
                    except (QMPConnectError, Disconnected):
                        assert process.returncode is None, "QEMU exited"
                        await trio.sleep(0.02)
        finally:
            process.kill()
    assert serial == SCRATCH_SERIAL
    block = next(b for b in blocks if b.get("qdev") == "/machine/peripheral/scratch0/virtio-backend")
    assert block["inserted"]["file"] == str(made.drive.path)
    assert block["inserted"]["cache"] == {
        "direct": made.drive.cache == "none",
        "no-flush": False,
        "writeback": True,
    }


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install-qemu.sh)")
async def test_virtio_console_starts_under_tcg(tmp_path: Path) -> None:
    """The CVM console (-serial none, a restricted virtio-serial-pci, a virtconsole on the log
    chardev) beside the agent's own virtio-serial controller, started under TCG."""
    spec, runtime = _real_files_runtime('name = "vcon"\nconsole = "virtio"\n', tmp_path)
    spec = dataclasses.replace(spec, guest=GuestKnobs(swiotlb_force=1024))  # restricted devices
    runtime = dataclasses.replace(
        runtime, accel="tcg", agent_channel="virtio-serial", agent_socket=tmp_path / "agent.sock"
    )
    argv = build_qemu_argv(spec, runtime)
    assert _after(argv, "-serial") == ["none"]
    assert f"virtio-serial-pci,id=vcon0,{RESTRICTED_VIRTIO}" in argv
    assert await qemu_status_after_init(argv, runtime.qmp_socket) == "prelaunch"
    assert runtime.serial_log.exists()  # QEMU opened the console log


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install-qemu.sh)")
@pytest.mark.skipif(shutil.which("numactl") is None, reason="numactl is not installed (Debian: numactl)")
async def test_numa_prefix_starts_qemu(tmp_path: Path) -> None:
    spec, runtime = _real_files_runtime('name = "numa"\n[pinning]\nnuma_node = 0\n', tmp_path)
    runtime = dataclasses.replace(runtime, accel="tcg", agent_channel="none")
    argv = build_qemu_argv(spec, runtime)
    assert argv[:4] == ["numactl", "--membind=0", "--cpunodebind=0", "--"]
    assert await qemu_status_after_init(argv, runtime.qmp_socket) == "prelaunch"


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install-qemu.sh)")
@pytest.mark.parametrize(
    "case", ["sev-snp-baseline", "tdx-baseline", "forced-swiotlb", "haltpoll", "idle-poll"]
)
async def test_normal_vm_goldens_start_under_tcg(tmp_path: Path, case: str) -> None:
    """Each normal-VM golden (the baselines with their CPU model, machine flags, -bios and virtio
    console; the ablations) as far as this host allows: under TCG, without the kernel (QEMU
    would load it before -S), with scratch files for firmware and disks, no tap, no vhost-vsock."""
    spec = load_spec(GOLDEN / f"{case}.toml")
    assert spec.tee == "none"
    firmware = tmp_path / "OVMF.fd"
    firmware.write_bytes(b"\0" * 65536)  # -bios takes whole 64 KiB blocks
    disks = []
    for i, disk in enumerate(spec.disks):
        (tmp_path / f"disk{i}.img").write_bytes(b"\0" * 1024 * 1024)
        disks.append(dataclasses.replace(disk, path=tmp_path / f"disk{i}.img", format="raw"))
    spec = dataclasses.replace(
        spec,
        memory_mib=256,
        prealloc=False,
        pinning=dataclasses.replace(spec.pinning, numa_node=None),
        boot=dataclasses.replace(
            spec.boot, firmware=firmware if spec.boot.firmware else None, kernel=None, initrd=None, cmdline=""
        ),
        disks=tuple(disks),
        network=dataclasses.replace(spec.network, mode="none", forwards=()),
        agent=dataclasses.replace(spec.agent, channel="none", cid=None),
    )
    assert QEMU is not None
    runtime = dataclasses.replace(
        golden_runtime(spec),
        accel="tcg",
        qemu_binary=QEMU,
        qmp_socket=tmp_path / "q.sock",
        pidfile=tmp_path / "q.pid",
        serial_log=tmp_path / "c.log",
    )
    assert await qemu_status_after_init(build_qemu_argv(spec, runtime), runtime.qmp_socket) == "prelaunch"
