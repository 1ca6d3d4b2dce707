"""The Debian guest image's pure parts: recipe, mmdebstrap command, hook, command line, spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvmcore.defaults import GUEST_SCRATCH_DIR, SCRATCH_SERIAL
from host_daemon.debimage import (
    ImageBuildError,
    Recipe,
    complete_with_debian_image,
    customize_script,
    guest_cmdline,
    load_image,
    mmdebstrap_argv,
)
from host_daemon.debimage.build import UNIT_FILES, current_image, source_files, source_tree
from host_daemon.debimage.recipe import KERNEL_PACKAGE, LEFT_OUT_OF_IMAGE, SERVICES_ON, WORKLOAD_PACKAGES
from host_daemon.devguest.build import cache_key
from host_daemon.qemu_args import Runtime, build_qemu_argv
from host_daemon.spec import SpecError, parse_spec
from tests.conftest import REPO_ROOT
from workloads.catalogue import CATALOGUE


def test_recipe_takes_only_the_kernel_from_backports() -> None:
    recipe = Recipe()
    assert KERNEL_PACKAGE == "linux-image-amd64/bookworm-backports"
    assert [p for p in recipe.packages if "/" in p] == [KERNEL_PACKAGE]
    assert recipe.sources() == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
        "deb http://deb.debian.org/debian bookworm-backports main",
    ]


def test_recipe_has_every_guest_tool_of_the_catalogue() -> None:
    wanted = {pkg for w in CATALOGUE.values() for pkg in w.guest_tools.values()}
    assert wanted - set(WORKLOAD_PACKAGES) - {"kmod"} - set(LEFT_OUT_OF_IMAGE) == set()
    # A tool is left out on purpose, with a reason, and only one the catalogue names.
    assert set(LEFT_OUT_OF_IMAGE) <= wanted - set(WORKLOAD_PACKAGES)
    assert all(reason for reason in LEFT_OUT_OF_IMAGE.values())


def test_mmdebstrap_argv() -> None:
    argv = mmdebstrap_argv(Recipe(mirror="http://m/debian"), "/t/tree", "/t/stage", "/t/hook.sh")
    assert argv[:3] == ["mmdebstrap", "--variant=apt", "--format=directory"]
    assert '--customize-hook=/t/hook.sh "$1" /t/stage' in argv
    include = next(a for a in argv if a.startswith("--include="))
    assert "systemd" in include.split("=", 1)[1].split(",")
    assert argv[-6:-4] == ["bookworm", "/t/tree"]
    assert argv[-4] == "deb http://m/debian bookworm main"


def test_customize_script_enables_the_agent_and_installs_the_wheel() -> None:
    script = customize_script(unit_files=["cvm-agent.service"], man_pages=["cvm-agent.8"])
    assert "python3 -m venv /opt/cvmctl" in script
    assert "--no-index" in script and "cvmctl" in script
    assert "systemctl enable cvm-agent.service" in script
    assert "systemctl disable nginx.service memcached.service iperf3.service" in script
    assert "/usr/local/share/man/man$section/$page" in script


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        (None, None),
        ("10.0.2.15/24,10.0.2.2", "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"),
        ("10.213.0.2/30,10.213.0.1", "ip=10.213.0.2::10.213.0.1:255.255.255.252::eth0:off"),
    ],
)
def test_guest_cmdline(ip: str | None, expected: str | None) -> None:
    words = guest_cmdline(console="ttyS0", ip=ip).split()
    assert words[:3] == ["root=LABEL=cvm-root", "rw", "console=ttyS0"]
    assert [w for w in words if w.startswith("ip=")] == ([expected] if expected else [])


def test_cache_key_changes_with_any_input() -> None:
    base = [("a", b"1"), ("b", b"2")]
    assert cache_key(base) == cache_key(list(base))
    assert cache_key(base) != cache_key([("a", b"1"), ("b", b"3")])
    assert cache_key(base) != cache_key([("a", b"1"), ("c", b"2")])


def test_source_files_cover_the_packages() -> None:
    root = source_tree(REPO_ROOT)
    names = {f.relative_to(root).as_posix() for f in source_files(root)}
    assert "pyproject.toml" in names
    assert "guest_agent/main.py" in names and "workloads/sandbox.py" in names
    assert not any("__pycache__" in n for n in names)
    with pytest.raises(ImageBuildError, match="source checkout"):
        source_tree(REPO_ROOT / "tests")


def fake_image(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name in ("root.img", "vmlinuz", "initrd.img"):
        (directory / name).write_bytes(b"x")
    record = {"kernel_release": "6.12.95+deb12-amd64", "root_bytes": 1, "packages": 2}
    (directory / "manifest.json").write_text(json.dumps(record))
    return directory


def test_spec_image_names_and_paths(tmp_path: Path) -> None:
    assert parse_spec('name = "a"\nimage = "debian"\n').image == "debian"
    spec = parse_spec('name = "a"\nimage = "img/x"\n', base_dir=tmp_path)
    assert spec.image == str(tmp_path / "img/x")
    with pytest.raises(SpecError, match="image"):
        parse_spec('name = "a"\nimage = 3\n')
    with pytest.raises(SpecError, match=r"boot\.kernel"):
        parse_spec('name = "a"\nimage = "debian"\n[boot]\nkernel = "/k"\n')


def test_complete_with_an_image_directory(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img")
    spec = parse_spec(f'name = "a"\nimage = "{image}"\n[network]\nmode = "user"\n')
    done = complete_with_debian_image(spec)
    assert done.boot.kernel == image / "vmlinuz" and done.boot.initrd == image / "initrd.img"
    assert "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off" in done.boot.cmdline
    assert done.disks[0].path == image / "root.img" and done.disks[0].snapshot
    runtime = Runtime(
        accel="tcg",
        qmp_socket=tmp_path / "q",
        pidfile=tmp_path / "p",
        serial_log=tmp_path / "s",
        agent_channel="vhost-vsock",
        guest_cid=3,
    )
    argv = build_qemu_argv(done, runtime)
    drive = argv[argv.index("-drive") + 1]
    assert f"file={image / 'root.img'}" in drive and "snapshot=on" in drive.split(",")


def test_missing_images_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="cvmctl image build debian"):
        current_image(tmp_path)
    with pytest.raises(ImageBuildError, match="not a built Debian guest image"):
        load_image(tmp_path)


def test_the_scratch_unit_mounts_the_disk_the_daemon_attaches() -> None:
    """systemd/cvm-scratch.service names the daemon's serial and the guest directory the
    workloads are told (cvmcore.defaults), and is wanted by that disk's device unit."""
    text = (REPO_ROOT / "systemd" / "cvm-scratch.service").read_text()
    by_id = f"/dev/disk/by-id/virtio-{SCRATCH_SERIAL}"
    # systemd.unit(5) path escaping: "/" -> "-", "-" -> "\x2d", the leading "/" dropped
    device = by_id.strip("/").replace("-", "\\x2d").replace("/", "-") + ".device"
    assert f"mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 {by_id}" in text
    assert f"mount -t ext4 {by_id} {GUEST_SCRATCH_DIR}" in text
    for key in ("BindsTo", "After", "WantedBy"):
        assert f"{key}={device}" in text
    assert "cvm-scratch.service" in UNIT_FILES and "cvm-scratch.service" in SERVICES_ON
    assert "e2fsprogs" in Recipe().packages
