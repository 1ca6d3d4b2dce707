"""cvmctl results: list, show and export the runs cvmctl bench stored.

    cvmctl results ls
    cvmctl results show 3
    cvmctl results export 3 --csv > run3.csv
    cvmctl results export 3 --json -o run3.json

Listing opens the store, which also marks runs whose benchmark process died as aborted.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from cvmcore.errors import UsageError
from cvmctl.cli.args import add_data_dir_argument
from cvmctl.cli.output import print_columns, print_table
from cvmctl.cli.runview import print_run, run_json
from workloads.store import Store, iter_ids


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "results",
        help="list, show and export stored benchmark runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="results commands", metavar="COMMAND", required=True)

    ls = commands.add_parser("ls", help="list runs, newest first")
    ls.add_argument("--limit", type=int, default=50, metavar="N", help="at most N runs (50)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir_argument(ls)
    ls.set_defaults(func=run_ls)

    show = commands.add_parser("show", help="a run's metadata and summary table")
    show.add_argument("run", metavar="RUN", help="run id (see results ls)")
    show.add_argument("--json", action="store_true", help="print the run as JSON (as export --json)")
    add_data_dir_argument(show)
    show.set_defaults(func=run_show)

    export = commands.add_parser("export", help="a run's samples as JSON or CSV")
    export.add_argument("run", metavar="RUN", help="run id")
    fmt = export.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--json", action="store_true", help="run, summaries and samples as JSON")
    fmt.add_argument("--csv", action="store_true", help="one row per sample")
    export.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    add_data_dir_argument(export)
    export.set_defaults(func=run_export)


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def run_ls(args: argparse.Namespace) -> int:
    with Store.open(args.data_dir) as store:
        runs = store.runs(limit=args.limit)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "workload": r.workload,
                        "target": r.target,
                        "status": r.status,
                        "started": r.started,
                        "finished": r.finished,
                        "params": r.params,
                    }
                    for r in runs
                ],
                indent=2,
            )
        )
        return 0
    rows = [
        [
            str(r.id),
            r.workload,
            r.target,
            r.status,
            when(r.started),
            "-" if r.finished is None else f"{r.finished - r.started:.1f}s",
            " ".join(f"{k}={v}" for k, v in r.params.items()),
        ]
        for r in runs
    ]
    print_columns(["id", "workload", "target", "status", "started (UTC)", "took", "params"], rows)
    return 0


def single_id(text: str) -> int:
    return next(iter_ids([text]))


def run_show(args: argparse.Namespace) -> int:
    run_id = single_id(args.run)
    with Store.open(args.data_dir) as store:
        if args.json:
            print(run_json(store, run_id), end="")
            return 0
        run = store.run(run_id)
        print_table(
            [
                ("run", str(run.id)),
                ("workload", run.workload),
                ("target", run.target),
                ("status", run.status),
                ("started", when(run.started) + " UTC"),
                ("finished", when(run.finished) + (" UTC" if run.finished else "")),
                ("params", " ".join(f"{k}={v}" for k, v in run.params.items())),
                ("metadata", json.dumps(run.metadata, indent=2, sort_keys=True)),
            ]
        )
        print()
        print_run(store, run_id)
    return 0


def run_export(args: argparse.Namespace) -> int:
    run_id = single_id(args.run)
    with Store.open(args.data_dir) as store:
        text = run_json(store, run_id) if args.json else store.export_csv(run_id)
    if args.output is None:
        print(text, end="")
        return 0
    try:
        args.output.write_text(text)
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror}") from exc
    return 0
