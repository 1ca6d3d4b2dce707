"""Showing a stored run: its summary table, its paired overheads, its JSON."""

from __future__ import annotations

import difflib
import json
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from cvmctl.cli.output import format_value, print_columns
from workloads.runner import Progress
from workloads.stats import Summary
from workloads.store import Store, paired_overheads, summaries_of


def summary_row(arm: str, metric: str, unit: str, direction: str, s: Summary) -> list[str]:
    ci = "-"
    if s.ci95_low is not None and s.ci95_high is not None:
        ci = "±" + format_value((s.ci95_high - s.ci95_low) / 2)
    rsd = s.relative_stddev
    flags = []
    if s.unstable:
        flags.append("unstable")
    if s.outliers:
        flags.append(f"{len(s.outliers)} outlier(s)")
    row = [
        metric,
        unit,
        "↑" if direction == "higher" else "↓",
        str(s.n),
        format_value(s.median),
        format_value(s.mean),
        ci,
        "-" if rsd is None else f"{rsd:.1%}",
        ", ".join(flags),
    ]
    return [arm, *row] if arm else row


def overhead_rows(overheads: list[dict[str, Any]], between: str = "..") -> list[list[str]]:
    """Rows of metric, B/A, overhead, CI of B/A and verdict, from :func:`paired_overheads`."""
    return [
        [
            o["metric"],
            f"{o['ratio']:.4f}",
            f"{o['percent']:+.2f}%",
            "-" if o["ci95_low"] is None else f"{o['ci95_low']:.4f}{between}{o['ci95_high']:.4f}",
            "distinguishable" if o["distinguishable_from_noise"] else "within noise",
        ]
        for o in overheads
    ]


def print_run(store: Store, run_id: int) -> None:
    run = store.run(run_id)
    stored = store.samples(run_id)
    print(f"run {run.id}: {run.workload} on {run.target}, {run.status}")
    summaries = summaries_of(stored)
    compare = any(arm for arm, _ in summaries)
    header = ["metric", "unit", "", "n", "median", "mean", "ci95", "rsd", "notes"]
    rows = [
        summary_row(arm, metric, sample.unit, sample.direction, summary)
        for (arm, metric), (sample, summary) in summaries.items()
    ]
    print_columns(["arm", *header] if compare else header, rows)
    paths = {
        arm: t.get("network") for arm, t in (run.metadata.get("targets") or {}).items() if t.get("network")
    }
    if paths:  # runs over different network paths must never be compared silently
        print(
            "network path: " + ", ".join(f"{arm} {path}" if arm else str(path) for arm, path in paths.items())
        )
    for arm, notes in (run.metadata.get("unavailable") or {}).items():
        for note in notes:
            print(f"unavailable{' ' + arm if arm else ''}: {note['metric']}: {note['reason']}")
    if compare:
        print()
        print_columns(
            ["metric", "B/A", "overhead", "ci95 (B/A)", "verdict"], overhead_rows(paired_overheads(stored))
        )
        print_argv_comparison(run.metadata)


def comparable_argv(target: Mapping[str, Any]) -> list[str]:
    """A VM arm's QEMU argv with what is only its identity (VM name, run dir, forward ports) masked.

    Two arms of one comparison run in VMs of their own, so their names, run directories and
    loopback ports always differ; what is left is what the comparison measures.
    """
    name = str(target.get("name") or "")
    out = []
    for arg in target.get("qemu_argv") or []:
        text = str(arg).replace(name, "<vm>") if name else str(arg)
        out.append(re.sub(r"(hostfwd=tcp:127\.0\.0\.1:)\d+", r"\1<port>", text))
    return out


def argv_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Lines ``- arg`` (only in A) and ``+ arg`` (only in B), in argv order; [] when equal."""
    lines = []
    for line in difflib.ndiff(comparable_argv(a), comparable_argv(b)):
        if line[:1] in "-+":
            lines.append(line.rstrip())
    return lines


def print_argv_comparison(metadata: Mapping[str, Any]) -> None:
    targets = metadata.get("targets") or {}
    a, b = targets.get("A") or {}, targets.get("B") or {}
    if not (a.get("qemu_argv") and b.get("qemu_argv")):
        return
    print()
    differences = argv_differences(a, b)
    if not differences:
        print("QEMU command lines: the same for A and B (VM names, paths and ports aside)")
        return
    print("QEMU command lines: B differs from A in (VM names, paths and ports aside):")
    for line in differences:
        print(f"  {line}")


def run_json(store: Store, run_id: int) -> str:
    """The run as ``export --json`` prints it: export_json plus the paired overheads."""
    data = store.export_json(run_id)
    data["overheads"] = paired_overheads(store.samples(run_id))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def print_progress(name: str) -> Callable[[Progress], None]:
    """A progress callback printing one line per step to stderr, with the step's time."""
    started = time.monotonic()

    def show(event: Progress) -> None:
        nonlocal started
        arm = f" {event.arm}" if event.arm else ""
        kind = "warm-up" if event.warmup else "run"
        head = f"[{event.step}/{event.steps}] {name}{arm} {kind} {event.repetition + 1}"
        if event.phase == "start":
            started = time.monotonic()
            print(f"{head} ...", file=sys.stderr, flush=True)
        elif event.samples:
            first = event.samples[0]
            took = time.monotonic() - started
            print(
                f"{head}: {first.metric} {first.value:.4g} {first.unit} ({took:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    return show
