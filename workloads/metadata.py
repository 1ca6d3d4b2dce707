"""What a run records about the machine it ran on (the local target's part of the metadata).

PerfKitBenchmarker, pyperf and hyperfine record enough to tell two runs apart after the
fact; the issue asks for: kernel and command line, cpuidle driver and governor, haltpoll
parameters, TEE, QEMU version, VM spec, host CPU model (with microcode, SMT, frequency
governor), tool versions, cvmctl version and commit, and a noise snapshot (load, steal,
CPU pressure). The VM target adds the VM fields (spec, QEMU, boot phases) to the same dict.

Everything here reads files and runs ``dpkg-query`` / ``git`` with short deadlines;
anything that cannot be read is simply left out (a missing key means "not collectable
here", never a guess). Paths are relative to ``root`` so tests can use a recorded tree.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cvmcore

CPUIDLE = "sys/devices/system/cpu/cpuidle"
HALTPOLL = "sys/module/haltpoll/parameters"


def _read(root: Path, relative: str) -> str | None:
    try:
        return (root / relative).read_text(errors="replace").strip()
    except OSError:
        return None


def _run(argv: list[str], timeout: float = 2.0, cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_info(cpuinfo: str) -> dict[str, str]:
    """Model name and microcode of the first CPU in ``/proc/cpuinfo`` text."""
    info: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block only
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "microcode"):
            info["cpu_model" if key == "model name" else "cpu_microcode"] = value.strip()
    return info


def steal_fraction(proc_stat: str) -> float | None:
    """Steal time as a fraction of all CPU time since boot, from the ``cpu`` line of /proc/stat."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu" and len(fields) > 8:
            values = [int(v) for v in fields[1:]]
            total = sum(values[:8])
            return values[7] / total if total else None
    return None


TeeDetector = Callable[[Path], str]
"""Names the TEE of the machine under a root ("none", "sev-snp", "tdx"): the agent's detector,
handed in by the caller so that the catalogue does not depend on the agent."""


def _tee_name(root: Path, detect_tee: TeeDetector | None) -> str:
    if detect_tee is None:
        return "unknown"
    try:
        return detect_tee(root)
    except Exception:  # a probe that fails must not fail a benchmark
        return "unknown"


def machine_metadata(root: Path = Path("/"), detect_tee: TeeDetector | None = None) -> dict[str, Any]:
    """Kernel, CPU, idle and noise facts of this machine (see the module docstring)."""
    meta: dict[str, Any] = {"kernel": platform.release()}
    meta["arch"] = platform.machine()
    if (cmdline := _read(root, "proc/cmdline")) is not None:
        meta["cmdline"] = cmdline
    meta.update(cpu_info(_read(root, "proc/cpuinfo") or ""))
    meta["cpus"] = os.cpu_count()
    if (smt := _read(root, "sys/devices/system/cpu/smt/active")) is not None:
        meta["smt_active"] = smt
    if (governor := _read(root, "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")) is not None:
        meta["cpufreq_governor"] = governor
    meta["cpuidle_driver"] = _read(root, f"{CPUIDLE}/current_driver") or "none"
    meta["cpuidle_governor"] = (
        _read(root, f"{CPUIDLE}/current_governor") or _read(root, f"{CPUIDLE}/current_governor_ro") or "none"
    )
    haltpoll_dir = root / HALTPOLL
    if haltpoll_dir.is_dir():
        meta["haltpoll"] = {
            p.name: value
            for p in sorted(haltpoll_dir.iterdir())
            if (value := _read(root, f"{HALTPOLL}/{p.name}"))
        }
    meta["tee"] = _tee_name(root, detect_tee)
    # noise snapshot
    if (loadavg := _read(root, "proc/loadavg")) is not None:
        meta["loadavg"] = " ".join(loadavg.split()[:3])
    if (pressure := _read(root, "proc/pressure/cpu")) is not None:
        meta["cpu_pressure"] = pressure.splitlines()[0]
    steal = steal_fraction(_read(root, "proc/stat") or "")
    if steal is not None:
        meta["steal_fraction_since_boot"] = round(steal, 6)
    return meta


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """{Debian package: installed version} for the packages that are installed."""
    versions = {}
    for package in sorted(set(packages)):
        version = _run(["dpkg-query", "-W", "-f=${Version}", package])
        if version:
            versions[package] = version
    return versions


def cvmctl_metadata() -> dict[str, Any]:
    """cvmctl's version and, from a git checkout, the commit (with ``-dirty`` if modified)."""
    meta: dict[str, Any] = {"cvmctl_version": cvmcore.__version__}
    source = Path(cvmcore.__file__).resolve().parent.parent
    commit = _run(["git", "rev-parse", "HEAD"], cwd=source)
    if commit:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source)
        meta["cvmctl_commit"] = commit + ("-dirty" if dirty else "")
    return meta


def run_metadata(tool_packages: Iterable[str], detect_tee: TeeDetector | None = None) -> dict[str, Any]:
    """Everything the local side records for a run: machine, tool versions, cvmctl, time."""
    return {
        "host": machine_metadata(detect_tee=detect_tee),
        "tools": package_versions(tool_packages),
        **cvmctl_metadata(),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
