"""cvmctl results: list, show and export the runs cvmctl bench stored.

    cvmctl results ls
    cvmctl results show 3
    cvmctl results export 3 --csv > run3.csv
    cvmctl results export 3 --json -o run3.json
    cvmctl results verify 3

Listing opens the store, which also marks runs whose benchmark process died as aborted.

``verify RUN`` checks an attested run (cvmctl.attested): it rebuilds the SHA-512 of the
run's record from what is stored now and verifies the evidence the confidential guest gave
over it (chain, signature, REPORT_DATA). Exit status: 0 verified, 1 rejected (an altered
sample, a broken chain; the failed check is named), 2 bad input, 6 not attested (a normal
VM or the local machine: no evidence was ever stored for the run, and none is faked).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from cvmcore.errors import UsageError
from cvmctl.cli.args import add_data_dir_argument, parse_time
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

    verify = commands.add_parser(
        "verify", help="verify a run's attestation: verified, rejected or not attested"
    )
    verify.add_argument("run", metavar="RUN", help="run id")
    verify.add_argument("--at", metavar="TIME", help="verify as of this ISO 8601 time (default: now, UTC)")
    verify.add_argument(
        "--certs",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="more certificates (PEM/DER): the VCEK when the evidence brought none",
    )
    verify.add_argument(
        "--roots",
        type=Path,
        metavar="FILE",
        help="trust these ARKs (PEM) instead of AMD's pinned ones: for test chains only",
    )
    verify.add_argument("--json", action="store_true", help="print the verdict and every check as JSON")
    add_data_dir_argument(verify)
    verify.set_defaults(func=run_verify)


NOT_ATTESTED_EXIT = 6


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


def run_verify(args: argparse.Namespace) -> int:
    from cvmattest.certs import load_certificate_file
    from cvmctl.attested import verify_run

    run_id = single_id(args.run)
    extra = []
    for path in args.certs:
        extra += load_certificate_file(_read_file(path), str(path))
    arks = None
    if args.roots is not None:
        arks = load_certificate_file(_read_file(args.roots), str(args.roots))
    with Store.open(args.data_dir) as store:
        verdict = verify_run(store, run_id, at=parse_time(args.at), extra_certificates=extra, arks=arks)
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
    else:
        if arks is not None:
            print(f"trust anchors: {args.roots} in place of AMD's pinned ARKs (a test chain)")
        if verdict.digest_matches is False:
            print("record: the stored run no longer has the digest its evidence was fetched over")
        for arm in verdict.arms:
            print(f"{arm.arm or 'run'}: {arm.verdict}: {arm.detail}")
        print(f"run {run_id}: {verdict.verdict}")
    if verdict.verdict == "verified":
        return 0
    return 1 if verdict.verdict == "rejected" else NOT_ATTESTED_EXIT


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
