#!/usr/bin/env python3
"""Record the kernel files the guest agent reads into a small fixture tree.

    scripts/record-sysroot.py tests/fixtures/sysroots/<name> [--max-cpus 4] [--mount-debugfs]

Copies, keeping the paths relative to ``/``:

* ``/sys/devices/system/cpu/cpuidle/*`` and ``/sys/devices/system/cpu/cpuN/cpuidle/stateK/*``
  for the first ``--max-cpus`` CPUs;
* ``/sys/module/haltpoll/parameters/*`` and ``/sys/module/cpuidle_haltpoll/`` (its
  ``parameters/`` and, for a loaded module, ``initstate``);
* ``/proc/stat`` (the ``cpuN`` lines of the recorded CPUs only), ``/proc/pressure/*``,
  ``/proc/cmdline``, ``/proc/sys/kernel/osrelease``, and the first ``--max-cpus``
  processor blocks of ``/proc/cpuinfo``;
* ``/sys/kernel/debug/swiotlb/*`` when debugfs is mounted (or, with ``--mount-debugfs``, after
  mounting it read-only on a temporary directory, which is unmounted afterwards);
* configfs-tsm report providers and ``/dev/sev-guest`` / ``/dev/tdx_guest`` (as empty files).

Files that cannot be read (e.g. ``rejected`` on older kernels) are skipped, so the tree
shows exactly what that kernel offers. A ``RECORDED`` file notes the date, ``uname -a`` and
the command line. Only reads the live system; never writes to /sys or /proc.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path("/")


def copy_file(source: Path, tree: Path, relative: str | None = None, text: str | None = None) -> None:
    if text is None:
        try:
            text = source.read_text(encoding="latin-1")
        except OSError:
            return
    target = tree / (relative or str(source.relative_to(ROOT)))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="latin-1")


def copy_dir_files(source: Path, tree: Path, relative: str | None = None) -> None:
    if not source.is_dir():
        return
    for entry in sorted(source.iterdir()):
        if entry.is_file():
            rel = None if relative is None else f"{relative}/{entry.name}"
            copy_file(entry, tree, rel)


def record(tree: Path, max_cpus: int, mount_debugfs: bool) -> None:
    cpu_dir = ROOT / "sys/devices/system/cpu"
    copy_dir_files(cpu_dir / "cpuidle", tree)
    cpus = sorted(int(m.group(1)) for e in cpu_dir.iterdir() if (m := re.fullmatch(r"cpu(\d+)", e.name)))
    recorded_cpus = cpus[:max_cpus]
    for cpu in recorded_cpus:
        idle = cpu_dir / f"cpu{cpu}/cpuidle"
        if idle.is_dir():
            for state in sorted(idle.iterdir()):
                copy_dir_files(state, tree)

    copy_dir_files(ROOT / "sys/module/haltpoll/parameters", tree)
    driver_module = ROOT / "sys/module/cpuidle_haltpoll"
    copy_dir_files(driver_module / "parameters", tree)
    copy_file(driver_module / "initstate", tree)

    stat_lines = []
    for line in (ROOT / "proc/stat").read_text().splitlines():
        match = re.match(r"cpu(\d+) ", line)
        if match and int(match.group(1)) not in recorded_cpus:
            continue
        stat_lines.append(line)
    copy_file(ROOT / "proc/stat", tree, text="\n".join(stat_lines) + "\n")
    for resource in ("cpu", "memory", "io"):
        copy_file(ROOT / "proc/pressure" / resource, tree)
    copy_file(ROOT / "proc/cmdline", tree)
    copy_file(ROOT / "proc/sys/kernel/osrelease", tree)
    blocks = (ROOT / "proc/cpuinfo").read_text().strip("\n").split("\n\n")
    copy_file(ROOT / "proc/cpuinfo", tree, text="\n\n".join(blocks[:max_cpus]) + "\n\n")

    tsm = ROOT / "sys/kernel/config/tsm/report"
    if tsm.is_dir():
        for entry in sorted(tsm.iterdir()):
            copy_file(entry / "provider", tree)
    for device in ("dev/sev-guest", "dev/tdx_guest"):
        if (ROOT / device).exists():
            copy_file(ROOT / device, tree, device, text="")

    debugfs = ROOT / "sys/kernel/debug"
    if (debugfs / "swiotlb").is_dir():
        copy_dir_files(debugfs / "swiotlb", tree, "sys/kernel/debug/swiotlb")
    elif mount_debugfs:
        with tempfile.TemporaryDirectory() as mount_point:
            done = subprocess.run(["mount", "-t", "debugfs", "-o", "ro", "debugfs", mount_point], check=False)
            if done.returncode == 0:
                try:
                    copy_dir_files(Path(mount_point) / "swiotlb", tree, "sys/kernel/debug/swiotlb")
                finally:
                    subprocess.run(["umount", mount_point], check=True)

    uname = " ".join(os.uname())
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    (tree / "RECORDED").write_text(
        f"recorded {now} by scripts/record-sysroot.py {' '.join(sys.argv[1:])}\nuname: {uname}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path, help="output directory (replaced)")
    parser.add_argument("--max-cpus", type=int, default=4)
    parser.add_argument("--mount-debugfs", action="store_true", help="mount debugfs read-only if needed")
    args = parser.parse_args()
    if args.tree.exists():
        shutil.rmtree(args.tree)
    args.tree.mkdir(parents=True)
    record(args.tree, args.max_cpus, args.mount_debugfs)
    print(f"recorded into {args.tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
