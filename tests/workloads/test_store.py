"""The results store: atomic steps, dead writers marked aborted, exports."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cvmcore.errors import UsageError
from workloads.model import Sample
from workloads.store import Store, iter_ids

RPS = Sample("requests_per_second", 100.0, "req/s", "higher", {"tool": "wrk"})


def test_a_run_round_trips(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        run_id = store.begin("nginx", {"threads": "8"}, "local", {"kernel": "6.1"})
        store.add_samples(run_id, 0, True, [RPS])
        for rep, value in enumerate((100.0, 110.0, 90.0)):
            store.add_samples(run_id, rep, False, [Sample("requests_per_second", value, "req/s", "higher")])
        store.finish(run_id, "completed", {"kernel": "6.1", "done": True})
        run = store.run(run_id)
        assert (run.status, run.workload, run.params, run.metadata["done"]) == (
            "completed",
            "nginx",
            {"threads": "8"},
            True,
        )
        assert run.finished is not None and run.finished >= run.started
        stored = store.samples(run_id)
        assert [s.warmup for s in stored] == [True, False, False, False]
        assert stored[0].sample == RPS
        ((_sample, summary),) = store.summaries(run_id).values()
        assert summary.n == 3 and summary.median == 100.0  # the warm-up is not counted
    assert (tmp_path / "results.sqlite3").exists()


def test_wal_mode(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_dead_writer_is_marked_aborted(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        done = store.begin("vmexit", {}, "local", {})
        store.add_samples(done, 0, False, [RPS])
        store.finish(done, "completed")
        before = store.export_json(done)
        mine = store.begin("vmexit", {}, "local", {})
    # a run written by a process that has exited since
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from workloads.store import Store; "
            "s = Store.open(Path(sys.argv[1])); print(s.begin('nginx', {}, 'local', {}))",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    dead = int(child.stdout)
    with Store.open(tmp_path) as store:
        assert store.run(dead).status == "aborted"
        assert store.run(mine).status == "running"  # this process is alive
        assert store.export_json(done) == before


def test_exports(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        run_id = store.begin("ping", {"size": "64"}, "local", {})
        store.add_samples(run_id, 0, False, [Sample("rtt_mean_64B", 0.043, "ms", "lower", {"size": "64"})])
        store.add_samples(run_id, 1, False, [Sample("rtt_mean_64B", 0.045, "ms", "lower", {"size": "64"})])
        store.finish(run_id, "completed")
        data = store.export_json(run_id)
        text = store.export_csv(run_id)
    json.dumps(data)  # serialisable
    assert data["run"]["id"] == run_id and len(data["samples"]) == 2
    [summary] = data["summaries"]
    assert summary["metric"] == "rtt_mean_64B" and summary["median"] == pytest.approx(0.044)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["value"] for r in rows] == ["0.043", "0.045"]
    assert (
        rows[0]["metric"] == "rtt_mean_64B" and rows[0]["warmup"] == "0" and rows[0]["status"] == "completed"
    )


def test_unknown_run_and_bad_ids(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store, pytest.raises(UsageError, match="no run 7"):
        store.run(7)
    with pytest.raises(UsageError, match="not a run id"):
        list(iter_ids(["x"]))
    with pytest.raises(UsageError, match="not a run id"):
        list(iter_ids(["0"]))
