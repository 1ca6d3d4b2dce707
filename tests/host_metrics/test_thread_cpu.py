"""The procfs thread sampler against a fake /proc: threads that start, work and end between samples."""

from __future__ import annotations

import shutil
from pathlib import Path

from host_daemon.metrics.procfs import GRPC_CORE_THREAD_PREFIXES, ThreadCpuSampler, read_thread_cpu


def set_thread(proc: Path, tid: int, name: str, nanoseconds: int) -> None:
    task = proc / "42" / "task" / str(tid)
    task.mkdir(parents=True, exist_ok=True)
    (task / "comm").write_text(f"{name}\n")
    (task / "schedstat").write_text(f"{nanoseconds} 5000 17\n")  # on CPU, waiting, timeslices


def test_counts_threads_that_come_and_go(tmp_path: Path) -> None:
    set_thread(tmp_path, 42, "cvm-agent", 1_000_000)
    set_thread(tmp_path, 43, "event_engine", 2_000_000)
    sampler = ThreadCpuSampler(42, procfs=tmp_path)
    set_thread(tmp_path, 42, "cvm-agent", 1_500_000)
    set_thread(tmp_path, 44, "Trio thread 7", 300_000)  # started after the baseline
    sampler.sample()
    shutil.rmtree(tmp_path / "42" / "task" / "44")  # and ended before the last read
    set_thread(tmp_path, 43, "event_engine", 2_250_000)
    assert sampler.used_ns() == {
        "42": ("cvm-agent", 500_000),
        "43": ("event_engine", 250_000),
        "44": ("Trio thread 7", 300_000),
    }
    assert sampler.seconds() == 0.00105
    assert sampler.seconds(GRPC_CORE_THREAD_PREFIXES) == 0.00025


def test_read_skips_a_thread_that_vanishes(tmp_path: Path) -> None:
    set_thread(tmp_path, 42, "cvm-agent", 7)
    (tmp_path / "42" / "task" / "43").mkdir()  # listed, but its files are already gone
    assert read_thread_cpu(42, tmp_path) == {"42": ("cvm-agent", 7)}
