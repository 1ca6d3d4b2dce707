"""cvmctl report: draw the study's figures from stored runs, to PNG and SVG, or one HTML page.

    cvmctl report 3 -o figures/            # one run: its absolute values per metric
    cvmctl report 3 7 -o figures/          # run 7 relative to run 3
    cvmctl report 12 -o figures/           # a --compare run: B relative to A, paired CIs
    cvmctl report c3 --html -o report/     # campaign c3 (cvmctl study): report/report.html
    cvmctl report 12 --html -o report/     # the same page for runs

--html writes one self-contained page (inline SVG figures, no network; see
cvmctl.html_report): the study's figure per item, medians and CIs, the environment of
each arm, what was unavailable and each run's attestation verdict. It needs no extra.

Figures (each as NAME.png and NAME.svg in the output directory, drawn by matplotlib's
Agg backend): "relative" (relative performance bars with 95% CIs; for a single run
"absolute", each metric's median and CI in its unit), "boot" (boot phases
stacked, for boot runs) and "vmexit" (ns per exit, for vmexit runs). How each is
computed: the workloads.figures module.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cvmcore.errors import UsageError
from cvmctl.cli.args import add_data_dir_argument
from workloads.store import Store, iter_ids


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "report",
        help="draw figures (PNG, SVG) or one HTML page (--html) from runs or a campaign",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run ids (the first is the baseline), or one campaign id (c1, ...) with --html",
    )
    parser.add_argument("--html", action="store_true", help="write one self-contained report.html")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="DIR", help="directory for the figures"
    )
    parser.add_argument("--json", action="store_true", help='print {"figures": [PATH, ...]}')
    add_data_dir_argument(parser)
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    if args.html:
        return run_html_report(args)
    if any(word.startswith("c") for word in args.runs):
        raise UsageError("a campaign's report is one HTML page: add --html")
    try:
        from workloads.figures import draw_all
    except ModuleNotFoundError as exc:  # matplotlib
        raise UsageError(f"cvmctl report needs {exc.name}: pip install 'cvmctl[report]'") from None
    ids = list(iter_ids(args.runs))
    with Store.open(args.data_dir) as store:
        runs = [(store.run(i), store.samples(i)) for i in ids]
    try:
        written = draw_all(runs, args.output)
    except OSError as exc:
        raise UsageError(f"cannot write figures to {args.output}: {exc.strerror}") from exc
    if not written:
        raise UsageError("nothing to draw: the runs have no measured samples")
    if args.json:
        print(json.dumps({"figures": [str(p) for p in written]}, indent=2))
        return 0
    for path in written:
        print(path)
    return 0


def run_html_report(args: argparse.Namespace) -> int:
    from cvmctl.html_report import campaign_html, runs_html, write_html
    from workloads.campaign import Campaign
    from workloads.store import default_data_dir

    data_dir = args.data_dir or default_data_dir()
    campaigns = [word for word in args.runs if word.startswith("c")]
    if campaigns and len(args.runs) > 1:
        raise UsageError("--html takes one campaign id, or run ids, not both")
    with Store.open(data_dir) as store:
        if campaigns:
            text = campaign_html(store, Campaign.load(data_dir, campaigns[0]))
        else:
            text = runs_html(store, list(iter_ids(args.runs)))
    try:
        path = write_html(text, args.output)
    except OSError as exc:
        raise UsageError(f"cannot write the report to {args.output}: {exc.strerror}") from exc
    if args.json:
        print(json.dumps({"report": str(path)}, indent=2))
    else:
        print(path)
    return 0
