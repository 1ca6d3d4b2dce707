"""Boot timing of the built-in dev guest through cvm-hostd, phase by phase.

Starts a private cvm-hostd, boots the dev guest N times (default 3) under whatever
``accel = "auto"`` picks here (TCG on these machines), and prints the median of each phase:

    daemon     StartVM request -> QEMU exec (the daemon's own overhead; goal <= 50 ms)
    spawn      QEMU exec -> QMP ready
    firmware   -> the kernel's first console line
    kernel     -> the init's first marker
    userspace  -> the agent answering health over hybrid vsock

and the total, boot to agent-ready (goal under TCG here: <= 20 s).

    .venv/bin/python benchmarks/boot.py [--boots 3] [--memory 1G]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def cvmctl(env: dict[str, str], *args: str, timeout: float = 300) -> dict[str, object]:
    result = subprocess.run(
        [str(BIN / "cvmctl"), *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"cvmctl {' '.join(args)} failed: {result.stderr.strip()}")
    data: dict[str, object] = json.loads(result.stdout)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--memory", default="1G")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cvm-boot-") as tmp:
        sock = f"{tmp}/h.sock"
        env = {**os.environ, "CVM_HOSTD": f"unix://{sock}"}
        daemon = subprocess.Popen(
            [
                str(BIN / "cvm-hostd"),
                "--state-dir",
                f"{tmp}/s",
                "--listen",
                f"unix://{sock}",
                "--log-level",
                "warning",
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            while not Path(sock).exists():
                time.sleep(0.02)
            spec = Path(tmp) / "dev.toml"
            spec.write_text(f'name = "bench"\nvcpus = 1\nmemory = "{args.memory}"\n')
            cvmctl(env, "vm", "create", "-f", str(spec))
            phases: dict[str, list[float]] = {}
            for boot in range(1, args.boots + 1):
                vm = cvmctl(env, "vm", "start", "bench", "--wait-timeout", "300", timeout=330)
                booted = {str(p["name"]): float(p["seconds"]) for p in vm["boot_phases"]}  # type: ignore[attr-defined]
                for name, seconds in booted.items():
                    phases.setdefault(name, []).append(seconds)
                total = sum(v for k, v in booted.items() if k != "daemon")
                print(
                    f"boot {boot}: "
                    + "  ".join(f"{k} {v:.3f}s" for k, v in booted.items())
                    + f"  total {total:.2f}s"
                )
                cvmctl(env, "vm", "kill", "bench")
        finally:
            daemon.terminate()
            daemon.wait(15)

    print(f"\n{'phase':<10} {'median':>9}   (of {args.boots} boots)")
    for name, values in phases.items():
        print(f"{name:<10} {statistics.median(values):>8.3f}s")
    daemon_ms = statistics.median(phases.get("daemon", [0.0])) * 1e3
    totals = [sum(phases[name][i] for name in phases if name != "daemon") for i in range(args.boots)]
    ready = statistics.median(totals)
    print(
        f"\ndaemon overhead (API call -> QEMU exec): {daemon_ms:.1f} ms   goal <= 50 ms   "
        f"{'ok' if daemon_ms <= 50 else 'MISSED'}"
    )
    print(
        f"boot to agent-ready: {ready:.2f} s   goal <= 20 s under TCG   {'ok' if ready <= 20 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
