"""``cvmctl image``: build and inspect the built-in dev guest (kernel + initramfs).

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
from cvmctl.cli.output import print_table
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
  cvmctl image build --json --agent /opt/cvmctl/bin/cvm-agent
  cvmctl image clean

inputs (see scripts/install-guest-kernel.sh):
  $CVM_GUEST_KERNEL_DIR/kernel    extracted kernel package (default /var/cache/cvmctl/guest-kernel)
  $CVM_GUEST_KERNEL_DIR/busybox   extracted busybox-static
output:
  $XDG_CACHE_HOME/cvmctl/dev-guest/<key>/{vmlinuz,initramfs.cpio.gz,manifest.json}
"""


def default_agent() -> str:
    """The ``cvm-agent`` beside the running interpreter (the project's venv)."""
    return str(Path(sys.executable).parent / "cvm-agent")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "image",
        help="build the built-in dev guest (kernel + initramfs)",
        description="Build and cache the dev guest: Debian's backports kernel, busybox-static and an "
        "/init that boots the host's root over 9p and runs the agent.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="image commands", metavar="COMMAND", required=True)

    build = commands.add_parser(
        "build",
        help="build the dev guest, or find it in the cache",
        description="Build the dev guest's initramfs (cached by a hash of every input) and print "
        "the kernel, initramfs and kernel command line to boot it with.",
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
        help="where images go (default: $XDG_CACHE_HOME/cvmctl/dev-guest)",
    )
    build.add_argument(
        "--agent",
        metavar="PATH",
        help="agent for the printed command line (default: the cvm-agent installed beside cvmctl)",
    )
    build.add_argument("--port", type=int, default=AGENT_VSOCK_PORT, help="agent vsock port")
    build.set_defaults(func=run_build)

    clean = commands.add_parser("clean", help="remove cached images except the current one")
    clean.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where images are (default: $XDG_CACHE_HOME/cvmctl/dev-guest)",
    )
    clean.add_argument("--json", action="store_true", help='print {"kept": KEY, "removed": [DIR, ...]}')
    clean.set_defaults(func=run_clean)


def run_build(args: argparse.Namespace) -> int:
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


def run_clean(args: argparse.Namespace) -> int:
    image = build_dev_guest(cache_dir=args.cache_dir)
    removed = remove_cached_images(args.cache_dir, keep=image.key)
    if args.json:
        print(json.dumps({"kept": image.key, "removed": [str(p) for p in removed]}, indent=2))
        return 0
    for path in removed:
        print(f"removed {path}")
    return 0
