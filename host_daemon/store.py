"""The daemon's durable state: one SQLite database (WAL) under the state directory.

One row per VM holds everything a restarted daemon needs to find its VMs again: the spec,
the state and why, and for a live VM the QEMU pid with the process start time that tells
it apart from a later process that reused the pid. Every change is one transaction, so a
daemon killed at any moment leaves either the old row or the new one.

The store is synchronous and small; the daemon calls it from trio on a worker thread
(``trio.to_thread.run_sync``) or directly for the sub-millisecond writes it does.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

SCHEMA_VERSION = 1


class VMState(StrEnum):
    DEFINED = "defined"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"

    @property
    def live(self) -> bool:
        """A QEMU process belongs to the VM in this state."""
        return self in (VMState.STARTING, VMState.RUNNING, VMState.STOPPING)


class VcpuPin(NamedTuple):
    """One vCPU thread's placement: the CPU the spec asked for, and what the kernel reports."""

    vcpu: int
    thread_id: int
    host_cpu: int  # from [pinning] host_cpus
    allowed_cpus: str  # the thread's Cpus_allowed_list, read back after pinning


@dataclass(frozen=True)
class VMRecord:
    name: str
    spec_toml: str
    created_at: float
    state: VMState = VMState.DEFINED
    state_reason: str = "created"
    accel: str = ""
    qemu_pid: int = 0
    qemu_start_ticks: int = 0  # field 22 of /proc/<pid>/stat: tells a reused pid apart
    exit_status: int | None = None
    started_at: float = 0.0
    boot_count: int = 0
    agent_address: str = ""
    console_path: str = ""
    boot_phases: dict[str, float] = field(default_factory=dict)
    #: The boot's marks on the host's monotonic clock (CLOCK_MONOTONIC: one clock for every
    #: process since the host booted), so a daemon restarted mid-boot can finish the phases.
    boot_marks: dict[str, float] = field(default_factory=dict)
    #: Phases of this boot that have no figure, and why (never silently missing).
    boot_unmeasured: dict[str, str] = field(default_factory=dict)
    vcpu_thread_ids: tuple[int, ...] = ()
    last_console_lines: tuple[str, ...] = ()
    helper_pids: tuple[tuple[int, int], ...] = ()  # (pid, start ticks): vhost-device-vsock, ...
    qemu_argv: tuple[str, ...] = ()  # the command line of the current or last boot
    vcpu_pins: tuple[VcpuPin, ...] = ()  # [pinning] host_cpus as applied to the live QEMU
    emulator_cpus: str = ""  # where QEMU's other threads may run, when pinned (a cpu list)

    def with_state(self, state: VMState, reason: str, **changes: Any) -> VMRecord:
        return replace(self, state=state, state_reason=reason, **changes)


_COLUMNS = (
    "name",
    "spec_toml",
    "created_at",
    "state",
    "state_reason",
    "accel",
    "qemu_pid",
    "qemu_start_ticks",
    "exit_status",
    "started_at",
    "boot_count",
    "agent_address",
    "console_path",
    "extra",
)
# Fields kept as JSON in the ``extra`` column: a field added here needs no schema change, and a
# row written before it existed loads with the field's default.
_EXTRA_FIELDS = (
    "boot_phases",
    "boot_marks",
    "boot_unmeasured",
    "vcpu_thread_ids",
    "last_console_lines",
    "helper_pids",
    "qemu_argv",
    "vcpu_pins",
    "emulator_cpus",
)


def _to_row(record: VMRecord) -> tuple[Any, ...]:
    data = asdict(record)
    extra = json.dumps({key: data[key] for key in _EXTRA_FIELDS}, sort_keys=True)
    return (
        record.name,
        record.spec_toml,
        record.created_at,
        str(record.state),
        record.state_reason,
        record.accel,
        record.qemu_pid,
        record.qemu_start_ticks,
        record.exit_status,
        record.started_at,
        record.boot_count,
        record.agent_address,
        record.console_path,
        extra,
    )


def _from_row(row: sqlite3.Row) -> VMRecord:
    extra = json.loads(row["extra"] or "{}")
    return VMRecord(
        name=row["name"],
        spec_toml=row["spec_toml"],
        created_at=row["created_at"],
        state=VMState(row["state"]),
        state_reason=row["state_reason"],
        accel=row["accel"],
        qemu_pid=row["qemu_pid"],
        qemu_start_ticks=row["qemu_start_ticks"],
        exit_status=row["exit_status"],
        started_at=row["started_at"],
        boot_count=row["boot_count"],
        agent_address=row["agent_address"],
        console_path=row["console_path"],
        boot_phases={str(k): float(v) for k, v in extra.get("boot_phases", {}).items()},
        boot_marks={str(k): float(v) for k, v in extra.get("boot_marks", {}).items()},
        boot_unmeasured={str(k): str(v) for k, v in extra.get("boot_unmeasured", {}).items()},
        vcpu_thread_ids=tuple(extra.get("vcpu_thread_ids", ())),
        last_console_lines=tuple(extra.get("last_console_lines", ())),
        helper_pids=tuple((int(pid), int(ticks)) for pid, ticks in extra.get("helper_pids", ())),
        qemu_argv=tuple(str(arg) for arg in extra.get("qemu_argv", ())),
        vcpu_pins=tuple(
            VcpuPin(int(vcpu), int(tid), int(cpu), str(allowed))
            for vcpu, tid, cpu, allowed in extra.get("vcpu_pins", ())
        ),
        emulator_cpus=str(extra.get("emulator_cpus", "")),
    )


class VMStore:
    """VM records in ``<state_dir>/hostd.db``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS vms ("
                "name TEXT PRIMARY KEY, spec_toml TEXT NOT NULL, created_at REAL NOT NULL, "
                "state TEXT NOT NULL, state_reason TEXT NOT NULL, accel TEXT NOT NULL, "
                "qemu_pid INTEGER NOT NULL, qemu_start_ticks INTEGER NOT NULL, exit_status INTEGER, "
                "started_at REAL NOT NULL, boot_count INTEGER NOT NULL, agent_address TEXT NOT NULL, "
                "console_path TEXT NOT NULL, extra TEXT NOT NULL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, record: VMRecord) -> None:
        """Add a new VM; raises ``KeyError`` when the name is taken."""
        placeholders = ",".join("?" * len(_COLUMNS))
        try:
            with self._transaction() as db:
                db.execute(f"INSERT INTO vms ({','.join(_COLUMNS)}) VALUES ({placeholders})", _to_row(record))
        except sqlite3.IntegrityError:
            raise KeyError(record.name) from None

    def save(self, record: VMRecord) -> None:
        assignments = ",".join(f"{column}=?" for column in _COLUMNS[1:])
        row = _to_row(record)
        with self._transaction() as db:
            cursor = db.execute(f"UPDATE vms SET {assignments} WHERE name=?", (*row[1:], row[0]))
            if cursor.rowcount != 1:
                raise KeyError(record.name)

    def delete(self, name: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM vms WHERE name=?", (name,))

    def get(self, name: str) -> VMRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM vms WHERE name=?", (name,)).fetchone()
        return _from_row(row) if row else None

    def all(self) -> list[VMRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM vms ORDER BY name").fetchall()
        return [_from_row(row) for row in rows]


def now() -> float:
    return time.time()
