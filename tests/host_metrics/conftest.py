"""Fixtures for the host exporter: procfs trees, fake QMP monitors, real guest agents."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from host_daemon.qmp import QMPClient, connect_qmp
from host_daemon.store import VMState
from host_daemon.vms import VMManager
from tests.agent_rpc.test_metrics_rpc import agent_on_snp_tree
from tests.conftest import REPO_ROOT
from tests.host_metrics.fake_qmp import FakeQemu, serve_fake_qmp
from workloads.runner import free_port

# A real cvm-agent on a unix socket reading the recorded SNP guest tree (fixture re-used).
__all__ = ["agent_on_snp_tree"]
QEMU_PID = 4242
VCPU_TIDS = (4250, 4251)


def stat_line(pid: int, comm: str, utime: int, stime: int, rss: int) -> str:
    """A /proc/<pid>/stat line (fields 3..44 as the kernel prints them; the rest zero)."""
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560", "0", "0", "0", "0"]
    fields += [str(utime), str(stime), "0", "0", "20", "0", "3", "0", "1000", "123456789", str(rss)]
    fields += ["0"] * 22
    return f"{pid} ({comm}) {' '.join(fields)}\n"


@dataclass
class ProcTree:
    root: Path  # the procfs root (what /proc would be)

    def add_thread(self, pid: int, tid: int, comm: str, utime: int = 0, stime: int = 0) -> None:
        task = self.root / str(pid) / "task" / str(tid)
        task.mkdir(parents=True, exist_ok=True)
        (task / "comm").write_text(comm + "\n")
        (task / "stat").write_text(stat_line(tid, comm, utime, stime, 0))
        (task / "schedstat").write_text(f"{tid * 1_000_000} {tid * 1000} 77\n")


def make_proc_tree(base: Path, *, release: str = "6.12.0", kernel_vhost: bool = False) -> ProcTree:
    """A QEMU (pid 4242) with two vCPU threads and one vhost worker (a thread, or a kernel thread)."""
    root = base / "proc"
    (root / "sys/kernel").mkdir(parents=True)
    (root / "sys/kernel/osrelease").write_text(release + "\n")
    (root / str(QEMU_PID)).mkdir()
    (root / str(QEMU_PID) / "stat").write_text(stat_line(QEMU_PID, "qemu-system-x86", 250, 50, 1000))
    (root / str(QEMU_PID) / "comm").write_text("qemu-system-x86\n")
    tree = ProcTree(root)
    tree.add_thread(QEMU_PID, QEMU_PID, "qemu-system-x86")
    for index, tid in enumerate(VCPU_TIDS):
        tree.add_thread(QEMU_PID, tid, f"CPU {index}/KVM")
    if kernel_vhost:
        kthread = root / "4300"
        kthread.mkdir()
        (kthread / "comm").write_text(f"vhost-{QEMU_PID}\n")
        (kthread / "stat").write_text(stat_line(4300, f"vhost-{QEMU_PID}", 30, 70, 0))
    else:
        tree.add_thread(QEMU_PID, 4260, f"vhost-{QEMU_PID}", utime=12, stime=88)
    return tree


@pytest.fixture
def proc_tree(tmp_path: Path) -> ProcTree:
    return make_proc_tree(tmp_path)


FakeQmpFactory = Callable[[FakeQemu], "AsyncIterator[QMPClient]"]


@asynccontextmanager
async def fake_qmp_client(directory: Path, fake: FakeQemu, name: str = "vm") -> AsyncIterator[QMPClient]:
    """A QMPClient connected to a fake monitor served in the same trio run."""
    path = directory / f"{name}.qmp"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fake_qmp, path, fake)
        client = await connect_qmp(path, nursery, deadline=5, name=name)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# A real Prometheus (Debian's), on loopback

PROMETHEUS = shutil.which("prometheus")
DEPLOY = REPO_ROOT / "deploy"


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def prometheus_config(exporter_port: int) -> str:
    rules = sorted(str(p) for p in (DEPLOY / "prometheus" / "rules").glob("*.yml"))
    sd = f"http://127.0.0.1:{exporter_port}"
    return json.dumps(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rules,
            "scrape_configs": [
                {
                    "job_name": "cvm-hostd",
                    "http_sd_configs": [{"url": f"{sd}/sd/host", "refresh_interval": "1s"}],
                },
                {
                    "job_name": "cvm-guests",
                    "honor_labels": True,
                    "http_sd_configs": [{"url": f"{sd}/sd", "refresh_interval": "1s"}],
                },
            ],
        }
    )


def metric_names(result: list[Any]) -> set[str]:
    """The ``__name__`` of each series in a query's result."""
    return {series["metric"]["__name__"] for series in result}


def wait_for(base: str, query: str, seconds: float) -> list[Any]:
    """The query's first non-empty result within ``seconds`` (empty if none came)."""
    return settle(base, query, bool, seconds)


def settle(base: str, query: str, done: Callable[[list[Any]], bool], seconds: float) -> list[Any]:
    """Query until ``done(result)`` holds or ``seconds`` pass; the last result either way.

    An instant query sees the last scrape only: a refresh that missed its deadline on a loaded
    machine leaves a part out of one scrape (by design), so a test asks for the state to be
    reached within a bound instead of at one instant.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            result: list[Any] = api(base, "/api/v1/query", query=query)["data"]["result"]
        except OSError:
            result = []
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


@contextmanager
def running_prometheus(tmp_path: Path, config: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``prometheus`` with ``config`` on a free loopback port: yields its base URL and process."""
    assert PROMETHEUS is not None
    path = tmp_path / "prometheus.yml"
    path.write_text(config)
    port = free_port()
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(20)


# --------------------------------------------------------------------------------------------
# The dev guest under the daemon's VMManager

DEV_GUEST_BOOT_SECONDS = 240.0  # TCG boot plus the agent importing grpc over 9p, on a loaded 2-core machine


async def start_dev_guest(
    manager: VMManager, name: str = "dev", seconds: float = DEV_GUEST_BOOT_SECONDS
) -> None:
    """Create and start a 1-vCPU dev guest under ``manager`` (running) and wait until it runs."""
    manager.create(f'name = "{name}"\nvcpus = 1\nmemory = "1G"\n')
    await manager.start(name)
    with trio.fail_after(seconds + 10):
        while manager.get(name).state is not VMState.RUNNING:
            assert manager.get(name).state.live, manager.get(name)
            await trio.sleep(0.5)
