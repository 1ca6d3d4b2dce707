"""The VM spec: defaults, every rule, and error messages that name field, value and what is allowed."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import host_daemon.spec as spec_module
from cvmcore.errors import UsageError
from host_daemon.spec import (
    SCRATCH_SERIAL,
    UNKNOWN_KEY,
    HostForward,
    QgsAddress,
    ScratchDisk,
    SpecError,
    load_spec,
    parse_memory,
    parse_spec,
)

HOST_DATA = "Y3ZtY3RsLWhvc3QtZGF0YS0wMDAwMDAwMDAwMDAwMDA="  # 32 bytes


def problems(text: str) -> dict[str, str]:
    """field -> message, for a spec that must fail."""
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="vm.toml")
    return {p.field: str(p) for p in info.value.problems}


def test_minimal_spec_has_sane_defaults() -> None:
    spec = parse_spec('name = "x"')
    assert spec.name == "x"
    assert (spec.tee, spec.accel, spec.vcpus, spec.memory_mib) == ("none", "auto", 1, 512)
    assert spec.memory_backend == "auto" and not spec.prealloc
    assert spec.network.mode == "none" and spec.disks == () and spec.shares == ()
    assert spec.agent.channel == "auto" and spec.agent.cid is None
    assert spec.sev_snp.policy == 0x30000 and spec.sev_snp.cbitpos == 51
    assert not spec.sev_snp.kernel_hashes
    assert spec.tdx.quote_generation_socket == "auto"
    assert spec.console == "auto" and spec.console_device == "serial"
    assert not spec.confidential and spec.flavour == "none"


def test_spec_error_is_a_usage_error_with_one_line() -> None:
    with pytest.raises(UsageError) as info:
        parse_spec('name = "x"\nvcpus = 0', source="vm.toml")
    assert info.value.exit_code == 2
    assert str(info.value) == "vm.toml: vcpus: 0 is not allowed; expected an integer from 1 to 512"
    assert "\n" not in str(info.value)


def test_all_problems_are_collected_in_file_order() -> None:
    found = problems(
        """name = "Bad Name"
tee = "sgx"
memory = "1.5G"
[disk]
path = "/d"
cache = "fast"
"""
    )
    assert list(found) == ["name", "tee", "memory", "disk[0].cache"]
    assert found["tee"] == "tee: 'sgx' is not allowed; expected one of: none, sev-snp, tdx"
    assert "expected one of: none, writeback, writethrough, directsync, unsafe" in found["disk[0].cache"]


def test_missing_name_and_bad_toml() -> None:
    assert problems("vcpus = 2")["name"].startswith("name: missing; a name is required")
    assert "<toml>" in problems("name = ")


@pytest.mark.parametrize("name", ["x", "vm-1", "a_b", "0" * 63])
def test_good_names(name: str) -> None:
    assert parse_spec(f'name = "{name}"').name == name


@pytest.mark.parametrize("name", ["", "-x", "X", "a b", "a,b", "a/b", "../x", "0" * 64, "é"])
def test_bad_names(name: str) -> None:
    assert "name" in problems(f'name = "{name}"')


def test_unknown_keys_are_errors_naming_the_known_ones() -> None:
    found = problems('name = "x"\nvcpu = 2\n[guest]\nhalt_poll = true')
    assert set(found) == {"vcpu", "guest.halt_poll"}
    assert (
        found["guest.halt_poll"]
        == "guest.halt_poll: unknown key; known keys: haltpoll, idle_poll, swiotlb_force"
    )
    with pytest.raises(SpecError) as info:
        parse_spec('name = "x"\nvcpu = 2')
    assert info.value.problems[0].value is UNKNOWN_KEY


@pytest.mark.parametrize(
    ("text", "mib"),
    [("512M", 512), ("2G", 2048), ("2GiB", 2048), ("1t", 1024 * 1024), ("4096K", 4), (1024, 1024)],
)
def test_parse_memory(text: str | int, mib: int) -> None:
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text", ["1.5G", "2", "G", "512 MB extra", "1025K", True, 2.0])
def test_parse_memory_rejects(text: object) -> None:
    assert parse_memory(text) is None


def test_memory_bounds() -> None:
    assert "memory" in problems('name = "x"\nmemory = "16M"')
    assert parse_spec('name = "x"\nmemory = "32M"').memory_mib == 32


def test_relative_paths_need_a_spec_file(tmp_path: Path) -> None:
    found = problems('name = "x"\n[boot]\nkernel = "bzImage"')
    assert "absolute path" in found["boot.kernel"]
    spec_file = tmp_path / "vm.toml"
    spec_file.write_text('name = "x"\n[boot]\nkernel = "bzImage"\n[[share]]\npath = "/srv"\ntag = "t"')
    spec = load_spec(spec_file)
    assert spec.boot.kernel == tmp_path / "bzImage"
    assert spec.shares[0].path == Path("/srv")


def test_load_spec_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the spec"):
        load_spec(tmp_path / "missing.toml")


def test_forwards_are_loopback_only() -> None:
    spec = parse_spec(
        'name = "x"\n[network]\nmode = "user"\n'
        "forwards = [{host_port = 2222, guest_port = 22}, "
        '{proto = "udp", host_addr = "127.0.0.2", host_port = 5353, guest_port = 53}]'
    )
    assert spec.network.forwards == (
        HostForward(host_port=2222, guest_port=22),
        HostForward(host_port=5353, guest_port=53, proto="udp", host_addr="127.0.0.2"),
    )
    for addr in ("0.0.0.0", "192.168.1.2", "", "::1", "localhost"):
        found = problems(
            f'name = "x"\n[network]\nmode = "user"\n'
            f'forwards = [{{host_addr = "{addr}", host_port = 1, guest_port = 2}}]'
        )
        assert "IPv4 loopback" in found["network.forwards[0].host_addr"], addr


def test_tap_options() -> None:
    net = parse_spec(
        'name = "x"\nvcpus = 4\n[network]\nmode = "tap"\nifname = "t"\nvhost = false\nqueues = 4'
    )
    assert (net.network.vhost, net.network.queues) == (False, 4)
    assert net.network.tap_queues(net.vcpus) == 4


@pytest.mark.parametrize(("vcpus", "queues"), [(1, 1), (2, 2), (8, 8), (300, 256)])
def test_tap_defaults(vcpus: int, queues: int) -> None:
    """``mode = "tap"`` alone: the daemon's tap0, vhost where the host has it, a queue per vCPU."""
    spec = parse_spec(f'name = "x"\nvcpus = {vcpus}\n[network]\nmode = "tap"')
    assert (spec.network.ifname, spec.network.vhost, spec.network.queues) == (None, True, None)
    assert spec.network.tap_queues(spec.vcpus) == queues


def test_disk_rules() -> None:
    spec = parse_spec(
        'name = "x"\n[[disk]]\npath = "/a"\n[[disk]]\npath = "/b"\nformat = "qcow2"\nreadonly = true'
    )
    assert [d.path for d in spec.disks] == [Path("/a"), Path("/b")]
    assert spec.disks[1].format == "qcow2" and spec.disks[1].readonly
    assert "native" in problems('name = "x"\n[disk]\npath = "/a"\naio = "native"')["disk[0].aio"]
    assert (
        parse_spec('name = "x"\n[disk]\npath = "/a"\naio = "native"\ncache = "directsync"').disks[0].aio
        == "native"
    )
    assert "disk[0].path" in problems('name = "x"\n[disk]\nformat = "raw"')
    assert "disk" in problems('name = "x"\ndisk = 3')


def test_share_rules() -> None:
    assert "share[0].tag" in problems('name = "x"\n[[share]]\npath = "/"')
    assert "share[0].tag" in problems('name = "x"\n[[share]]\npath = "/"\ntag = "has space"')
    assert "share[1].tag" in problems(
        'name = "x"\n[[share]]\npath = "/"\ntag = "a"\n[[share]]\npath = "/b"\ntag = "a"'
    )
    assert parse_spec('name = "x"\n[[share]]\npath = "/"\ntag = "a"').shares[0].readonly


def test_kernel_knobs_need_direct_boot() -> None:
    for knob in ("swiotlb_force = 1024", "haltpoll = true", "idle_poll = true"):
        found = problems(f'name = "x"\n[guest]\n{knob}')
        assert any(f.startswith("guest.") and "boot.kernel" in m for f, m in found.items()), knob
    both = problems('name = "x"\n[boot]\nkernel = "/k"\n[guest]\nhaltpoll = true\nidle_poll = true')
    assert "choose one" in both["guest.idle_poll"]


def test_forced_swiotlb_is_for_normal_vms_only() -> None:
    found = problems(
        'name = "x"\ntee = "tdx"\n[boot]\nfirmware = "/fw"\nkernel = "/k"\n[guest]\nswiotlb_force = 1024'
    )
    assert "only for a normal VM" in found["guest.swiotlb_force"]


def test_tee_rules() -> None:
    found = problems('name = "x"\ntee = "sev-snp"\naccel = "tcg"')
    assert "KVM" in found["accel"]
    assert "OVMF" in found["boot.firmware"]
    assert "TDVF" in problems('name = "x"\ntee = "tdx"')["boot.firmware"]


def test_sev_snp_options() -> None:
    base = 'name = "x"\ntee = "sev-snp"\n[boot]\nfirmware = "/fw"\n'
    spec = parse_spec(base + f'[sev_snp]\npolicy = "0x30000"\nhost_data = "{HOST_DATA}"\ncbitpos = 47')
    assert (spec.sev_snp.policy, spec.sev_snp.host_data, spec.sev_snp.cbitpos) == (0x30000, HOST_DATA, 47)
    # kernel-hashes is off unless asked for (QEMU's default), also with direct kernel boot
    assert not spec.sev_snp.kernel_hashes
    assert not parse_spec(base + 'kernel = "/k"').sev_snp.kernel_hashes
    assert parse_spec(base + 'kernel = "/k"\n[sev_snp]\nkernel_hashes = true').sev_snp.kernel_hashes
    assert (
        "true or false"
        in problems(base + 'kernel = "/k"\n[sev_snp]\nkernel_hashes = "yes"')["sev_snp.kernel_hashes"]
    )
    assert "bit 17" in problems(base + "[sev_snp]\npolicy = 0x10000")["sev_snp.policy"]
    assert "sev_snp.policy" in problems(base + '[sev_snp]\npolicy = "lots"')
    assert "32 bytes" in problems(base + '[sev_snp]\nhost_data = "aGVsbG8="')["sev_snp.host_data"]
    assert "sev_snp.host_data" in problems(base + '[sev_snp]\nhost_data = "not base64!"')
    assert "sev_snp.reduced_phys_bits" in problems(base + "[sev_snp]\nreduced_phys_bits = 0")
    assert "boot.kernel" in problems(base + "[sev_snp]\nkernel_hashes = true")["sev_snp.kernel_hashes"]


def test_tdx_quote_generation_socket() -> None:
    base = 'name = "x"\ntee = "tdx"\n[boot]\nfirmware = "/fw"\n[tdx]\n'
    qgs = parse_spec(
        base + 'quote_generation_socket = "/var/run/tdx-qgs/qgs.socket"'
    ).tdx.quote_generation_socket
    assert qgs == QgsAddress("unix", path="/var/run/tdx-qgs/qgs.socket")
    qgs = parse_spec(base + 'quote_generation_socket = "vsock:2:4050"').tdx.quote_generation_socket
    assert qgs == QgsAddress("vsock", cid=2, port=4050)
    assert parse_spec(base + 'quote_generation_socket = "none"').tdx.quote_generation_socket == "none"
    assert parse_spec(base + 'quote_generation_socket = "auto"').tdx.quote_generation_socket == "auto"
    assert parse_spec(base).tdx.quote_generation_socket == "auto"
    found = problems(base + 'quote_generation_socket = "qgs.sock"')["tdx.quote_generation_socket"]
    assert '"auto", "none"' in found


def test_console() -> None:
    assert parse_spec('name = "x"').console_device == "serial"
    assert parse_spec('name = "x"\nbaseline_for = "sev-snp"').console_device == "virtio"
    assert parse_spec('name = "x"\ntee = "tdx"\n[boot]\nfirmware = "/f"').console_device == "virtio"
    assert parse_spec('name = "x"\nbaseline_for = "tdx"\nconsole = "serial"').console_device == "serial"
    assert parse_spec('name = "x"\nconsole = "virtio"').console_device == "virtio"
    assert "expected one of: auto, serial, virtio" in problems('name = "x"\nconsole = "hvc"')["console"]


def test_console_and_cmdline_must_agree() -> None:
    kernel = '[boot]\nkernel = "/k"\n'
    found = problems(f'name = "x"\nbaseline_for = "sev-snp"\n{kernel}cmdline = "root=/dev/vda console=ttyS0"')
    assert "the guest console is hvc0, not ttyS0" in found["boot.cmdline"]
    assert "sev-snp flavour" in found["boot.cmdline"]
    found = problems(f'name = "x"\n{kernel}cmdline = "console=hvc0"')
    assert "the guest console is ttyS0, not hvc0" in found["boot.cmdline"]
    # both named, or the right one: fine
    parse_spec(f'name = "x"\nconsole = "virtio"\n{kernel}cmdline = "console=ttyS0 console=hvc0"')
    parse_spec(f'name = "x"\nbaseline_for = "tdx"\nconsole = "serial"\n{kernel}cmdline = "console=ttyS0"')


def test_agent_rules() -> None:
    assert parse_spec('name = "x"\n[agent]\nchannel = "vhost-vsock"\ncid = 3').agent.cid == 3
    assert "memory_backend" in problems(
        'name = "x"\nmemory_backend = "ram"\n[agent]\nchannel = "vhost-user-vsock"'
    )


def test_pinning_rules() -> None:
    spec = parse_spec('name = "x"\nvcpus = 2\n[pinning]\nhost_cpus = [4, 5]\nnuma_node = 0')
    assert spec.pinning.host_cpus == (4, 5) and spec.pinning.numa_node == 0


def test_scratch_disk() -> None:
    assert parse_spec('name = "x"').scratch is None
    default = parse_spec('name = "x"\n[scratch]').scratch
    assert default == ScratchDisk(size_mib=2048, format="raw", aio="auto", cache="auto", iothread=True)
    spec = parse_spec(
        'name = "x"\n[scratch]\nsize = "512M"\naio = "io_uring"\ncache = "writeback"\niothread = false'
    )
    assert spec.scratch == ScratchDisk(size_mib=512, aio="io_uring", cache="writeback", iothread=False)
    assert parse_spec('name = "x"\n[scratch]\nsize = 100').scratch == ScratchDisk(size_mib=100)
    native = parse_spec('name = "x"\n[scratch]\naio = "native"\ncache = "directsync"').scratch
    assert native is not None and native.aio == "native"
    # "auto" cache becomes "none" wherever native AIO can work, so native + auto is allowed
    assert parse_spec('name = "x"\n[scratch]\naio = "native"').scratch is not None
    # the daemon names the file: a path is refused with that reason
    found = problems('name = "x"\n[scratch]\npath = "/etc/passwd"')
    assert "has no path" in found["scratch.path"] and "[[disk]]" in found["scratch.path"]
    assert "whole MiB" in problems('name = "x"\n[scratch]\nsize = "2.5G"')["scratch.size"]
    assert SCRATCH_SERIAL == "cvm-scratch" and len(SCRATCH_SERIAL.encode()) <= 20  # VIRTIO_BLK_ID_BYTES


def test_golden_specs_all_parse() -> None:
    golden = Path(__file__).parent / "golden"
    names = {load_spec(p).name for p in golden.glob("*.toml")}
    assert len(names) == len(list(golden.glob("*.toml")))


# A spec that breaks one rule, and the field its error must name.
RULES = [
    (
        '[network]\nmode = "tap"\nifname = "t0"\nforwards = [{host_port = 1, guest_port = 2}]',
        "network.forwards",
    ),
    ('[network]\nmode = "tap"\nqueues = 0', "network.queues"),
    ('[network]\nmode = "tap"\nifname = "much-too-long-name"', "network.ifname"),
    ('[network]\nmode = "user"\nqueues = 2', "network.queues"),
    ('vcpus = 2\n[network]\nmode = "tap"\nifname = "t"\nqueues = 4', "network.queues"),
    ('tee = "tdx"\nbaseline_for = "tdx"\n[boot]\nfirmware = "/f"', "baseline_for"),
    ("[sev_snp]\ncbitpos = 51", "sev_snp"),
    ('console = "tty"', "console"),
    ('[tdx]\nquote_generation_socket = "/q"', "tdx"),
    ('tee = "sev-snp"\nmemory_backend = "ram"\n[boot]\nfirmware = "/f"', "memory_backend"),
    ('memory_backend = "ram"\n[agent]\nchannel = "vhost-user-vsock"', "memory_backend"),
    ('memory_backend = "file"', "memory_path"),
    ('memory_path = "/dev/hugepages"', "memory_path"),
    ("[agent]\ncid = 2", "agent.cid"),
    ('[agent]\nchannel = "virtio-serial"\ncid = 5', "agent.cid"),
    ('[agent]\nchannel = "vhost-vsock"\nsocket = "/s"', "agent.socket"),
    ("vcpus = 2\n[pinning]\nhost_cpus = [4]", "pinning.host_cpus"),
    ("vcpus = 2\n[pinning]\nhost_cpus = [4, 4]", "pinning.host_cpus"),
    ('[pinning]\nhost_cpus = "4"', "pinning.host_cpus"),
    ('[boot]\ninitrd = "/i"', "boot.initrd"),
    ('[boot]\ncmdline = "quiet"', "boot.cmdline"),
    ('cpu = "host;rm"', "cpu"),
    ('accel = "hvf"', "accel"),
    ("prealloc = 1", "prealloc"),
    ("network = 1", "network"),
    ('[scratch]\nsize = "1.5G"', "scratch.size"),
    ('[scratch]\nsize = "0M"', "scratch.size"),
    ('[scratch]\nsize = "17T"', "scratch.size"),
    ('[scratch]\nformat = "qcow2"', "scratch.format"),
    ('[scratch]\naio = "posix"', "scratch.aio"),
    ('[scratch]\ncache = "fast"', "scratch.cache"),
    ('[scratch]\naio = "native"\ncache = "writeback"', "scratch.aio"),
    ('[scratch]\npath = "/var/lib/x.raw"', "scratch.path"),
    ('[scratch]\nserial = "x"', "scratch.serial"),
    ("scratch = true", "scratch"),
]


@pytest.mark.parametrize(("body", "field"), RULES)
def test_rule_names_the_field(body: str, field: str) -> None:
    assert field in problems(f'name = "x"\n{body}')


def test_the_module_docstring_examples_are_valid_specs(tmp_path: Path) -> None:
    doc = spec_module.__doc__ or ""
    fuller = doc.split("and a fuller one reads::\n", 1)[1].split("\nErrors:", 1)[0]
    spec_file = tmp_path / "vm.toml"
    spec_file.write_text(textwrap.dedent(fuller))
    spec = load_spec(spec_file)
    assert spec.tee == "sev-snp" and spec.boot.kernel == tmp_path / "bzImage"
    assert spec.sev_snp.host_data is None
    assert not spec.sev_snp.kernel_hashes and spec.console_device == "virtio"
    assert spec.boot.firmware == Path("/usr/share/ovmf/OVMF.fd")
