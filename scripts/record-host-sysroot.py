#!/usr/bin/env python3
"""Record the host files ``cvmctl host check`` reads into a small fixture tree.

    scripts/record-host-sysroot.py tests/fixtures/hostroots/<name>

Copies, keeping the paths relative to ``/``: the first processor block of ``/proc/cpuinfo``;
``/sys/module/{kvm,kvm_amd,kvm_intel}/parameters/*``; ``/sys/kernel/mm/hugepages/*/
{nr,free}_hugepages``; ``/etc/qgs.conf``; and, as empty regular files standing in for the
device nodes, ``/dev/kvm``, ``/dev/sev`` and ``/dev/vhost-vsock`` where they exist (the
check opens ``/dev/kvm`` and ``/dev/sev`` read-write: a regular file opens, so record as a
user who could open the real ones, or delete the stand-in). The QGS unix socket cannot be
copied; a test that needs it binds one. A ``RECORDED`` file notes the date, ``uname -a`` and
the command line. Only reads the live system.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path("/")


def copy(tree: Path, relative: str, text: str | None = None) -> None:
    source = ROOT / relative
    if text is None:
        try:
            text = source.read_text(encoding="latin-1")
        except OSError:
            return
    target = tree / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="latin-1")


def record(tree: Path) -> None:
    cpuinfo = (ROOT / "proc/cpuinfo").read_text(encoding="latin-1")
    copy(tree, "proc/cpuinfo", cpuinfo.split("\n\n")[0].rstrip("\n") + "\n")
    for module in ("kvm", "kvm_amd", "kvm_intel"):
        params = ROOT / "sys/module" / module / "parameters"
        if params.is_dir():
            for entry in sorted(params.iterdir()):
                copy(tree, str(entry.relative_to(ROOT)))
    pools = ROOT / "sys/kernel/mm/hugepages"
    if pools.is_dir():
        for pool in sorted(pools.iterdir()):
            for name in ("nr_hugepages", "free_hugepages"):
                copy(tree, str((pool / name).relative_to(ROOT)))
    copy(tree, "etc/qgs.conf")
    for device in ("dev/kvm", "dev/sev", "dev/vhost-vsock"):
        if os.path.exists(ROOT / device):
            copy(tree, device, "")
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False).stdout.strip()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    (tree / "RECORDED").write_text(f"{when}\n{uname}\n{' '.join(sys.argv)}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("tree", type=Path, help="where the fixture tree goes (created)")
    args = parser.parse_args()
    args.tree.mkdir(parents=True, exist_ok=True)
    record(args.tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
