"""``cvmctl image``: build and inspect the guest images (the dev guest, the Debian guest).

``cvmctl image build debian`` makes the production guest (:mod:`host_daemon.debimage`):
Debian 12 from Debian's packages with mmdebstrap, systemd, the agent installed from a wheel
of this checkout and started by its unit, the man pages generated here
(:mod:`cvmctl.manpages`). A VM spec boots it with ``image = "debian"``.

``cvmctl image build`` makes the dev guest from the kernel and busybox that
``scripts/install-guest-kernel.sh`` fetched, or finds it in the cache when nothing changed,
and prints where the kernel and initramfs are and the kernel command line that boots the
project's agent. ``cvmctl image clean`` removes cached images other than the current one.
The work is in the host_daemon.devguest package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cvmcore.defaults import AGENT_VSOCK_PORT
from cvmcore.errors import UsageError
from cvmctl.cli.output import print_table
from cvmctl.manpages import pages
from host_daemon.debimage import Recipe, build_debian_image
from host_daemon.debimage import current_key as current_debian_key
from host_daemon.debimage import remove_cached_images as remove_debian_images
from host_daemon.devguest import (
    build_dev_guest,
    dev_guest_cmdline,
    find_guest_kernel,
    remove_cached_images,
)

CACHE_HELP = "$XDG_CACHE_HOME/cvmctl/dev-guest"

EXAMPLES = """\
examples:
  cvmctl image build
  cvmctl image build debian          # Debian 12 + systemd + the agent's unit (root; minutes once)
  cvmctl image build --json --agent /opt/cvmctl/bin/cvm-agent
  cvmctl image clean

inputs (see scripts/install-guest-kernel.sh):
  $CVM_GUEST_KERNEL_DIR/kernel    extracted kernel package (default /var/cache/cvmctl/guest-kernel)
  $CVM_GUEST_KERNEL_DIR/busybox   extracted busybox-static
output:
  $XDG_CACHE_HOME/cvmctl/dev-guest/<key>/{vmlinuz,initramfs.cpio.gz,manifest.json}
  $XDG_CACHE_HOME/cvmctl/debian-guest/<key>/{root.img,vmlinuz,initrd.img,packages.txt,manifest.json}
  (debian-guest/current names the last Debian image built: what `image = "debian"` boots)
"""


def default_agent() -> str:
    """The ``cvm-agent`` beside the running interpreter (the project's venv)."""
    return str(Path(sys.executable).parent / "cvm-agent")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "image",
        help="build the guest images (dev: kernel + initramfs; debian: a systemd disk image)",
        description="Build and cache the guest images. dev: Debian's backports kernel, busybox-static "
        "and an /init that boots the host's root over 9p and runs the agent. debian: a Debian 12 "
        "system under systemd with cvmctl installed from this checkout's wheel and the agent "
        "started by cvm-agent.service (docs/debian-guest.md).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="image commands", metavar="COMMAND", required=True)

    build = commands.add_parser(
        "build",
        help="build a guest image, or find it in the cache",
        description="Build the dev guest's initramfs or the Debian guest's disk image (each cached by "
        "a hash of every input) and print the files to boot it with. The Debian build needs root "
        "(mmdebstrap, from scripts/install-image-tools.sh) and the Debian mirror apt uses.",
    )
    build.add_argument(
        "image",
        nargs="?",
        choices=("dev", "debian"),
        default="dev",
        help="which image (default: dev)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even when the cache has it")
    build.add_argument("--json", action="store_true", help="print JSON instead of a table")
    build.add_argument(
        "--kernel-tree",
        type=Path,
        metavar="DIR",
        help="an extracted kernel package (boot/vmlinuz-*, lib/modules/*) instead of the installed one",
    )
    build.add_argument("--busybox", type=Path, metavar="PATH", help="a static busybox binary")
    build.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where images go (default: $XDG_CACHE_HOME/cvmctl/dev-guest or debian-guest)",
    )
    build.add_argument(
        "--agent",
        metavar="PATH",
        help="agent for the printed command line (default: the cvm-agent installed beside cvmctl)",
    )
    build.add_argument("--port", type=int, default=AGENT_VSOCK_PORT, help="agent vsock port")
    build.add_argument(
        "--mirror",
        metavar="URL",
        help=f"debian: the Debian mirror (default: {Recipe.mirror}, as apt's sources name it)",
    )
    build.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="debian: the cvmctl checkout whose wheel is installed (default: the one running)",
    )
    build.set_defaults(func=run_build)

    clean = commands.add_parser("clean", help="remove cached images except the current one")
    clean.add_argument(
        "image", nargs="?", choices=("dev", "debian"), default="dev", help="which image (default: dev)"
    )
    clean.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where images are (default: $XDG_CACHE_HOME/cvmctl/dev-guest or debian-guest)",
    )
    clean.add_argument("--json", action="store_true", help='print {"kept": KEY, "removed": [DIR, ...]}')
    clean.set_defaults(func=run_clean)


DEV_ONLY = ("kernel_tree", "busybox", "agent")


def run_build(args: argparse.Namespace) -> int:
    if args.image == "debian":
        return run_build_debian(args)
    if args.mirror is not None or args.source is not None:
        raise UsageError("--mirror and --source are for `cvmctl image build debian`")
    cmdline = dev_guest_cmdline(args.agent or default_agent(), port=args.port)  # validate before the work
    kernel = find_guest_kernel(args.kernel_tree) if args.kernel_tree is not None else None
    image = build_dev_guest(kernel=kernel, busybox=args.busybox, cache_dir=args.cache_dir, force=args.force)
    if args.json:
        print(json.dumps(image.to_json() | {"cmdline": cmdline}, indent=2, sort_keys=True))
        return 0
    print_table(
        [
            ("key", image.key),
            ("kernel", f"{image.kernel} ({image.kernel_release})"),
            ("initrd", f"{image.initrd} ({image.initrd_bytes / 1e6:.2f} MB)"),
            ("modules", " ".join(image.modules)),
            ("cmdline", cmdline),
            ("built", "cached" if image.cached else f"in {image.build_seconds:.2f} s"),
        ]
    )
    return 0


def run_build_debian(args: argparse.Namespace) -> int:
    used = [f"--{name.replace('_', '-')}" for name in DEV_ONLY if getattr(args, name) is not None]
    if used:
        raise UsageError(f"{', '.join(used)}: only for the dev guest, not `image build debian`")
    recipe = Recipe(mirror=args.mirror) if args.mirror else Recipe()
    image = build_debian_image(
        man_pages={name: text.encode() for name, text in pages().items()},
        recipe=recipe,
        source=args.source,
        cache=args.cache_dir,
        force=args.force,
    )
    if args.json:
        print(json.dumps(image.to_json(), indent=2, sort_keys=True))
        return 0
    print_table(
        [
            ("key", image.key),
            ("root", f"{image.root} ({image.root_bytes / 1e6:.0f} MB, ext4)"),
            ("kernel", f"{image.kernel} ({image.kernel_release})"),
            ("initrd", str(image.initrd)),
            ("packages", f"{image.packages} (list: {image.directory / 'packages.txt'})"),
            ("built", "cached" if image.cached else f"in {image.build_seconds:.0f} s"),
            ("use", 'image = "debian" in a VM spec'),
        ]
    )
    return 0


def run_clean(args: argparse.Namespace) -> int:
    keep: str | None
    if args.image == "debian":
        keep = current_debian_key(args.cache_dir)
        removed = remove_debian_images(args.cache_dir, keep=keep)
    else:
        keep = build_dev_guest(cache_dir=args.cache_dir).key
        removed = remove_cached_images(args.cache_dir, keep=keep)
    if args.json:
        print(json.dumps({"kept": keep, "removed": [str(p) for p in removed]}, indent=2))
        return 0
    for path in removed:
        print(f"removed {path}")
    return 0
