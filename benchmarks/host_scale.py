"""The host exporter following many VMs: its CPU per VM at a 1 s interval, and scrape latency.

Real QEMU processes are expensive here (TCG, 2 cores), so the fleet is mostly stood up by
this script: ``--vms`` VMs in all, of which

- ``--real-qemu`` are real QEMU processes (paused with ``-S``, TCG, no guest): a real QMP
  monitor (``query-stats-schemas`` says no KVM, so each refresh asks ``query-status``) and a
  real process tree for procfs;
- the rest are fake QMP monitors (``tests/host_metrics/fake_qmp.py``, one process serving
  every socket) answering ``query-stats`` with KVM statistics of two vCPUs, so the
  exporter does its full KVM work for them; their procfs reads hit the fleet process;
- ``--agents`` of them also have a real ``cvm-agent`` on a unix socket (reading the recorded
  SNP guest tree), fetched every 5 s and re-exported.

The exporter (``HostCollector`` + its HTTP server) runs in this process; the fleet and the
agents run in others, so this process's CPU time (``getrusage``, all threads) is the
exporter's cost. After a warm-up, CPU is measured over ``--seconds`` without scrapes; then
``--scrapes`` scrapes of ``/metrics`` (a new connection each, as Prometheus does) measure
latency, and one per-VM guest path and ``/sd`` are timed too.

    .venv/bin/python benchmarks/host_scale.py [--vms 64] [--real-qemu 4] [--agents 8]
        [--seconds 30] [--scrapes 50] [--json out.json]

Goal (issue 7): at 64 VMs and a 1 s interval, <= 5 % of one core in all.

The libvirt row (``--libvirt N``): a private libvirtd (``tests/host_metrics/libvirt_env.py``)
runs N TCG domains, started paused; the exporter follows them with ``--libvirt`` alone (one
``virConnectListAllDomains`` + ``virConnectGetAllDomainStats`` per refresh, procfs of each
domain's QEMU), and then, for comparison, N paused QEMUs of its own (QMP ``query-status`` and
procfs each refresh). The row gives the exporter's CPU per followed domain and per own VM, their
ratio (goal, issue 16: within 1.5x), and the CPU libvirtd spent answering meanwhile.

    .venv/bin/python benchmarks/host_scale.py --libvirt 4 [--seconds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from host_daemon.metrics.collector import HostCollector
from host_daemon.metrics.http import HostEndpoint, serve_host_metrics_http
from host_daemon.metrics.state import VMView
from host_daemon.qmp import open_qmp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the test bed lives with the tests (the fake QMP fleet, the agent's argv)
SNP_TREE = REPO / "tests" / "fixtures" / "sysroots" / "snp-guest"
QEMU_ARGS = ("-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64", "-smp", "2")
PHASES = {"spawn": 0.1, "firmware": 1.2, "kernel": 2.3, "userspace": 3.4}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def get(port: int, path: str) -> tuple[float, int]:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"{path}: HTTP {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started, len(body)


def latency(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "p95_ms": ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))],
        "max_ms": ms[-1],
    }


def start_fleet(directory: Path, count: int) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.host_metrics.fake_qmp", "--dir", str(directory), "--count", str(count)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("ready"):
        raise SystemExit(f"the fake QMP fleet did not start: {line!r}")
    return process, int(line.split()[1])


def start_agent(directory: Path, index: int) -> tuple[subprocess.Popen[bytes], Path]:
    from tests.spine.agent_fixtures import agent_argv

    sock = directory / f"agent{index}.sock"
    process = subprocess.Popen(
        agent_argv(sock, directory / f"agent{index}", "--root", str(SNP_TREE)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, sock


def start_qemu(directory: Path, index: int) -> tuple[subprocess.Popen[bytes], Path]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("--real-qemu needs qemu-system-x86_64")
    sock = directory / f"qemu{index}.qmp"
    process = subprocess.Popen(
        [qemu, *QEMU_ARGS, "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, sock


async def real_qemu_views(
    stack: AsyncExitStack, qemus: list[tuple[subprocess.Popen[bytes], Path]]
) -> list[VMView]:
    """A view per real QEMU, with its QMP connection (closed by ``stack``) and vCPU thread ids."""
    views: list[VMView] = []
    for index, (process, sock) in enumerate(qemus):
        qmp = await stack.enter_async_context(open_qmp(sock, deadline=30, retry=True, name=f"qemu{index}"))
        cpus = await qmp.execute("query-cpus-fast", deadline=10)
        tids = tuple(int(cpu["thread-id"]) for cpu in cpus)
        views.append(VMView(f"qemu{index}", machine="q35", pid=process.pid, vcpu_tids=tids, qmp=qmp))
    return views


async def wait_for_path(path: Path, seconds: float) -> None:
    with trio.fail_after(seconds):
        while not path.exists():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    fake_count = args.vms - args.real_qemu
    fleet, fleet_pid = start_fleet(directory / "fleet", fake_count)
    agents = [start_agent(directory, i) for i in range(min(args.agents, args.vms))]
    qemus = [start_qemu(directory, i) for i in range(args.real_qemu)]
    processes: list[subprocess.Popen[Any]] = [fleet, *(p for p, _ in agents), *(p for p, _ in qemus)]
    try:
        for _, sock in agents:
            await wait_for_path(sock, 60)
        async with AsyncExitStack() as stack:
            views = await real_qemu_views(stack, qemus)
            for index in range(fake_count):
                sock = directory / "fleet" / f"vm{index}.qmp"
                qmp = await stack.enter_async_context(open_qmp(sock, deadline=10, name=f"vm{index}"))
                views.append(
                    VMView(
                        f"vm{index}",
                        tee="sev-snp",
                        machine="q35",
                        qemu_version="10.0.2",
                        pid=fleet_pid,
                        vcpu_tids=(fleet_pid, fleet_pid),
                        qmp=qmp,
                        boot_phases=PHASES,
                    )
                )
            for index, (_, sock) in enumerate(agents):  # the first VMs get a real agent
                views[index] = dataclasses.replace(views[index], agent_address=f"unix://{sock}")

            collector = HostCollector(lambda: views, interval=args.interval)
            refresh_times: list[float] = []
            refresh = collector.refresh_once

            async def timed_refresh() -> None:
                started = time.perf_counter()
                await refresh()
                refresh_times.append(time.perf_counter() - started)

            collector.refresh_once = timed_refresh  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                await nursery.start(collector.run)
                endpoint: HostEndpoint = await nursery.start(
                    serve_host_metrics_http, collector, "127.0.0.1", 0
                )
                await trio.sleep(args.warmup)
                refresh_times.clear()
                cpu0, wall0 = cpu_seconds(), time.perf_counter()
                await trio.sleep(args.seconds)
                cpu1, wall1 = cpu_seconds(), time.perf_counter()
                window_refreshes = list(refresh_times)
                scrapes: list[float] = []
                size = 0
                for _ in range(args.scrapes):
                    seconds, size = await trio.to_thread.run_sync(get, endpoint.port, "/metrics")
                    scrapes.append(seconds)
                guest = [
                    (await trio.to_thread.run_sync(get, endpoint.port, "/metrics/vm/vm0"))[0]
                    for _ in range(10)
                ]
                sd = [(await trio.to_thread.run_sync(get, endpoint.port, "/sd"))[0] for _ in range(10)]
                failures = {
                    name: state.parts
                    for name, state in collector.vms.items()
                    if not all(part.success for part in state.parts.values())
                }
                agents_up = sum(
                    1 for state in collector.vms.values() if state.guest is not None and state.guest.up
                )
                nursery.cancel_scope.cancel()
    finally:
        for process in processes:
            process.kill()
            process.wait(10)
    core_share = (cpu1 - cpu0) / (wall1 - wall0)
    return {
        "vms": args.vms,
        "real_qemu": args.real_qemu,
        "fake_qmp": fake_count,
        "agents": len(agents),
        "agents_up": agents_up,
        "interval_s": args.interval,
        "window_s": wall1 - wall0,
        "cpu_percent_of_one_core": 100 * core_share,
        "cpu_percent_per_vm": 100 * core_share / args.vms,
        "refresh": latency(window_refreshes),
        "scrape_metrics": latency(scrapes),
        "scrape_bytes": size,
        "scrape_guest_vm0": latency(guest),
        "sd": latency(sd),
        "vms_with_failures": sorted(failures),
        "goal_percent": 5.0,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of another process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_collector(
    collector: HostCollector, args: argparse.Namespace, other_pid: int = 0
) -> dict[str, float]:
    """Run ``collector`` for warm-up + ``--seconds``; this process's CPU share (and ``other_pid``'s)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.run)
        await trio.sleep(args.warmup)
        cpu0, other0, wall0 = (
            cpu_seconds(),
            process_cpu_seconds(other_pid) if other_pid else 0.0,
            time.perf_counter(),
        )
        await trio.sleep(args.seconds)
        cpu1, other1, wall1 = (
            cpu_seconds(),
            process_cpu_seconds(other_pid) if other_pid else 0.0,
            time.perf_counter(),
        )
        nursery.cancel_scope.cancel()
    return {
        "percent": 100 * (cpu1 - cpu0) / (wall1 - wall0),
        "other_percent": 100 * (other1 - other0) / (wall1 - wall0),
    }


async def run_libvirt(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """The libvirt row: N paused libvirt domains followed, against N paused QEMUs of the daemon's own."""
    import libvirt  # the optional extra

    from host_daemon.metrics.libvirt import LibvirtFollower
    from tests.host_metrics.libvirt_env import domain_files, domain_xml, libvirt_daemon

    count = args.libvirt
    with domain_files() as files, libvirt_daemon(directory / "libvirt") as uri:
        conn = libvirt.open(uri)
        domains = [conn.defineXML(domain_xml(f"lv{i}", files, memory_mib=64)) for i in range(count)]
        try:
            for domain in domains:
                domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            libvirtd_pid = int((directory / "libvirt" / "libvirtd.pid").read_text())
            idle0, began = process_cpu_seconds(libvirtd_pid), time.perf_counter()
            await trio.sleep(args.seconds)  # libvirtd's own cost with nobody asking it anything
            libvirtd_idle = 100 * (process_cpu_seconds(libvirtd_pid) - idle0) / (time.perf_counter() - began)
            follower = LibvirtFollower(uri)
            collector = HostCollector(lambda: [], interval=args.interval, libvirt=follower)
            followed = await measure_collector(collector, args, libvirtd_pid)
            failures = sorted(
                name for name, s in collector.vms.items() if not all(p.success for p in s.parts.values())
            )
            followed_domains = sorted(name for name, s in collector.vms.items() if s.proc is not None)
            follower.close()
        finally:
            for domain in domains:
                with contextlib.suppress(libvirt.libvirtError):
                    domain.destroy()
                domain.undefine()
            conn.close()
    qemus = [start_qemu(directory, i) for i in range(count)]
    try:
        async with AsyncExitStack() as stack:
            views = await real_qemu_views(stack, qemus)
            own = await measure_collector(HostCollector(lambda: views, interval=args.interval), args)
    finally:
        for process, _ in qemus:
            process.kill()
            process.wait(10)
    per_domain = followed["percent"] / count
    per_own = own["percent"] / count
    return {
        "libvirt_domains": count,
        "interval_s": args.interval,
        "window_s": args.seconds,
        "cpu_percent_libvirt": followed["percent"],
        "cpu_percent_per_libvirt_domain": per_domain,
        "libvirtd_cpu_percent": followed["other_percent"],
        "libvirtd_idle_cpu_percent": libvirtd_idle,
        "cpu_percent_own_qemu": own["percent"],
        "cpu_percent_per_own_vm": per_own,
        "ratio_libvirt_to_own": per_domain / per_own if per_own else None,
        # what following costs the host in all: the exporter plus what libvirtd spends answering it
        "ratio_with_libvirtd": (followed["percent"] + followed["other_percent"] - libvirtd_idle)
        / own["percent"]
        if own["percent"]
        else None,
        "followed_with_procfs": followed_domains,
        "goal_ratio": 1.5,
        "domains_with_failures": failures,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=64)
    parser.add_argument("--real-qemu", type=int, default=4)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument(
        "--libvirt",
        type=int,
        default=0,
        metavar="N",
        help="the libvirt row instead: N libvirt domains vs N own QEMUs",
    )
    args = parser.parse_args()
    if args.libvirt:
        with tempfile.TemporaryDirectory(prefix="host-scale-") as tmp:
            row = trio.run(run_libvirt, args, Path(tmp))
        print(json.dumps(row, indent=1))
        ratio = row["ratio_libvirt_to_own"]
        verdict = "within" if ratio is not None and ratio <= row["goal_ratio"] else "OVER"
        print(
            f"{row['libvirt_domains']} libvirt domains at {args.interval:g} s: "
            f"{row['cpu_percent_per_libvirt_domain']:.3f} % of one core per domain "
            f"(libvirtd {row['libvirtd_cpu_percent']:.2f} % in all, "
            f"{row['libvirtd_idle_cpu_percent']:.2f} % idle) "
            f"vs {row['cpu_percent_per_own_vm']:.3f} % "
            f"per own VM: {ratio:.2f}x, {verdict} the 1.5x goal"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(row, indent=1))
        return 0
    if not 0 <= args.real_qemu <= args.vms:
        parser.error("--real-qemu must be between 0 and --vms")
    with tempfile.TemporaryDirectory(prefix="host-scale-") as tmp:
        result = trio.run(run, args, Path(tmp))
    print(json.dumps(result, indent=1))
    verdict = "within" if result["cpu_percent_of_one_core"] <= result["goal_percent"] else "OVER"
    print(
        f"{result['vms']} VMs at {args.interval:g} s: {result['cpu_percent_of_one_core']:.2f} % of one core "
        f"({result['cpu_percent_per_vm']:.3f} % per VM), {verdict} the {result['goal_percent']:g} % goal; "
        f"/metrics median {result['scrape_metrics']['median_ms']:.1f} ms, "
        f"p95 {result['scrape_metrics']['p95_ms']:.1f} ms ({result['scrape_bytes']} bytes)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
