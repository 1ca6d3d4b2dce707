"""``cvmctl bench``: run a workload from the study's catalogue, print a table, store the run.

    cvmctl bench --list
    cvmctl bench nginx --target local --duration 5 --repeat 3
    cvmctl bench vmexit --target local --param leaves=0,1 --json
    cvmctl bench nginx --target local --compare local,local     # an A/A test of the noise

Progress goes to stderr, the table (or ``--json``) to stdout; the run, its samples and the
machine's metadata go to the results store (``cvmctl results``). ``--duration S`` scales
the workload down so one repetition takes about S seconds; an explicit ``--param`` wins.

Targets: :func:`resolve_targets` turns ``--target`` (or the two sides of ``--compare``) into
:class:`workloads.runner.Target` objects (:mod:`cvmctl.resolve`): ``local`` here, VM targets from
:mod:`cvmctl.vm_target`, the built-in ones (``vm``, ``sev-snp``, ``tdx`` and their
modifiers) from :mod:`cvmctl.targets`. A confidential target this host cannot run is refused
before anything boots, with the host check's reasons; so is a workload a target cannot run
(its needs against the target's capabilities, :mod:`workloads.capabilities`), with the
reason ``--list`` shows.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
from typing import Any

import trio

from cvmcore.defaults import HOSTD_ADDRESS, HOSTD_ENV
from cvmcore.errors import UsageError
from cvmctl.attested import attest_run
from cvmctl.cli.args import add_data_dir_argument, non_negative_int, positive_float, positive_int
from cvmctl.cli.runview import print_progress, print_run, run_json
from cvmctl.resolve import local_tee_name, resolve_target_names
from cvmctl.targets import BuiltinTarget
from cvmctl.vm_target import VMTarget, builtin_capabilities
from workloads import catalogue
from workloads.capabilities import Capabilities, local_capabilities, refusal
from workloads.model import Workload
from workloads.runner import RunRequest, Target, refuse_unrunnable, run_benchmark
from workloads.store import Store

DEFAULT_TARGET = "vm"

DESCRIPTION = """\
Run a workload from the study's catalogue (cvmctl bench --list), print a summary table and
store the run with its samples and the machine's metadata (cvmctl results). Progress goes
to stderr. --duration S scales a workload down so one repetition takes about S seconds;
an explicit --param wins. --compare A,B runs the two targets interleaved, A B A B, and
reports B's overhead with a 95% confidence interval.
"""

EPILOG = """\
targets:
  vm       the built-in dev guest through cvm-hostd (the default): a daemon is started for
           the call if none answers at $CVM_HOSTD, the guest is booted if it is not running
  sev-snp  the same guest as an AMD SEV-SNP VM (QEMU >= 9.1, an SNP host: cvmctl host check)
  tdx      the same guest as an Intel TDX trust domain (QEMU >= 10.1, a TDX host)
  +swiotlb +haltpoll +idle-poll
           modifiers of those, one difference each: forced bounce buffers (normal VM only),
           the guest's haltpoll cpuidle driver, idle=poll; e.g. vm+swiotlb, sev-snp+haltpoll
  vm:NAME  an existing VM of cvm-hostd (its spec must forward the workload's server port)
  local    everything on this machine, servers on 127.0.0.1 (measures the tools, not a VM)
  local:PORT  as local, against a server already listening on 127.0.0.1:PORT (none started)

  In --compare vm,sev-snp (or vm,tdx) the vm arm is that TEE's baseline: the same firmware,
  CPU model, machine and console, without memory encryption. Each arm's QEMU command line
  is stored with the run (cvmctl results show).

exit status:
  0 done, 1 the run failed, 2 bad input, 3 nothing listening, 4 a deadline passed,
  5 this host cannot run a target (the host check's reasons; nothing booted or stored)

examples:
  cvmctl bench --list
  cvmctl bench nginx --target local --duration 5 --repeat 3
  cvmctl bench iperf-udp --target local --param length=64,1460 --duration 4
  cvmctl bench vmexit --target local --json
  cvmctl bench nginx --target local --compare local,local
  cvmctl bench nginx --compare vm,vm+swiotlb --duration 10
  cvmctl bench nginx --compare vm,sev-snp
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "bench",
        help="run a benchmark from the study's catalogue and store the run",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workload", nargs="?", metavar="NAME", help="workload (see --list)")
    parser.add_argument(
        "--list", action="store_true", help="list the workloads, their parameters and defaults"
    )
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"where to run (default: {DEFAULT_TARGET})")
    parser.add_argument(
        "--compare", metavar="A,B", help="paired comparison of two targets, interleaved A B A B ..."
    )
    parser.add_argument(
        "--repeat", type=positive_int, default=5, metavar="N", help="measured repetitions (5)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=1, metavar="N", help="warm-up repetitions (1)"
    )
    parser.add_argument(
        "--duration",
        type=positive_float,
        metavar="S",
        help="scale the workload so a repetition takes ~S seconds",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="set a workload parameter (repeatable; see --list)",
    )
    parser.add_argument("--json", action="store_true", help="print the stored run as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--host",
        metavar="ADDR",
        help=f"the daemon for VM targets (default: ${HOSTD_ENV}, else {HOSTD_ADDRESS}; with neither"
        " answering, a built-in target starts one for the run)",
    )
    add_data_dir_argument(parser)
    parser.set_defaults(func=run_bench)


def parse_param_args(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; :class:`UsageError` without ``=``."""
    raw: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--param {item!r}: expected NAME=VALUE")
        raw[name.strip()] = value
    return raw


def resolve_params(workload: Workload, raw: dict[str, str], duration: float | None) -> dict[str, Any]:
    """Validated params; ``duration`` scales them, then explicit ``raw`` values win again."""
    params = workload.validate(raw)
    if duration is None:
        return params
    scaled = workload.scaled(params, duration)
    scaled.update({name: params[name] for name in raw})
    workload.check(scaled)
    return scaled


def resolve_targets(args: argparse.Namespace) -> dict[str, Target]:
    """``{"": target}`` for a plain run, ``{"A": ..., "B": ...}`` for ``--compare A,B``."""
    if not args.compare:
        names = [args.target]
    else:
        names = [s.strip() for s in args.compare.split(",")]
        if len(names) != 2 or not all(names):
            raise UsageError(f"--compare {args.compare!r}: expected two targets, A,B")
    return resolve_target_names(names, args.host)


async def run_with_targets(store: Store, request: RunRequest, progress: Any) -> int:
    """Run ``request`` with every VM target open (booted, agent connected) for its duration."""
    async with contextlib.AsyncExitStack() as stack:
        for target in request.targets.values():
            if isinstance(target, VMTarget):
                await stack.enter_async_context(target)
        run_id = await run_benchmark(store, request, progress)
        await attest_run(store, run_id, request.targets)  # while the guests still run
        return run_id


def run_bench(args: argparse.Namespace) -> int:
    if args.list:
        print_catalogue()
        return 0
    if not args.workload:
        raise UsageError("name a workload (cvmctl bench --list shows them)")
    workload = catalogue.get(args.workload)
    raw = parse_param_args(args.param)
    params = resolve_params(workload, raw, args.duration)
    targets = resolve_targets(args)
    refuse_unrunnable(workload, targets)  # before anything starts or boots
    for target in targets.values():
        if isinstance(target, VMTarget):
            target.expect(workload, params)  # vm:NAME: checked against its spec before it boots
    request = RunRequest(
        workload=workload,
        params=params,
        targets=targets,
        repeat=args.repeat,
        warmup=args.warmup,
        explicit=frozenset(raw),
        metadata={"argv": sys.argv[1:], "duration": args.duration},
        detect_tee=local_tee_name,
    )
    with Store.open(args.data_dir) as store:
        progress = None if args.quiet else print_progress(workload.name)
        run_id = trio.run(run_with_targets, store, request, progress)
        if args.json:
            print(run_json(store, run_id), end="")
        else:
            print_run(store, run_id)
    return 0


def listed_targets() -> dict[str, Capabilities]:
    """The targets ``--list`` answers for: this machine and the built-in dev guest."""
    return {"local": local_capabilities(), "vm": builtin_capabilities(BuiltinTarget("vm"))}


def print_catalogue() -> None:
    targets = listed_targets()
    for workload in catalogue.CATALOGUE.values():
        print(f"{workload.name}  ({workload.kind})")
        print(f"    {workload.summary}")
        tools = {**workload.guest_tools, **workload.host_tools}
        if tools:
            print("    tools: " + ", ".join(f"{b} ({p})" for b, p in tools.items()))
        if workload.metrics_help:
            print(
                textwrap.fill(
                    workload.metrics_help, 100, initial_indent="    metrics: ", subsequent_indent=" " * 8
                )
            )
        refusals = {name: refusal(workload, caps) for name, caps in targets.items()}
        runs_on = [name for name, reason in refusals.items() if reason is None]
        print("    runs on: " + (", ".join(runs_on) or "none of " + ", ".join(targets)))
        for name, reason in refusals.items():
            if reason is not None:
                print(
                    textwrap.fill(
                        reason, 100, initial_indent=f"    not on {name}: ", subsequent_indent=" " * 8
                    )
                )
        for p in workload.params:
            print(f"    {p.name}={p.format(p.default)}  {p.help}; {p.allowed()}")
        print()
    print(
        "targets: vm stands for every built-in target (sev-snp, tdx and the +modifiers are the same\n"
        "dev guest); vm:NAME can run what its spec offers, checked before the VM boots."
    )
