"""The dev guest's image builder: newc writer, module closure, /init text, command line, cache.

Everything here runs without a kernel: ELF modules and busybox are synthesised (a few
hundred bytes each). Two checks use the real inputs when scripts/install-guest-kernel.sh has
run (busybox's own cpio reads our archive back; a real module's dependencies are read).
"""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from cvmcore.errors import UsageError
from host_daemon import devguest as image
from host_daemon.devguest import (
    BOOT_PHASES,
    CpioEntry,
    GuestKernel,
    ImageError,
    InitModule,
    build_dev_guest,
    dev_guest_cmdline,
    elf_section,
    find_guest_kernel,
    initramfs_entries,
    is_static_elf,
    modinfo_depends,
    module_name,
    newc_archive,
    parse_boot_marker,
    parse_modules_dep,
    parse_newc,
    render_init,
    resolve_module_order,
    with_parent_dirs,
)

# --- synthetic ELF files ------------------------------------------------------------------


def make_elf(sections: dict[str, bytes], program_types: tuple[int, ...] = ()) -> bytes:
    """A minimal little-endian ELF64 file with the given sections and program header types."""
    shstrtab = b"\0"
    name_offsets = {}
    for name in [*sections, ".shstrtab"]:
        name_offsets[name] = len(shstrtab)
        shstrtab += name.encode() + b"\0"
    all_sections = {**sections, ".shstrtab": shstrtab}
    phoff = 64
    body = bytearray(b"\0" * (phoff + 56 * len(program_types)))
    for i, p_type in enumerate(program_types):
        struct.pack_into("<IIQQQQQQ", body, phoff + 56 * i, p_type, 0, 0, 0, 0, 0, 0, 0)
    offsets = {}
    for name, data in all_sections.items():
        offsets[name] = len(body)
        body += data
    shoff = len(body)
    body += b"\0" * 64  # section 0: SHN_UNDEF
    for name, data in all_sections.items():
        body += struct.pack("<IIQQQQIIQQ", name_offsets[name], 1, 0, 0, offsets[name], len(data), 0, 0, 1, 0)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + b"\0" * 9,
        1,  # ET_REL
        62,  # EM_X86_64
        1,
        0,
        phoff if program_types else 0,
        shoff,
        0,
        64,
        56,
        len(program_types),
        64,
        len(all_sections) + 1,
        len(all_sections),  # .shstrtab is the last one
    )
    body[:64] = header
    return bytes(body)


def make_module(name: str, depends: str = "") -> bytes:
    info = f"license=GPL\0depends={depends}\0name={name}\0vermagic=9.9-test SMP\0".encode()
    return make_elf({".text": b"\xc3", ".modinfo": info})


STATIC_BUSYBOX = make_elf({".text": b"\xc3"}, program_types=(1,))  # PT_LOAD only
DYNAMIC_BINARY = make_elf({".text": b"\xc3"}, program_types=(6, 3, 1))  # PT_PHDR, PT_INTERP, PT_LOAD


# --- newc ---------------------------------------------------------------------------------


def test_newc_member_layout_follows_the_kernel_format() -> None:
    archive = newc_archive([CpioEntry.file("init", b"hello", 0o755)])
    assert archive[:6] == b"070701"
    fields = [int(archive[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size, _, _, _, _, namesize, check = fields
    assert (ino, mode, uid, gid, nlink, mtime, size, namesize, check) == (
        1,
        stat.S_IFREG | 0o755,
        0,
        0,
        1,
        0,
        5,
        len(b"init\0"),
        0,
    )
    # 110-byte header + "init\0" = 115, padded to 116; data "hello" padded to 8.
    assert archive[110:116] == b"init\0\0"
    assert archive[116:124] == b"hello\0\0\0"
    assert archive[124:130] == b"070701"
    assert b"TRAILER!!!\0" in archive[124:]
    assert len(archive) % 4 == 0


def test_newc_round_trip_keeps_types_and_device_numbers() -> None:
    entries = [
        CpioEntry.directory("dev"),
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.symlink("sh", "busybox"),
        CpioEntry.file("a/b", b"x" * 1001),
    ]
    assert parse_newc(newc_archive(entries)) == entries


@pytest.mark.parametrize("name", ["", "/init", "TRAILER!!!"])
def test_newc_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        newc_archive([CpioEntry.file(name, b"")])


def test_newc_is_reproducible() -> None:
    entries = with_parent_dirs([CpioEntry.file("x/y", b"1"), CpioEntry.file("z", b"2")])
    assert newc_archive(entries) == newc_archive(list(entries))


def test_parent_dirs_come_first_and_duplicates_are_refused() -> None:
    entries = with_parent_dirs([CpioEntry.file("lib/modules/k/a.ko", b""), CpioEntry.file("init", b"")])
    names = [e.name for e in entries]
    assert names == ["init", "lib", "lib/modules", "lib/modules/k", "lib/modules/k/a.ko"]
    assert all(stat.S_ISDIR(e.mode) for e in entries[1:4])
    with pytest.raises(ValueError, match="duplicate"):
        with_parent_dirs([CpioEntry.file("a", b""), CpioEntry.file("a", b"")])


def test_busybox_cpio_reads_the_archive(tmp_path: Path) -> None:
    """An independent reader: busybox's cpio extracts what we wrote (when busybox is installed)."""
    try:
        busybox = image.find_busybox()
    except ImageError as exc:
        pytest.skip(str(exc))
    entries = with_parent_dirs(
        [CpioEntry.file("bin/tool", b"#!/bin/sh\n", 0o755), CpioEntry.symlink("bin/sh", "tool")]
    )
    subprocess.run(
        [str(busybox), "cpio", "-i", "-d"],
        input=newc_archive(entries),
        cwd=tmp_path,
        check=True,
        timeout=30,
        capture_output=True,
    )
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bin/sh").readlink() == Path("tool")


# --- modules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("kernel/fs/9p/9p.ko.xz", "9p"),
        ("kernel/drivers/virt/coco/sev-guest/sev-guest.ko.xz", "sev_guest"),
        ("virtio_blk.ko", "virtio_blk"),
        ("x.ko.zst", "x"),
        ("tdx-guest", "tdx_guest"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


def test_parse_modules_dep() -> None:
    text = "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\nkernel/a.ko:\n\n"
    assert parse_modules_dep(text) == {"9p": ("9pnet", "netfs"), "a": ()}
    with pytest.raises(ValueError):
        parse_modules_dep("no colon here")


def test_modinfo_depends_from_elf() -> None:
    assert modinfo_depends(make_module("9p", "netfs,9pnet")) == ("netfs", "9pnet")
    assert modinfo_depends(make_module("netfs")) == ()
    assert elf_section(make_module("x"), ".nothing") is None
    with pytest.raises(ValueError):
        elf_section(b"not an elf at all", ".modinfo")


def test_real_module_dependencies() -> None:
    """The backports kernel's 9p module depends on 9pnet and netfs (when the kernel is installed)."""
    try:
        tree = image.ModuleTree(find_guest_kernel())
    except ImageError as exc:
        pytest.skip(str(exc))
    assert set(tree.depends("9p")) >= {"9pnet", "netfs"}
    assert "virtio_pci" in tree.builtin


def test_resolve_orders_dependencies_first_and_once() -> None:
    graph = {"9p": ("netfs", "9pnet"), "9pnet_virtio": ("9pnet",), "9pnet": (), "netfs": ()}
    order = resolve_module_order(["9pnet_virtio", "9p"], graph.__getitem__, graph.__contains__)
    assert order == ["9pnet", "9pnet_virtio", "netfs", "9p"]


def test_resolve_names_the_module_that_needs_a_missing_one() -> None:
    graph = {"a": ("b",)}
    with pytest.raises(ImageError, match="kernel module b not found \\(needed by a\\)"):
        resolve_module_order(["a"], graph.__getitem__, graph.__contains__)


def test_resolve_refuses_cycles() -> None:
    graph = {"a": ("b",), "b": ("a",)}
    with pytest.raises(ImageError, match="cycle: a -> b -> a"):
        resolve_module_order(["a"], graph.__getitem__, graph.__contains__)


# --- /init, command line, markers ---------------------------------------------------------


def test_init_loads_modules_in_order_and_marks_phases_in_order(tmp_path: Path) -> None:
    text = render_init(
        [
            InitModule("netfs", "lib/modules/k/netfs.ko", True),
            InitModule("9p", "lib/modules/k/9p.ko", True),
            InitModule("tsm", "lib/modules/k/tsm.ko", False, "sev-snp"),
            InitModule("sev_guest", "lib/modules/k/sev-guest.ko", False, "sev-snp"),
            InitModule("tdx_guest", "lib/modules/k/tdx-guest.ko", False, "tdx"),
        ]
    )
    sev_block = (
        'if [ "$tee" = sev-snp ]; then\n'
        "    insmod /lib/modules/k/tsm.ko 2>/dev/null || mark module-skipped tsm\n"
        "    insmod /lib/modules/k/sev-guest.ko 2>/dev/null || mark module-skipped sev_guest\n"
        "fi\n"
        'if [ "$tee" = tdx ]; then\n'
    )
    assert sev_block in text
    assert text.startswith("#!/bin/busybox sh\n")
    netfs = text.index('insmod /lib/modules/k/netfs.ko || fail "insmod netfs"')
    ninep = text.index('insmod /lib/modules/k/9p.ko || fail "insmod 9p"')
    sev = text.index("insmod /lib/modules/k/sev-guest.ko 2>/dev/null || mark module-skipped sev_guest")
    assert text.index("tee=none") < netfs
    assert netfs < ninep < sev < text.index("mark modules-loaded")
    positions = [text.index(f"mark {phase}") for phase in BOOT_PHASES]
    assert positions == sorted(positions)
    script = tmp_path / "init"
    script.write_text(text)
    sh = shutil.which("sh")
    assert sh is not None
    subprocess.run([sh, "-n", str(script)], check=True, timeout=10)  # syntax only


def test_cmdline() -> None:
    assert dev_guest_cmdline("/venv/bin/cvm-agent") == (
        "console=ttyS0 panic=-1 cvm.root=hostroot cvm.agent=/venv/bin/cvm-agent cvm.port=1024"
    )
    line = dev_guest_cmdline(None, port=5000, ip="10.0.2.15/24,10.0.2.2", extra=["quiet"])
    assert line == "console=ttyS0 panic=-1 cvm.root=hostroot cvm.port=5000 cvm.ip=10.0.2.15/24,10.0.2.2 quiet"


@pytest.mark.parametrize(
    "kwargs",
    [{"agent": "relative/agent"}, {"agent": "/with space"}, {"port": 0}, {"ip": "10.0.2.15"}],
)
def test_cmdline_rejects_bad_values(kwargs: dict[str, object]) -> None:
    agent = kwargs.pop("agent", "/a")
    with pytest.raises(UsageError):
        dev_guest_cmdline(agent, **kwargs)  # type: ignore[arg-type]


def test_parse_boot_marker() -> None:
    marker = parse_boot_marker("cvm-boot: agent-exec 4.67 /usr/bin/env\r\n")
    assert marker == image.BootMarker("agent-exec", 4.67, "/usr/bin/env")
    assert parse_boot_marker("cvm-boot: init-start 3.80") == image.BootMarker("init-start", 3.8, "")
    assert parse_boot_marker("[    3.75] Run /init as init process") is None
    assert parse_boot_marker("cvm-boot: init-start soon") is None


def test_static_elf_detection() -> None:
    assert is_static_elf(STATIC_BUSYBOX)
    assert not is_static_elf(DYNAMIC_BINARY)
    assert not is_static_elf(b"#!/bin/sh\n")


def test_initramfs_has_init_console_and_busybox() -> None:
    entries = {e.name: e for e in initramfs_entries(STATIC_BUSYBOX, "#!/bin/busybox sh\n", {"m/a.ko": b"A"})}
    assert entries["init"].mode == stat.S_IFREG | 0o755
    assert stat.S_ISCHR(entries["dev/console"].mode)
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["bin/busybox"].data == STATIC_BUSYBOX
    assert entries["m/a.ko"].data == b"A"
    assert stat.S_ISDIR(entries["m"].mode)


# --- build and cache, on a synthetic kernel tree ------------------------------------------


def fake_kernel(root: Path, modules: dict[str, str], builtin: tuple[str, ...] = ()) -> GuestKernel:
    release = "9.9-test"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{release}").write_bytes(b"bzImage" * 100)
    mods = root / "lib/modules" / release
    for name, depends in modules.items():
        path = mods / "kernel" / f"{name}.ko.xz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(make_module(name, depends)))
    (mods / "modules.builtin").write_text("".join(f"kernel/{b}.ko\n" for b in builtin))
    return find_guest_kernel(root)


def test_build_then_cache_hit_then_new_key_on_change(tmp_path: Path) -> None:
    modules = {"netfs": "", "9pnet": "", "9p": "netfs,9pnet", "opt": "netfs", "tsm": "", "flagged": "tsm"}
    kernel = fake_kernel(tmp_path / "k", modules, ("virtio",))
    busybox = tmp_path / "busybox"
    busybox.write_bytes(STATIC_BUSYBOX)
    cache = tmp_path / "cache"

    def build(required: tuple[str, ...]) -> image.DevGuestImage:
        return build_dev_guest(
            kernel=kernel,
            busybox=busybox,
            cache_dir=cache,
            required_modules=required,
            optional_modules={"opt": None, "absent": None, "flagged": "sev-snp"},
        )

    first = build(("9p", "virtio"))
    assert not first.cached
    assert first.modules == ("netfs", "9pnet", "9p", "opt", "tsm", "flagged")
    assert first.kernel.read_bytes() == kernel.vmlinuz.read_bytes()
    archive = parse_newc(gzip.decompress(first.initrd.read_bytes()))
    members = {e.name: e for e in archive}
    ko = "lib/modules/9.9-test/kernel/9p.ko"
    assert modinfo_depends(members[ko].data) == ("netfs", "9pnet")  # stored decompressed
    assert "insmod /lib/modules/9.9-test/kernel/opt.ko 2>/dev/null" in members["init"].data.decode()
    manifest = json.loads((first.directory / "manifest.json").read_text())
    assert manifest["key"] == first.key and manifest["modules"] == list(first.modules)

    second = build(("9p", "virtio"))
    assert second.cached and second.key == first.key and second.initrd == first.initrd

    third = build(("9pnet",))
    assert not third.cached and third.key != first.key


def test_build_names_the_install_script_when_inputs_are_missing(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"install-guest-kernel\.sh"):
        find_guest_kernel(tmp_path)
    dynamic = tmp_path / "busybox"
    dynamic.write_bytes(DYNAMIC_BINARY)
    with pytest.raises(ImageError, match="not a static"):
        image.find_busybox(dynamic)


def test_missing_required_module_fails_the_build(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path / "k", {"9p": "netfs"})
    busybox = tmp_path / "busybox"
    busybox.write_bytes(STATIC_BUSYBOX)
    with pytest.raises(ImageError, match="netfs not found \\(needed by 9p\\)"):
        build_dev_guest(kernel=kernel, busybox=busybox, cache_dir=tmp_path / "c", required_modules=("9p",))


# --- cvmctl image -------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    import argparse

    from cvmctl.cli import image as image_cli

    parser = argparse.ArgumentParser(prog="cvmctl")
    image_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_cli_build_prints_json_then_finds_it_cached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_kernel(tmp_path / "k", dict.fromkeys(image.REQUIRED_MODULES, ""))
    busybox = tmp_path / "busybox"
    busybox.write_bytes(STATIC_BUSYBOX)
    common = ["image", "build", "--kernel-tree", str(tmp_path / "k"), "--busybox", str(busybox)]
    common += ["--cache-dir", str(tmp_path / "cache"), "--agent", "/opt/agent", "--json"]
    assert run_cli(common) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cached"] is False and first["kernel_release"] == "9.9-test"
    assert "cvm.agent=/opt/agent cvm.port=1024" in first["cmdline"]
    assert Path(first["initrd"]).is_file()
    assert run_cli(common) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True


def test_cli_build_rejects_a_relative_agent(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        run_cli(["image", "build", "--agent", "cvm-agent", "--cache-dir", str(tmp_path)])
