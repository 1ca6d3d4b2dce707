"""Soak: cvm-hostd with N VMs and their agents, scraped by a real Prometheus for a long time.

What runs (each its own process, all started here and stopped at the end):

- ``cvm-hostd`` with ``--metrics-listen`` on loopback, its state under ``--workdir``;
- ``--real`` dev guests created and started through the daemon (``cvmctl vm create/start``):
  real QEMU under TCG (or KVM where the host has it), vhost-device-vsock, and the real
  ``cvm-agent`` inside the guest, reached over hybrid vsock;
- ``--fake`` VMs the daemon reattaches to as if a previous daemon had started them: one fake
  QMP monitor process each (``tests/host_metrics/fake_qmp.py``, answering KVM statistics)
  stands in for QEMU, and a real ``cvm-agent`` on a unix socket reading the recorded SNP
  guest tree stands in for the guest. Their records are written into the daemon's store
  before it starts, exactly as a daemon restart finds them;
- Debian's ``prometheus`` (the one ``scripts/install-monitoring.sh`` installs), finding every
  target through the daemon's ``/sd`` and ``/sd/host`` (``deploy/``'s rules, the tests'
  configuration) and scraping them every ``--scrape-interval`` seconds.

Every ``--sample`` seconds the RSS, open fds and threads of each host process are read
(psutil), and those of each in-guest agent from its own ``cvm_guest_agent_process_*``
series in Prometheus; the daemon answers ``ListVMs`` and each unix-socket agent its health
check, failures counted. At the end Prometheus gives, per target, the scrapes it attempted
and the ones that succeeded (``up``) against the number the interval implies, the longest
scrape, and how often the daemon's ``GetMetrics`` to an agent failed (``cvm_agent_up``) or
a VM's collector did (``cvm_vm_collector_success``). The logs of the daemon and the agents
(JSON lines) are counted for lines at error and warning level, and tracebacks.

Growth per hour is the least-squares slope of the samples after ``--warmup`` (imports,
caches and Prometheus' first blocks settle there), scaled to an hour; a short run's slope is
noise, so read it from runs of an hour or more.

    .venv/bin/python benchmarks/soak.py --duration 1h --real 1 --fake 3 --json soak.json

The JSON (written after every sample too, so a cut-short run leaves its data) holds the
configuration, each process's figures and raw samples, the scrape table and the error counts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "proto"))

BIN = Path(sys.executable).parent
SNP_TREE = REPO / "tests" / "fixtures" / "sysroots" / "snp-guest"
PHASES = {"spawn": 0.1, "firmware": 1.2, "kernel": 2.3, "userspace": 3.4}
DEV_SPEC = 'name = "{name}"\nvcpus = 1\nmemory = "1G"\n'
# A fake VM's spec only labels it (its QEMU is a fake QMP monitor): the paths are never opened.
FAKE_SPEC = (
    'name = "{name}"\ntee = "sev-snp"\n[boot]\nfirmware = "/srv/cvm/OVMF.fd"\nkernel = "/srv/cvm/bzImage"\n'
)
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# The report's arithmetic (pure; tests/benchmarks cover it)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``2m``, ``1h``, ``1h30m`` -> seconds."""
    match = re.fullmatch(
        r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text
    )
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 2m, 1h, 1h30m)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, value)`` points, per hour; None with fewer than 2 times."""
    if len({t for t, _ in points}) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    sxx = sum((t - mean_t) ** 2 for t, _ in points)
    sxy = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return sxy / sxx * 3600


@dataclasses.dataclass
class Sample:
    t: float  # seconds since the soak began
    rss: float  # bytes
    fds: float
    threads: float = 0.0


def process_figures(samples: Sequence[Sample], warmup: float) -> dict[str, Any]:
    """Start, end, peak and growth per hour (after ``warmup`` seconds) of one process's samples."""
    if not samples:
        return {"samples": 0}
    settled = [s for s in samples if s.t >= warmup] or list(samples)
    rss_slope = slope_per_hour([(s.t, s.rss) for s in settled])
    fds_slope = slope_per_hour([(s.t, s.fds) for s in settled])
    return {
        "samples": len(samples),
        "rss_mib_start": settled[0].rss / MIB,
        "rss_mib_end": samples[-1].rss / MIB,
        "rss_mib_max": max(s.rss for s in samples) / MIB,
        "rss_mib_per_hour": None if rss_slope is None else rss_slope / MIB,
        "fds_start": settled[0].fds,
        "fds_end": samples[-1].fds,
        "fds_max": max(s.fds for s in samples),
        "fds_per_hour": fds_slope,
        "threads_end": samples[-1].threads,
    }


def scrape_figures(window: float, interval: float, attempted: int, succeeded: int) -> dict[str, Any]:
    """One target's scrapes over ``window`` seconds: a scrape is missed when it failed (``up`` 0)
    or was never attempted (Prometheus fell behind, or the target vanished from discovery).
    ``expected`` rounds down, so the partial interval at either edge is not counted missed."""
    expected = int(window // interval)
    failed = attempted - succeeded
    return {
        "expected": expected,
        "attempted": attempted,
        "succeeded": succeeded,
        "failed": failed,
        "missed": failed + max(0, expected - attempted),
    }


ANSI = re.compile(r"\x1b\[[0-9;]*m")
# structlog's console renderer: ``2026-...Z [info     ] event    key=value ...``
CONSOLE_LINE = re.compile(r"^\S+Z \[(\w+)\s*\] (\S+)(.*)$")
CONSOLE_CODE = re.compile(r"\bcode=(\w+)")


def _log_entry(line: str) -> tuple[str, str, str] | None:
    """(level, event, rpc status code or "") of a JSON-lines or console-rendered structlog line."""
    try:
        entry = json.loads(line)
    except ValueError:
        match = CONSOLE_LINE.match(ANSI.sub("", line).strip())
        if match is None:
            return None
        code = CONSOLE_CODE.search(match.group(3))
        return match.group(1), match.group(2), code.group(1) if code else ""
    if not isinstance(entry, dict):
        return None
    return str(entry.get("level", "")), str(entry.get("event", "?")), str(entry.get("code", ""))


def count_log_lines(lines: Sequence[str]) -> dict[str, Any]:
    """Lines at error and warning level in a structlog log (JSON lines or the console
    rendering a guest's serial console shows), by event name; RPCs the server logged with a
    status other than OK, by code; and tracebacks."""
    errors: dict[str, int] = {}
    warnings: dict[str, int] = {}
    rpc_codes: dict[str, int] = {}
    tracebacks = 0
    for line in lines:
        tracebacks += "Traceback (most recent call last)" in line
        parsed = _log_entry(line)
        if parsed is None:
            continue
        level, event, code = parsed
        if level in ("error", "critical", "exception"):
            errors[event] = errors.get(event, 0) + 1
        elif level == "warning":
            warnings[event] = warnings.get(event, 0) + 1
        if event == "rpc" and code and code != "OK":
            rpc_codes[code] = rpc_codes.get(code, 0) + 1
    return {
        "error": sum(errors.values()),
        "warning": sum(warnings.values()),
        "tracebacks": tracebacks,
        "rpc_not_ok": rpc_codes,
        "error_events": errors,
        "warning_events": warnings,
    }


# --------------------------------------------------------------------------------------------
# Processes


@dataclasses.dataclass
class Tracked:
    name: str
    pid: int = 0  # a host process (psutil), or 0: read from Prometheus (an in-guest agent)
    vm: str = ""
    samples: list[Sample] = dataclasses.field(default_factory=list)
    gone: str = ""  # why sampling stopped, if it did


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Any, seconds: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: timed out after {seconds:g} s waiting for {what}")
        time.sleep(step)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.hostd_sock = workdir / "hostd.sock"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.tracked: list[Tracked] = []
        self.real_vms = [f"dev{i}" for i in range(args.real)]
        self.fake_vms = [f"fake{i}" for i in range(args.fake)]
        self.prometheus_url = ""
        self.rpc_failures: dict[str, int] = {}
        self.rpc_calls = 0
        self.began = time.monotonic()

    def log(self, message: str) -> None:
        print(f"soak {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO, **kwargs
        )
        log.close()
        self.processes.append(process)
        return process

    # -- the fake VMs: fake QMP + a unix-socket agent, recorded for the daemon to reattach ----

    def start_fakes(self) -> None:
        from host_daemon.process import process_start_ticks
        from host_daemon.store import VMRecord, VMState, VMStore
        from tests.spine.agent_fixtures import agent_argv

        (self.state_dir / "vms").mkdir(parents=True, exist_ok=True)
        store = VMStore(self.state_dir / "hostd.db") if self.fake_vms else None
        for name in self.fake_vms:
            run_dir = self.state_dir / "vms" / name
            run_dir.mkdir(parents=True, exist_ok=True)
            qmp = self.spawn(
                f"fake-qmp-{name}",
                [sys.executable, "-m", "tests.host_metrics.fake_qmp", "--dir", str(run_dir), "--count", "1"],
            )
            # The daemon looks for <run dir>/qmp.sock; the fake serves vm0.qmp there.
            (run_dir / "qmp.sock").symlink_to(run_dir / "vm0.qmp")
            sock = self.workdir / f"agent-{name}.sock"
            agent = self.spawn(
                f"agent-{name}",
                agent_argv(
                    sock,
                    self.workdir / f"agent-state-{name}",
                    "--root",
                    str(SNP_TREE),
                    "--log-format",
                    "json",
                ),
            )
            wait_until(lambda p=run_dir / "vm0.qmp": p.exists(), 60, f"the fake QMP of {name}")
            wait_until(lambda p=sock: p.exists(), 120, f"the agent of {name}")
            ticks = wait_until(lambda p=qmp.pid: process_start_ticks(p), 10, "procfs")
            assert store is not None
            store.insert(
                VMRecord(
                    name=name,
                    spec_toml=FAKE_SPEC.format(name=name),
                    created_at=time.time(),
                    state=VMState.RUNNING,
                    state_reason="started by an earlier daemon (soak: a fake QMP monitor)",
                    accel="kvm",
                    qemu_pid=qmp.pid,
                    qemu_start_ticks=ticks,
                    started_at=time.time(),
                    boot_count=1,
                    agent_address=f"unix://{sock}",
                    boot_phases=PHASES,
                    vcpu_thread_ids=(qmp.pid,),
                )
            )
            self.tracked.append(Tracked(f"fake-qmp:{name}", qmp.pid, name))
            self.tracked.append(Tracked(f"agent:{name}", agent.pid, name))
        if store is not None:
            store.close()

    # -- the daemon and its real dev guests ---------------------------------------------

    def start_daemon(self) -> None:
        self.metrics_port = free_port()
        daemon = self.spawn(
            "hostd",
            [
                str(BIN / "cvm-hostd"),
                "--state-dir",
                str(self.state_dir),
                "--listen",
                f"unix://{self.hostd_sock}",
                "--metrics-listen",
                f"tcp://127.0.0.1:{self.metrics_port}",
                "--log-format",
                "json",
            ],
            start_new_session=True,
        )
        wait_until(self.hostd_sock.exists, 60, "cvm-hostd's socket")
        self.tracked.insert(0, Tracked("cvm-hostd", daemon.pid))

    def cvmctl(self, *argv: str, timeout: float = 60) -> str:
        result = subprocess.run(
            [str(BIN / "cvmctl"), *argv, "--host", f"unix://{self.hostd_sock}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(f"soak: cvmctl {' '.join(argv)}: {result.stderr.strip()}")
        return result.stdout

    def start_real(self) -> None:
        import psutil

        for name in self.real_vms:
            spec = self.workdir / f"{name}.toml"
            spec.write_text(DEV_SPEC.format(name=name))
            self.cvmctl("vm", "create", "-f", str(spec))
            self.log(f"booting {name} (dev guest)")
            started = time.monotonic()
            self.cvmctl("vm", "start", name, "--wait-timeout", str(self.args.boot_timeout),
                        timeout=self.args.boot_timeout + 60)  # fmt: skip
            self.log(f"{name} running after {time.monotonic() - started:.0f} s")
            vm = json.loads(self.cvmctl("vm", "show", name, "--json"))
            self.tracked.append(Tracked(f"qemu:{name}", int(vm["qemu_pid"]), name))
            run_dir = str(self.state_dir / "vms" / name)
            for process in psutil.process_iter(["pid", "name", "cmdline"]):
                cmdline = " ".join(process.info["cmdline"] or ())
                if process.info["pid"] != int(vm["qemu_pid"]) and run_dir in cmdline:
                    self.tracked.append(Tracked(f"{process.info['name']}:{name}", process.info["pid"], name))
            self.tracked.append(Tracked(f"agent(in guest):{name}", 0, name))

    # -- Prometheus ----------------------------------------------------------------------

    def start_prometheus(self) -> None:
        from tests.host_metrics.conftest import PROMETHEUS, prometheus_config

        if PROMETHEUS is None:
            raise SystemExit("soak: prometheus is not installed (scripts/install-monitoring.sh)")
        config = json.loads(prometheus_config(self.metrics_port))
        interval = f"{self.args.scrape_interval:g}s"
        config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
        for job in config["scrape_configs"]:
            for sd in job["http_sd_configs"]:
                sd["refresh_interval"] = "30s"
        path = self.workdir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=1))
        port = free_port()
        process = self.spawn(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
        )
        self.prometheus_url = f"http://127.0.0.1:{port}"
        self.tracked.append(Tracked("prometheus", process.pid))
        wanted = 1 + len(self.real_vms) + len(self.fake_vms)
        wait_until(lambda: len(self.query("up == 1")) >= wanted, 120, f"{wanted} targets up in Prometheus", 1)

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=20) as response:
                result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
                return result
        except OSError:
            return []

    # -- sampling ------------------------------------------------------------------------

    def sample(self) -> None:
        import psutil

        now = time.monotonic() - self.began
        guest: dict[tuple[str, str], float] = {}
        for metric in ("resident_memory_bytes", "open_fds"):
            for series in self.query(f'cvm_guest_agent_process_{metric}{{job="cvm-guests"}}'):
                guest[(series["metric"].get("vm", ""), metric)] = float(series["value"][1])
        for entry in self.tracked:
            if entry.gone:
                continue
            if entry.pid == 0:
                rss, fds = guest.get((entry.vm, "resident_memory_bytes")), guest.get((entry.vm, "open_fds"))
                if rss is not None and fds is not None:
                    entry.samples.append(Sample(now, rss, fds))
                continue
            try:
                process = psutil.Process(entry.pid)
                with process.oneshot():
                    entry.samples.append(
                        Sample(now, process.memory_info().rss, process.num_fds(), process.num_threads())
                    )
            except psutil.Error as exc:
                entry.gone = f"after {now:.0f} s: {type(exc).__name__}"
                self.log(f"{entry.name} is gone ({entry.gone})")
        self.probe_rpcs()

    def probe_rpcs(self) -> None:
        """ListVMs on the daemon and a health check on each unix-socket agent, counting failures."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from cvm.v1 import host_pb2, host_pb2_grpc

        calls: list[tuple[str, str, Any]] = [
            ("cvm-hostd", f"unix:{self.hostd_sock}", lambda ch: host_pb2_grpc.HostDaemonStub(ch).ListVMs)
        ]
        for name in self.fake_vms:
            target = f"unix:{self.workdir / f'agent-{name}.sock'}"
            calls.append((f"agent:{name}", target, lambda ch: health_pb2_grpc.HealthStub(ch).Check))
        for name, target, method in calls:
            self.rpc_calls += 1
            try:
                with grpc.insecure_channel(target) as channel:
                    request = (
                        host_pb2.ListVMsRequest() if name == "cvm-hostd" else health_pb2.HealthCheckRequest()
                    )
                    method(channel)(request, timeout=10)
            except grpc.RpcError as exc:
                key = f"{name}: {exc.code().name}"
                self.rpc_failures[key] = self.rpc_failures.get(key, 0) + 1

    # -- the report ----------------------------------------------------------------------

    def scrape_table(self, window: float) -> list[dict[str, Any]]:
        w = f"{int(window)}s"
        labels = ("job", "instance", "vm")

        def by_target(promql: str) -> dict[tuple[str, ...], float]:
            return {
                tuple(s["metric"].get(k, "") for k in labels): float(s["value"][1])
                for s in self.query(promql)
            }

        attempted = by_target(f"count_over_time(up[{w}])")
        succeeded = by_target(f"sum_over_time(up[{w}])")
        longest = by_target(f"max_over_time(scrape_duration_seconds[{w}])")
        samples = by_target(f"avg_over_time(scrape_samples_scraped[{w}])")
        rows = []
        for key in sorted(attempted):
            row: dict[str, Any] = dict(zip(labels, key, strict=True))
            row.update(
                scrape_figures(
                    window, self.args.scrape_interval, int(attempted[key]), int(succeeded.get(key, 0))
                )
            )
            row["longest_scrape_s"] = longest.get(key)
            row["samples_per_scrape"] = samples.get(key)
            rows.append(row)
        return rows

    def vm_failures(self, window: float) -> dict[str, dict[str, int]]:
        w = f"{int(window)}s"
        out: dict[str, dict[str, int]] = {}
        for what, promql in (
            (
                "agent_get_metrics_failed",
                f"count_over_time(cvm_agent_up[{w}]) - sum_over_time(cvm_agent_up[{w}])",
            ),
            (
                "collector_failed",
                f"sum by (vm) (count_over_time(cvm_vm_collector_success[{w}]) "
                f"- sum_over_time(cvm_vm_collector_success[{w}]))",
            ),
            ("collector_timeouts", f"sum by (vm) (increase(cvm_vm_collector_timeouts_total[{w}]))"),
        ):
            for series in self.query(promql):
                vm = series["metric"].get("vm", "")
                out.setdefault(vm, {})[what] = round(float(series["value"][1]))
        return out

    def log_errors(self) -> dict[str, Any]:
        out = {}
        for path in sorted(self.logs.glob("*.log")):
            if path.stem.startswith("fake-qmp") or path.stem == "prometheus":
                text = path.read_text(errors="replace")
                out[path.stem] = {"lines": len(text.splitlines()), "tracebacks": text.count("Traceback")}
                continue
            out[path.stem] = count_log_lines(path.read_text(errors="replace").splitlines())
        for name in self.real_vms:  # the in-guest agent logs to the serial console
            consoles = sorted((self.state_dir / "vms" / name).glob("console-*.log"))
            text = "".join(p.read_text(errors="replace") for p in consoles)
            out[f"console-{name}"] = count_log_lines(text.splitlines())
        return out

    def result(self, window: float, *, final: bool) -> dict[str, Any]:
        args = self.args
        return {
            "complete": final,
            "config": {
                "duration_s": args.duration,
                "real_vms": args.real,
                "fake_vms": args.fake,
                "scrape_interval_s": args.scrape_interval,
                "sample_interval_s": args.sample,
                "warmup_s": args.warmup,
                "workdir": str(self.workdir),
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
            },
            "window_s": window,
            "processes": {
                t.name: {"pid": t.pid, "vm": t.vm, "gone": t.gone, **process_figures(t.samples, args.warmup)}
                for t in self.tracked
            },
            "scrapes": self.scrape_table(window) if final else [],
            "vm_failures": self.vm_failures(window) if final else {},
            "rpc_probes": {"calls": self.rpc_calls, "failures": self.rpc_failures},
            "logs": self.log_errors() if final else {},
            "raw_samples": {t.name: [dataclasses.astuple(s) for s in t.samples] for t in self.tracked},
        }

    # -- the run -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.start_fakes()
        self.start_daemon()
        self.start_real()
        self.start_prometheus()
        self.log(f"Prometheus at {self.prometheus_url}; soaking {self.args.duration:g} s")
        self.began = time.monotonic()
        prometheus_began = time.time()
        deadline = self.began + self.args.duration
        next_progress = 0.0
        while True:
            self.sample()
            now = time.monotonic()
            if now - self.began >= next_progress:
                hostd = self.tracked[0].samples[-1] if self.tracked[0].samples else None
                self.log(
                    f"{now - self.began:6.0f} s: cvm-hostd "
                    + (f"{hostd.rss / MIB:.1f} MiB, {hostd.fds:.0f} fds" if hostd else "gone")
                    + f"; rpc failures {sum(self.rpc_failures.values())}"
                )
                next_progress += 300
            if self.args.json:
                write_json(Path(self.args.json), self.result(now - self.began, final=False))
            if now >= deadline or self.tracked[0].gone:
                break
            time.sleep(max(0.0, min(self.args.sample, deadline - time.monotonic())))
        window = time.time() - prometheus_began
        return self.result(window, final=True)

    def stop(self) -> None:
        for name in self.real_vms:
            with contextlib.suppress(SystemExit, subprocess.SubprocessError, OSError):
                self.cvmctl("vm", "kill", name, timeout=30)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def write_json(path: Path, result: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(path)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(result: dict[str, Any]) -> None:
    warmup = result["config"]["warmup_s"]
    print(f"soak of {result['window_s'] / 60:.1f} min; growth per hour after {warmup:g} s")
    head = f"{'RSS MiB start':>13} {'end':>7} {'max':>7} {'MiB/h':>8} {'fds':>5} {'fds/h':>7}"
    print(f"{'process':32} {head}  gone")
    for name, p in result["processes"].items():
        if not p["samples"]:
            print(f"{name:32} (no samples) {p['gone']}")
            continue
        print(
            f"{name:32} {p['rss_mib_start']:13.1f} {p['rss_mib_end']:7.1f} {p['rss_mib_max']:7.1f} "
            f"{_fmt(p['rss_mib_per_hour'], '8.2f')} {p['fds_end']:5.0f} {_fmt(p['fds_per_hour'], '7.1f')}  "
            f"{p['gone']}"
        )
    print(f"\n{'scrape target':44} {'expected':>8} {'tried':>6} {'ok':>6} {'missed':>6} {'longest s':>9}")
    for row in result["scrapes"]:
        target = f"{row['job']} {row['vm'] or row['instance']}"
        counts = f"{row['expected']:8d} {row['attempted']:6d} {row['succeeded']:6d} {row['missed']:6d}"
        print(f"{target:44} {counts} {_fmt(row['longest_scrape_s'], '9.3f')}")
    print("\nper VM (from Prometheus):", json.dumps(result["vm_failures"], sort_keys=True))
    probes = result["rpc_probes"]
    print(f"RPC probes: {probes['calls']} calls, failures {probes['failures'] or 0}")
    print("log lines (error / warning / tracebacks / RPCs not OK):")
    for name, counts in result["logs"].items():
        if "error" in counts:
            events = ", ".join(f"{k} x{v}" for k, v in sorted(counts["error_events"].items()))
            codes = sum(counts["rpc_not_ok"].values())
            figures = f"{counts['error']:5d} {counts['warning']:5d} {counts['tracebacks']:5d} {codes:5d}"
            print(f"  {name:30} {figures}  {events} {counts['rpc_not_ok'] or ''}")
        else:
            print(f"  {name:30} {counts['lines']:5d} lines, {counts['tracebacks']} tracebacks")


@contextlib.contextmanager
def workdir_for(path: str | None) -> Iterator[Path]:
    if path:
        directory = Path(path).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    # Unix socket paths are limited to 108 bytes: a short temporary directory.
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        yield Path(tmp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=parse_duration, default="1h", help="e.g. 2m, 1h (default 1h)")
    parser.add_argument(
        "--real", type=int, default=1, help="dev guests booted through the daemon (default 1)"
    )
    parser.add_argument("--fake", type=int, default=3, help="fake-QMP VMs with a host-side agent (default 3)")
    parser.add_argument("--scrape-interval", type=float, default=5.0, metavar="SECONDS", help="default 5")
    parser.add_argument("--sample", type=float, default=30.0, metavar="SECONDS", help="RSS/fd sampling (30)")
    parser.add_argument(
        "--warmup", type=parse_duration, default="5m", help="excluded from the growth slopes (default 5m)"
    )
    parser.add_argument(
        "--boot-timeout", type=float, default=900.0, metavar="SECONDS", help="per dev guest (default 900)"
    )
    parser.add_argument("--workdir", help="keep state, logs and Prometheus' data here (default: a temp dir)")
    parser.add_argument("--json", help="write the result here (also after every sample)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.real < 0 or args.fake < 0 or args.real + args.fake == 0:
        raise SystemExit("soak: --real and --fake must be >= 0, and at least one VM")
    for tool in ("prometheus", *(("qemu-system-x86_64", "vhost-device-vsock") if args.real else ())):
        if shutil.which(tool) is None:
            raise SystemExit(f"soak: {tool} is not installed (scripts/setup.sh installs it)")
    with workdir_for(args.workdir) as workdir:
        soak = Soak(args, workdir)
        try:
            result = soak.run()
        finally:
            soak.stop()
        # The final figures need Prometheus, which stop() ended: run() gathered them already.
    if args.json:
        write_json(Path(args.json), result)
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
