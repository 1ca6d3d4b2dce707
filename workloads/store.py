"""The results store: every ``cvmctl bench`` run and its samples, in SQLite (WAL).

Where: ``$CVMCTL_DATA_DIR``, else ``$XDG_DATA_HOME/cvmctl``, else ``~/.local/share/cvmctl``
(:func:`default_data_dir`); the file is ``results.sqlite3`` there.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`)::

    runs     id (1, 2, ...), workload, params (JSON, text values), target, status
             (running | completed | aborted | failed), started, finished (Unix seconds),
             pid, pid_started (the process's start time, so a reused pid is not mistaken
             for the writer), metadata (JSON: machine, tools, notes, error)
    samples  run_id, arm ("" or the --compare arm, A / B), repetition, warmup (0/1),
             metric, value, unit, direction (higher | lower), metadata (JSON)

How a run is written, and what a crash leaves:

1. :meth:`Store.begin` inserts the run as ``running`` with this process's pid (commit);
2. :meth:`Store.add_samples` adds one repetition's samples in one transaction;
3. :meth:`Store.finish` sets the status, the end time and the final metadata (one
   transaction).

Every step is one transaction, so a ``kill -9`` leaves the run with the repetitions that
finished, never a half-written one, and never touches other runs. The next
:meth:`Store.open` marks every ``running`` run whose writer is gone (pid not alive, or alive
but started at another time) as ``aborted``. WAL lets ``cvmctl results`` read while a
benchmark writes; ``busy_timeout`` makes concurrent writers wait instead of failing.

Exports: :meth:`Store.export_json` (the run, its samples, and per-metric summaries from
:mod:`workloads.stats`) and :meth:`Store.export_csv` (one row per sample).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from cvmcore import defaults
from cvmcore.errors import UsageError
from workloads.model import Sample
from workloads.stats import Summary, paired_overhead, summarize

SCHEMA_VERSION = 1
DB_NAME = "results.sqlite3"
RunStatus = Literal["running", "completed", "aborted", "failed"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    workload    TEXT NOT NULL,
    params      TEXT NOT NULL,
    target      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'completed', 'aborted', 'failed')),
    started     REAL NOT NULL,
    finished    REAL,
    pid         INTEGER NOT NULL,
    pid_started REAL,
    metadata    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    arm         TEXT NOT NULL DEFAULT '',
    repetition  INTEGER NOT NULL,
    warmup      INTEGER NOT NULL CHECK (warmup IN (0, 1)),
    metric      TEXT NOT NULL,
    value       REAL NOT NULL,
    unit        TEXT NOT NULL,
    direction   TEXT NOT NULL CHECK (direction IN ('higher', 'lower')),
    metadata    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_run ON samples(run_id);
"""


def default_data_dir() -> Path:
    """``$CVMCTL_DATA_DIR``, else ``$XDG_DATA_HOME/cvmctl``, else ``~/.local/share/cvmctl``."""
    return defaults.data_dir()


@dataclass(frozen=True)
class Run:
    id: int
    workload: str
    params: dict[str, str]
    target: str
    status: RunStatus
    started: float
    finished: float | None
    pid: int
    metadata: dict[str, Any]


@dataclass(frozen=True)
class StoredSample:
    arm: str
    repetition: int
    warmup: bool
    sample: Sample


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (psutil's create_time), or None if there is none."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def writer_alive(pid: int, pid_started: float | None) -> bool:
    started = process_start_time(pid)
    if started is None:
        return False
    return pid_started is None or abs(started - pid_started) < 1.0


class Store:
    """One results database. Use :meth:`open`; close with :meth:`close` or ``with``."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, data_dir: Path | None = None) -> Store:
        """Open (creating) the store in ``data_dir`` and mark dead writers' runs aborted."""
        directory = data_dir or default_data_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the data directory {directory}: {exc.strerror}") from exc
        path = directory / DB_NAME
        db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=10000")
        _create_schema(db)
        store = cls(db, path)
        store.mark_abandoned()
        return store

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------

    def begin(self, workload: str, params: dict[str, str], target: str, metadata: dict[str, Any]) -> int:
        """Record a new ``running`` run owned by this process; its id."""
        pid = os.getpid()
        with _transaction(self._db):
            cursor = self._db.execute(
                "INSERT INTO runs (workload, params, target, status, started, pid, pid_started, metadata) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
                (
                    workload,
                    _dumps(params),
                    target,
                    time.time(),
                    pid,
                    process_start_time(pid),
                    _dumps(metadata),
                ),
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def add_samples(
        self, run_id: int, repetition: int, warmup: bool, samples: Iterable[Sample], arm: str = ""
    ) -> None:
        """One repetition's samples, in one transaction."""
        rows = [
            (
                run_id,
                arm,
                repetition,
                int(warmup),
                s.metric,
                float(s.value),
                s.unit,
                s.direction,
                _dumps(s.metadata),
            )
            for s in samples
        ]
        with _transaction(self._db):
            self._db.executemany(
                "INSERT INTO samples"
                " (run_id, arm, repetition, warmup, metric, value, unit, direction, metadata)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def finish(self, run_id: int, status: RunStatus, metadata: dict[str, Any] | None = None) -> None:
        """Close the run with ``status`` (and replace its metadata when given)."""
        with _transaction(self._db):
            if metadata is None:
                self._db.execute(
                    "UPDATE runs SET status = ?, finished = ? WHERE id = ?", (status, time.time(), run_id)
                )
            else:
                self._db.execute(
                    "UPDATE runs SET status = ?, finished = ?, metadata = ? WHERE id = ?",
                    (status, time.time(), _dumps(metadata), run_id),
                )

    def set_attestation(self, run_id: int, attestation: dict[str, Any]) -> None:
        """Record a finished run's attestation (``metadata["attestation"]``), in one transaction.

        The evidence binds the run's canonical record (:func:`workloads.record.canonical_record`),
        which leaves this key out: adding it changes nothing the evidence covers.
        """
        with _transaction(self._db):
            row = self._db.execute("SELECT metadata FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise UsageError(f"no run {run_id} in {self.path}")
            metadata = json.loads(row["metadata"])
            metadata["attestation"] = attestation
            self._db.execute("UPDATE runs SET metadata = ? WHERE id = ?", (_dumps(metadata), run_id))

    def mark_abandoned(self) -> list[int]:
        """Mark ``running`` runs whose writer process is gone as ``aborted``; their ids."""
        rows = self._db.execute("SELECT id, pid, pid_started FROM runs WHERE status = 'running'").fetchall()
        dead = [row["id"] for row in rows if not writer_alive(row["pid"], row["pid_started"])]
        if dead:
            with _transaction(self._db):
                self._db.executemany(
                    "UPDATE runs SET status = 'aborted' WHERE id = ? AND status = 'running'",
                    [(i,) for i in dead],
                )
        return dead

    # -- reading ----------------------------------------------------------------------

    def runs(self, limit: int | None = None) -> list[Run]:
        query = "SELECT * FROM runs ORDER BY id DESC"
        rows = self._db.execute(query + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        return [_run(row) for row in rows]

    def run(self, run_id: int) -> Run:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise UsageError(f"no run {run_id} in {self.path}")
        return _run(row)

    def samples(self, run_id: int) -> list[StoredSample]:
        rows = self._db.execute("SELECT * FROM samples WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall()
        return [
            StoredSample(
                arm=row["arm"],
                repetition=row["repetition"],
                warmup=bool(row["warmup"]),
                sample=Sample(
                    row["metric"], row["value"], row["unit"], row["direction"], json.loads(row["metadata"])
                ),
            )
            for row in rows
        ]

    def summaries(self, run_id: int) -> dict[tuple[str, str], tuple[Sample, Summary]]:
        """{(arm, metric): (a sample for unit/direction, summary of measured values)}."""
        return summaries_of(self.samples(run_id))

    # -- export -----------------------------------------------------------------------

    def export_json(self, run_id: int) -> dict[str, Any]:
        run = self.run(run_id)
        stored = self.samples(run_id)
        return {
            "run": asdict(run),
            "summaries": [
                {"arm": arm, "metric": metric, "unit": sample.unit, "direction": sample.direction}
                | asdict(summary)
                for (arm, metric), (sample, summary) in summaries_of(stored).items()
            ],
            "samples": [
                {
                    "arm": s.arm,
                    "repetition": s.repetition,
                    "warmup": s.warmup,
                    "metric": s.sample.metric,
                    "value": s.sample.value,
                    "unit": s.sample.unit,
                    "direction": s.sample.direction,
                    "metadata": s.sample.metadata,
                }
                for s in stored
            ],
        }

    def export_csv(self, run_id: int) -> str:
        run = self.run(run_id)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [
                "run",
                "workload",
                "target",
                "status",
                "arm",
                "repetition",
                "warmup",
                "metric",
                "value",
                "unit",
                "direction",
                "metadata",
            ]
        )
        for s in self.samples(run_id):
            writer.writerow(
                [
                    run.id,
                    run.workload,
                    run.target,
                    run.status,
                    s.arm,
                    s.repetition,
                    int(s.warmup),
                    s.sample.metric,
                    repr(s.sample.value),
                    s.sample.unit,
                    s.sample.direction,
                    _dumps(s.sample.metadata),
                ]
            )
        return out.getvalue()


def summaries_of(stored: Iterable[StoredSample]) -> dict[tuple[str, str], tuple[Sample, Summary]]:
    """Group measured (non-warm-up) samples by (arm, metric), in first-seen order, and summarise."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in stored:
        if not s.warmup:
            groups.setdefault((s.arm, s.sample.metric), []).append(s.sample)
    return {key: (samples[0], summarize([x.value for x in samples])) for key, samples in groups.items()}


def _create_schema(db: sqlite3.Connection) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UsageError(f"the results store has schema {version}; this cvmctl knows up to {SCHEMA_VERSION}")
    db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _run(row: sqlite3.Row) -> Run:
    return Run(
        id=row["id"],
        workload=row["workload"],
        params=json.loads(row["params"]),
        target=row["target"],
        status=row["status"],
        started=row["started"],
        finished=row["finished"],
        pid=row["pid"],
        metadata=json.loads(row["metadata"]),
    )


def iter_ids(texts: Iterable[str]) -> Iterator[int]:
    """Run ids from command-line text; :class:`UsageError` for anything not a positive number."""
    for text in texts:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{text!r} is not a run id (a number; see cvmctl results ls)") from None
        if value < 1:
            raise UsageError(f"{text!r} is not a run id (a number; see cvmctl results ls)")
        yield value


def paired_overheads(stored: list[StoredSample]) -> list[dict[str, Any]]:
    """Paired overheads of arm B against arm A, per metric (repetition i of A with i of B)."""
    by_arm: dict[tuple[str, str], dict[int, float]] = {}
    direction: dict[str, str] = {}
    for s in stored:
        if s.warmup or not s.arm:
            continue
        by_arm.setdefault((s.arm, s.sample.metric), {})[s.repetition] = s.sample.value
        direction[s.sample.metric] = s.sample.direction
    result = []
    for metric, dir_ in direction.items():
        a, b = by_arm.get(("A", metric), {}), by_arm.get(("B", metric), {})
        reps = sorted(set(a) & set(b))
        pairs = [(a[r], b[r]) for r in reps if a[r] > 0 and b[r] > 0]
        if not pairs:
            continue
        o = paired_overhead(
            [x for x, _ in pairs], [y for _, y in pairs], "higher" if dir_ == "higher" else "lower"
        )
        result.append(
            {
                "metric": metric,
                "pairs": o.pairs,
                "ratio": o.ratio,
                "percent": o.percent,
                "ci95_low": o.ci95_low,
                "ci95_high": o.ci95_high,
                "distinguishable_from_noise": o.distinguishable_from_noise,
            }
        )
    return result
