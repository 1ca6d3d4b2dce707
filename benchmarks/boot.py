"""Boot timing of the built-in dev guest through cvm-hostd, phase by phase, and what devices add.

Starts a private cvm-hostd and boots the dev guest under whatever ``accel = "auto"`` picks
here (TCG on these machines) in each configuration, N times each (default 3), alternating
between them so that a machine's load drifts over all alike, one VM at a time:

    plain      the dev guest (1 vCPU, --memory, no NIC, the agent over vsock)
    +disk      the same with the scratch disk every built-in target has ([scratch], --scratch):
               the daemon creates and reserves its file (in the "daemon" phase), QEMU opens
               it with O_DIRECT and an iothread, the guest probes a virtio-blk device
    +nic       the same with the NIC a built-in target has as root ([network] mode = "tap"):
               the daemon makes the VM's network namespace and tap (in the "daemon" phase),
               QEMU runs in it and opens the tap, the guest probes virtio-net and sets eth0 up
               (root only: skipped otherwise)
    +passt     the NIC a built-in target has without root: the daemon starts passt and waits
               for its socket, QEMU dials it (skipped where passt is not installed)
    debian     the Debian guest (`cvmctl image build debian`: systemd, the agent started by
               cvm-agent.service) with the same vCPUs and memory, when that image is built (or
               with --only debian); its kernel phase ends at systemd's first kernel-log line

It prints the median of each phase per configuration, side by side, with the difference:

    daemon     StartVM request -> QEMU exec (the daemon's own overhead; goal <= 50 ms)
    spawn      QEMU exec -> QMP ready
    firmware   -> the kernel's first console line
    kernel     -> the init's first marker
    userspace  -> the agent answering health over hybrid vsock

then the total, boot to agent-ready (goal under TCG here: <= 20 s), and what each device adds
to it (the median of the differences between boots run back to back; goal under TCG: <= 1 s).

    .venv/bin/python benchmarks/boot.py [--boots 3] [--memory 1G] [--scratch 2G] [--only plain ...]
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

from host_daemon import passt

BIN = Path(sys.executable).parent
PHASES = ("daemon", "spawn", "firmware", "kernel", "userspace")
DEVICE_GOAL_SECONDS = 1.0
DEBIAN_GOAL_SECONDS = 60.0
START_WAIT = 900  # a systemd guest under TCG on a loaded host


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


def configurations(memory: str, scratch: str) -> dict[str, str]:
    """Configuration name -> the VM spec booted for it (the VM's name is set per configuration),
    those this host can boot."""
    plain = f'vcpus = 1\nmemory = "{memory}"\n'
    configs = {
        "plain": plain,
        "+disk": plain + f'\n[scratch]\nsize = "{scratch}"\n',
        "debian": 'image = "debian"\n' + plain,
    }
    if os.geteuid() == 0:
        configs["+nic"] = plain + '\n[network]\nmode = "tap"\n'
    if passt.available():
        configs["+passt"] = plain + '\n[network]\nmode = "passt"\n'
    return configs


def debian_image_built() -> bool:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "cvmctl" / "debian-guest" / "current" / "manifest.json").is_file()


def total(phases: dict[str, float]) -> float:
    """Boot to agent-ready, as the user waits for it: every phase after the daemon's."""
    return sum(v for k, v in phases.items() if k != "daemon")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--boots", type=int, default=3, help="boots per configuration")
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--scratch", default="2G", help="the scratch disk's size (the built-in targets': 2G)")
    parser.add_argument("--only", action="append", help="run only this configuration (repeatable)")
    args = parser.parse_args()
    configs = configurations(args.memory, args.scratch)
    if args.only:
        unknown = set(args.only) - set(configs)
        if unknown:
            parser.error(f"unknown configuration {', '.join(sorted(unknown))} (known: {', '.join(configs)})")
        configs = {k: v for k, v in configs.items() if k in args.only}
    elif not debian_image_built():
        print("no Debian guest image (cvmctl image build debian): its row is left out", file=sys.stderr)
        del configs["debian"]
    vm_names = {name: "bench-" + ("plain" if name == "plain" else name.lstrip("+")) for name in configs}

    # phases[config][phase] -> one value per boot; totals[config] -> one value per boot
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in configs}
    totals: dict[str, list[float]] = {name: [] for name in configs}
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
                "--boot-timeout",
                str(START_WAIT),
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            while not Path(sock).exists():
                time.sleep(0.02)
            for name, body in configs.items():
                spec = Path(tmp) / f"{vm_names[name]}.toml"
                spec.write_text(f'name = "{vm_names[name]}"\n{body}')
                cvmctl(env, "vm", "create", "-f", str(spec))
            for boot in range(1, args.boots + 1):
                for name in configs:
                    wait = ("--wait-timeout", str(START_WAIT))
                    vm = cvmctl(env, "vm", "start", vm_names[name], *wait, timeout=START_WAIT + 30)
                    booted = {str(p["name"]): float(p["seconds"]) for p in vm["boot_phases"]}  # type: ignore[attr-defined]
                    for phase, seconds in booted.items():
                        phases[name].setdefault(phase, []).append(seconds)
                    totals[name].append(total(booted))
                    print(
                        f"boot {boot} {name:<6} "
                        + "  ".join(f"{k} {v:.3f}s" for k, v in booted.items())
                        + f"  total {total(booted):.2f}s",
                        flush=True,
                    )
                    cvmctl(env, "vm", "kill", vm_names[name])
            for name in configs:
                cvmctl(env, "vm", "rm", vm_names[name])
        finally:
            daemon.terminate()
            daemon.wait(15)

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    names = list(configs)
    base = names[0]
    header = f"{'phase':<10}" + "".join(f"{n:>10}" for n in names)
    header += "".join(f"{n + ' - ' + base:>18}" for n in names[1:])
    print(f"\nmedians of {args.boots} boots each\n{header}")
    for phase in PHASES:
        if not any(phase in phases[n] for n in names):
            continue
        row = [median(phases[n].get(phase, [])) for n in names]
        line = f"{phase:<10}" + "".join(f"{v:>9.3f}s" for v in row)
        line += "".join(f"{(v - row[0]) * 1e3:>+16.0f}ms" for v in row[1:])
        print(line)
    row = [median(totals[n]) for n in names]
    line = f"{'total':<10}" + "".join(f"{v:>9.2f}s" for v in row)
    line += "".join(f"{(v - row[0]) * 1e3:>+16.0f}ms" for v in row[1:])
    print(line)

    daemon_ms = median(phases[base].get("daemon", [0.0])) * 1e3
    print(
        f"\ndaemon overhead (API call -> QEMU exec, {base}): {daemon_ms:.1f} ms   goal <= 50 ms   "
        f"{'ok' if daemon_ms <= 50 else 'MISSED'}"
    )
    ready = median(totals[base])
    print(
        f"boot to agent-ready ({base}): {ready:.2f} s   goal <= 20 s under TCG   "
        f"{'ok' if ready <= 20 else 'MISSED'}"
    )
    if "debian" in totals:
        debian = median(totals["debian"])
        verdict = "ok" if debian <= DEBIAN_GOAL_SECONDS else "MISSED"
        print(
            f"boot to agent-ready (debian, systemd + cvm-agent.service): {debian:.2f} s   "
            f"goal <= {DEBIAN_GOAL_SECONDS:g} s under TCG   {verdict}"
        )
    for name in names[1:]:
        if name == "debian":
            continue  # another guest, not a device added to this one
        # boot i of each configuration ran back to back: the median of those paired differences
        added = median([t - b for t, b in zip(totals[name], totals[base], strict=True)])
        daemon_added = (median(phases[name].get("daemon", [0.0])) * 1e3) - daemon_ms
        print(
            f"{name} adds {added:+.2f} s to boot (daemon {daemon_added:+.1f} ms)   "
            f"goal <= {DEVICE_GOAL_SECONDS:g} s under TCG   "
            f"{'ok' if added <= DEVICE_GOAL_SECONDS else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
