"""cvmctl study: the study's evaluation in one command, as one resumable campaign.

    cvmctl study --targets vm,vm+swiotlb --profile quick
    cvmctl study --targets local,local --items memory,vmexit --profile quick
    cvmctl study --resume c3
    cvmctl study --list

Each catalogue item runs as one stored run (cvmctl results); with two targets it is a
paired comparison, A B A B ..., with the statistics of cvmctl bench --compare. The runs
form a campaign (workloads.campaign): progress says "item k of n" and the time left, an
interruption (Ctrl-C, a crash, kill -9) loses nothing stored, and --resume ID runs only
what did not finish. At the end the HTML report is written (DATA_DIR/campaigns/ID/
report.html, or --output DIR) and a table printed. A run in a confidential guest carries
evidence over its record (cvmctl results verify RUN).

Targets are those of cvmctl bench (vm, sev-snp, tdx, their +swiotlb, +haltpoll and
+idle-poll forms, vm:NAME, local); a target this host cannot run is refused before
anything starts, with the host check's reasons. Items the targets cannot run here (boot
and attestation need a VM; a missing tool) are listed as unavailable, with why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from cvmcore.errors import CvmError, UsageError
from cvmctl.attested import attest_run
from cvmctl.cli.args import add_data_dir_argument, non_negative_int, positive_float, positive_int
from cvmctl.cli.output import print_columns
from cvmctl.cli.runview import print_progress
from cvmctl.resolve import local_tee_name, resolve_target_names
from cvmctl.vm_target import VMTarget
from workloads import catalogue
from workloads.campaign import Campaign, Item, format_seconds
from workloads.capabilities import WorkloadRefused, refusal
from workloads.metadata import package_versions
from workloads.model import Workload
from workloads.runner import LocalTarget, Progress, RunRequest, Target, run_benchmark
from workloads.store import Store, default_data_dir


@dataclass(frozen=True)
class Profile:
    """How long each item runs: ``duration`` per repetition (None: the study's own
    parameters), ``repeat`` measured repetitions per arm after ``warmup`` warm-ups, and
    ``params`` per item on top (sizes that a duration does not scale)."""

    duration: float | None
    repeat: int
    warmup: int
    help: str
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    skip: tuple[str, ...] = ()  # items left out unless named with --items
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # item -> (repeat, warmup)

    def counts_for(self, item: str) -> tuple[int, int]:
        return self.counts.get(item, (self.repeat, self.warmup))


#: quick: the sizes too big for a 1 GiB TCG guest in minutes: fio's 1 GiB scratch file is
#: laid out per job (minutes under TCG), mbw's 2 x 256 MiB arrays beside 1 GiB of swiotlb
#: bounce buffers are more than the guest has.
#: Three of fio's nine jobs, one of each kind (a fio start costs seconds under TCG), and two
#: boots per arm without a warm-up (a TCG boot is most of a minute).
QUICK_PARAMS = {
    "fio": {"size_mb": "64", "jobs": "alat-randread,bw-read,iops-randwrite"},
    "memory": {"mbw_mib": "64"},
}
QUICK_COUNTS = {"boot": (2, 0)}
PROFILES: dict[str, Profile] = {
    "quick": Profile(
        2.0,
        3,
        1,
        "about 2 s per repetition, 3 pairs after 1 warm-up (boot: 2, none), smaller fio"
        " and mbw sizes, three of fio's nine jobs:"
        " a TCG comparison in minutes; leaves out ml-inference and blender (minutes per"
        " repetition in a TCG guest: name them with --items)",
        QUICK_PARAMS,
        ("ml-inference", "blender"),
        QUICK_COUNTS,
    ),
    "paper": Profile(None, 10, 1, "the study's parameters, 10 pairs after 1 warm-up"),
}
DEFAULT_TARGETS = "vm,vm+swiotlb"
#: Debian packages of the VM platform whose versions each run of a study records.
PLATFORM_PACKAGES = ("qemu-system-x86", "ovmf", "linux-image-amd64")
DEFAULT_PROFILE = "quick"
#: What a boot or a step costs beyond the workload itself (a guess the progress corrects).
STEP_OVERHEAD = 2.0
BOOT_STEP = 40.0

EPILOG = (
    """\
profiles:
"""
    + "".join(
        textwrap.fill(p.help, 90, initial_indent=f"  {name:7s}", subsequent_indent=" " * 9) + "\n"
        for name, p in PROFILES.items()
    )
    + """
exit status:
  0 every item completed (or was unavailable here), 1 an item failed (resume retries it),
  2 bad input, 5 this host cannot run a target, 130 interrupted (resume with --resume ID)

examples:
  cvmctl study --targets vm,vm+swiotlb --profile quick
  cvmctl study --targets local,local --items memory,vmexit
  cvmctl study --targets vm,sev-snp --profile paper
  cvmctl study --resume c3
  cvmctl report c3 --html -o report/
"""
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "study",
        help="run the study's items as one paired, resumable campaign and write its report",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--targets",
        metavar="A[,B]",
        help=f"one target, or two to compare (default: {DEFAULT_TARGETS})",
    )
    parser.add_argument(
        "--items", metavar="NAME,...", help="catalogue items to run (default: every item the targets can run)"
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), help="quick (default) or paper")
    parser.add_argument(
        "--repeat", type=positive_int, metavar="N", help="measured repetitions per arm (the profile's)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, metavar="N", help="warm-ups per arm (the profile's)"
    )
    parser.add_argument(
        "--duration", type=positive_float, metavar="S", help="seconds per repetition (the profile's)"
    )
    parser.add_argument("--resume", metavar="ID", help="continue campaign ID (c1, c2, ...) where it stopped")
    parser.add_argument("--list", action="store_true", help="list the campaigns and their progress")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="DIR",
        help="write the HTML report here (default: the campaign's dir)",
    )
    parser.add_argument("--host", metavar="ADDR", help="the daemon for VM targets (as cvmctl bench --host)")
    parser.add_argument("--json", action="store_true", help="print the campaign's summary as JSON at the end")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_data_dir_argument(parser)
    parser.set_defaults(func=run_study)


def parse_targets(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not 1 <= len(names) <= 2 or not all(names):
        raise UsageError(f"--targets {text!r}: expected one target or two, A,B")
    return names


def item_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--items: name at least one item (cvmctl bench --list)")
    for name in names:
        catalogue.get(name)  # UsageError naming the known ones
    if len(set(names)) != len(names):
        raise UsageError(f"--items {text!r}: an item is named twice")
    return names


def why_unavailable(workload: Workload, targets: dict[str, Target]) -> str | None:
    """Why the targets cannot run ``workload`` here, or None: capabilities, then tools
    (the host's client; the guest side's too when it is this machine)."""
    not_here = workload.missing_here()  # on no target at all: no target's name in front
    if not_here is not None:
        return not_here
    for target in targets.values():
        reason = refusal(workload, target.capabilities())
        if reason is not None:
            return f"{target.name}: {reason}"
    missing = workload.missing_tools("host")
    if any(isinstance(t, LocalTarget) for t in targets.values()):
        missing |= workload.missing_tools("guest")
    if missing:
        names = ", ".join(f"{binary} ({package})" for binary, package in missing.items())
        return f"not installed here: {names} (scripts/install-workload-tools.sh)"
    return None


def estimate(workload: Workload, params: dict[str, Any], profile: Profile, arms: int) -> float:
    """Seconds one item should take, for the time-left display (corrected as items finish)."""
    repeat, warmup = profile.counts_for(workload.name)
    steps = (warmup + repeat) * arms
    if workload.kind == "external":
        return steps * BOOT_STEP
    per = profile.duration
    if per is None and workload.duration_param is not None:
        per = float(params.get(workload.duration_param, 10)) * len(workload.cases(params))
    return steps * ((per or 10.0) + STEP_OVERHEAD)


def plan_items(names: list[str] | None, targets: dict[str, Target], profile: Profile) -> list[Item]:
    """The campaign's items: named ones must be runnable (else refused up front); by default
    every catalogue item, those the targets cannot run recorded as unavailable with why."""
    items = []
    for workload in catalogue.CATALOGUE.values():
        if names is not None and workload.name not in names:
            continue
        if names is None and workload.name in profile.skip:
            continue
        reason = why_unavailable(workload, targets)
        if reason is not None and names is not None:
            raise UsageError(f"--items {workload.name}: {reason}")
        raw = profile.params.get(workload.name, {})
        params = workload.validate(raw)
        if profile.duration is not None:
            scaled = workload.scaled(params, profile.duration)
            params = {**scaled, **{name: params[name] for name in raw}}  # the profile's sizes win
        items.append(
            Item(
                name=workload.name,
                params=workload.format_params(params),
                state="unavailable" if reason else "pending",
                reason=reason,
                estimate=estimate(workload, params, profile, len(targets)),
                repeat=profile.counts_for(workload.name)[0] if workload.name in profile.counts else None,
                warmup=profile.counts_for(workload.name)[1] if workload.name in profile.counts else None,
            )
        )
    if names is not None:  # the order the user gave
        items.sort(key=lambda item: names.index(item.name))
    return items


class StudyProgress:
    """Progress lines on stderr: one per item (k of n, time left), one per step of its run."""

    def __init__(self, campaign: Campaign, quiet: bool) -> None:
        self.campaign = campaign
        self.quiet = quiet

    def item(self, item: Item) -> Callable[[Progress], None] | None:
        if self.quiet:
            return None
        measured = self.campaign.measured()
        k = measured.index(item) + 1
        left = format_seconds(self.campaign.time_left() or item.estimate)
        arms = " vs ".join(self.campaign.targets)
        print(
            f"== item {k} of {len(measured)}: {item.name} on {arms} (about {left} left in the study)",
            file=sys.stderr,
            flush=True,
        )
        return print_progress(item.name)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"study {self.campaign.id}: {text}", file=sys.stderr, flush=True)


async def run_campaign(
    store: Store, campaign: Campaign, targets: dict[str, Target], progress: StudyProgress
) -> list[str]:
    """Run every pending item in order, saving the manifest around each; the failures."""
    failures = []
    # What the VM arms run on, beside the workload's tools that every run records.
    platform = await trio.to_thread.run_sync(package_versions, PLATFORM_PACKAGES)
    async with contextlib.AsyncExitStack() as stack:
        for target in targets.values():
            if isinstance(target, VMTarget):
                await stack.enter_async_context(target)  # booted once for the whole study
        for item in campaign.items:
            if item.state not in ("pending", "running", "failed"):
                continue
            workload = catalogue.get(item.name)
            params = workload.validate(item.params)
            for target in targets.values():
                if isinstance(target, VMTarget):
                    target.expect(workload, params)
            item.state, item.reason = "running", None
            campaign.save()
            request = RunRequest(
                workload=workload,
                params=params,
                targets=targets,
                repeat=campaign.repeat if item.repeat is None else item.repeat,
                warmup=campaign.warmup if item.warmup is None else item.warmup,
                explicit=frozenset(),
                metadata={
                    "argv": sys.argv[1:],
                    "duration": campaign.duration,
                    "platform_tools": platform,
                    **campaign.run_metadata(item),
                },
                detect_tee=local_tee_name,
            )
            started = time.monotonic()
            try:
                run_id = await run_benchmark(store, request, progress.item(item))
            except CvmError as exc:
                campaign.reconcile(store.runs())  # picks up the failed run's id
                # A refusal only the booted target could know (its network): unavailable here.
                item.state = "unavailable" if isinstance(exc, WorkloadRefused) else "failed"
                item.reason = str(exc)
                campaign.save()
                if item.state == "failed":
                    failures.append(f"{item.name}: {exc}")
                progress.note(f"{item.name} failed: {exc}")
                continue
            item.runs.append(run_id)
            await attest_run(store, run_id, targets)
            item.state, item.seconds = "completed", time.monotonic() - started
            campaign.save()
    return failures


def chosen_profile(args: argparse.Namespace) -> Profile:
    """The --profile, with --repeat, --warmup and --duration in place of its values."""
    base = PROFILES[args.profile or DEFAULT_PROFILE]
    return Profile(
        args.duration if args.duration is not None else base.duration,
        args.repeat if args.repeat is not None else base.repeat,
        args.warmup if args.warmup is not None else base.warmup,
        base.help,
        base.params,
        base.skip,
        {} if args.repeat is not None or args.warmup is not None else base.counts,
    )


def new_campaign(args: argparse.Namespace, data_dir: Path) -> tuple[Campaign, dict[str, Target]]:
    names = parse_targets(args.targets or DEFAULT_TARGETS)
    wanted = item_names(args.items)
    profile = chosen_profile(args)
    targets = resolve_target_names(names, args.host)  # refuses what this host cannot run
    items = plan_items(wanted, targets, profile)
    if not any(item.state == "pending" for item in items):
        reasons = "; ".join(f"{i.name}: {i.reason}" for i in items)
        raise UsageError(f"none of the items can run on {', '.join(names)} here ({reasons})")
    campaign = Campaign.create(
        data_dir,
        targets=names,
        profile=args.profile or DEFAULT_PROFILE,
        repeat=profile.repeat,
        warmup=profile.warmup,
        duration=profile.duration,
        items=items,
    )
    return campaign, targets


def resumed_campaign(
    args: argparse.Namespace, data_dir: Path, store: Store
) -> tuple[Campaign, dict[str, Target]]:
    options = (("--targets", args.targets), ("--items", args.items), ("--profile", args.profile))
    numbers = (("--repeat", args.repeat), ("--warmup", args.warmup), ("--duration", args.duration))
    given = [flag for flag, value in (*options, *numbers) if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} cannot change a campaign; --resume runs what it planned")
    campaign = Campaign.load(data_dir, args.resume)
    targets = resolve_target_names(list(campaign.targets), args.host)
    return campaign, targets


def run_study(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir or default_data_dir()
    if args.list:
        return list_campaigns(data_dir, as_json=args.json)
    with Store.open(data_dir) as store:
        if args.resume:
            campaign, targets = resumed_campaign(args, data_dir, store)
        else:
            campaign, targets = new_campaign(args, data_dir)
        progress = StudyProgress(campaign, args.quiet)
        for note in campaign.reconcile(store.runs()):
            progress.note(note)
        campaign.save()
        done = [i.name for i in campaign.measured() if i.state == "completed"]
        if args.resume and done:
            progress.note(f"resuming; already completed, not run again: {', '.join(done)}")
        elif not args.resume:
            progress.note(f"started ({len(campaign.measured())} items; resume with --resume {campaign.id})")
        try:
            failures = trio.run(run_campaign, store, campaign, targets, progress)
        except BaseException as exc:
            if not interrupted(exc):
                raise
            campaign.save()
            print(
                f"cvmctl: study {campaign.id} interrupted; what finished is stored. "
                f"Continue with: cvmctl study --resume {campaign.id}",
                file=sys.stderr,
            )
            return 130
        campaign.finished = time.time() if not campaign.pending() else None
        campaign.save()
        report = write_report(store, campaign, args.output)
        print_summary(store, campaign, report, as_json=args.json)
    return 1 if failures else 0


def interrupted(exc: BaseException) -> bool:
    """Ctrl-C, even when trio hands it over inside an exception group (a nursery's)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None


def write_report(store: Store, campaign: Campaign, output: Path | None) -> Path:
    from cvmctl.html_report import write_campaign_report

    return write_campaign_report(store, campaign, output or campaign.directory)


def print_summary(store: Store, campaign: Campaign, report: Path, *, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "campaign": campaign.id,
                    "targets": campaign.targets,
                    "profile": campaign.profile,
                    "report": str(report),
                    "items": [
                        {
                            "name": i.name,
                            "state": i.state,
                            "runs": i.runs,
                            "reason": i.reason,
                            "seconds": i.seconds,
                        }
                        for i in campaign.items
                    ],
                },
                indent=2,
            )
        )
        return
    rows = [
        [
            i.name,
            i.state,
            "-" if i.run_id is None else str(i.run_id),
            "-" if i.seconds is None else format_seconds(i.seconds),
            i.reason or "",
        ]
        for i in campaign.items
    ]
    print(f"study {campaign.id}: {' vs '.join(campaign.targets)}, profile {campaign.profile}")
    print_columns(["item", "state", "run", "took", "note"], rows)
    print(f"report: {report}")


def list_campaigns(data_dir: Path, *, as_json: bool) -> int:
    campaigns = [Campaign.load(data_dir, cid) for cid in Campaign.list_ids(data_dir)]
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": c.id,
                        "targets": c.targets,
                        "profile": c.profile,
                        "completed": sum(i.state == "completed" for i in c.items),
                        "items": len(c.measured()),
                        "finished": c.finished,
                    }
                    for c in campaigns
                ],
                indent=2,
            )
        )
        return 0
    rows = [
        [
            c.id,
            ",".join(c.targets),
            c.profile,
            f"{sum(i.state == 'completed' for i in c.items)}/{len(c.measured())}",
            "finished" if c.finished else "resumable",
        ]
        for c in campaigns
    ]
    print_columns(["id", "targets", "profile", "items done", "state"], rows)
    return 0
