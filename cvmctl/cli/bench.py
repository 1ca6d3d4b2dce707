"""``cvmctl bench``: run a workload from the study's catalogue, print a table, store the run.

    cvmctl bench --list
    cvmctl bench nginx --target local --duration 5 --repeat 3
    cvmctl bench vmexit --target local --param leaves=0,1 --json
    cvmctl bench nginx --target local --compare local,local     # an A/A test of the noise

Progress goes to stderr, the table (or ``--json``) to stdout; the run, its samples and the
machine's metadata go to the results store (``cvmctl results``). ``--duration S`` scales
the workload down so one repetition takes about S seconds; an explicit ``--param`` wins.

Targets: :func:`resolve_targets` turns ``--target`` (or the two sides of ``--compare``) into
:class:`workloads.runner.Target` objects: ``local`` here, VM targets from
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from cvmcore.defaults import HOSTD_ADDRESS, HOSTD_ENV
from cvmcore.errors import HostNotReady, UsageError
from cvmctl.cli.args import add_data_dir_argument, non_negative_int, positive_float, positive_int
from cvmctl.cli.runview import print_run, run_json
from cvmctl.targets import BuiltinTarget, pair, parse_target
from cvmctl.targets import usage as target_usage
from cvmctl.vm_target import VMTarget, builtin_capabilities
from host_daemon.firmware import first_fit
from host_daemon.hostcheck import HostFacts, evaluate, gather_host_facts
from workloads import catalogue
from workloads.capabilities import Capabilities, local_capabilities, refusal
from workloads.model import Workload
from workloads.runner import LocalTarget, Progress, RunRequest, Target, refuse_unrunnable, run_benchmark
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


def local_tee_name(root: Path) -> str:
    """The TEE of the machine the CLI runs on, by the agent's own detector."""
    from guest_agent.tee import detect_tee

    return str(detect_tee(root).tee.value)


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


def resolve_target(
    name: str,
    builtin: BuiltinTarget | None = None,
    hostd: str | None = None,
    facts: HostFacts | None = None,
) -> Target:
    """The target named ``name``; ``builtin`` is its parsed (and paired) built-in form;
    ``hostd`` the daemon's address (--host), else $CVM_HOSTD, else the system daemon;
    ``facts`` the host check's, whose firmware search a confidential built-in target boots."""
    if builtin is not None:
        return VMTarget(builtin=builtin, firmware=firmware_for(builtin, facts), hostd=hostd)
    if name.startswith("vm:"):
        vm = name.removeprefix("vm:")
        if not vm:
            raise UsageError(f"target {name!r}: expected vm:NAME with a VM's name (cvmctl vm ls)")
        return VMTarget(vm, hostd=hostd)
    if name == "local":
        return LocalTarget()
    if name.startswith("local:"):
        port = name.removeprefix("local:")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"target {name!r}: expected local:PORT with a TCP port")
        return LocalTarget(existing_port=int(port))
    raise UsageError(f"unknown target {name!r} (available: {target_usage()})")


def firmware_for(target: BuiltinTarget, facts: HostFacts | None) -> Path | None:
    """The image a confidential target (or its baseline) boots: the first of the host's that
    fits, from the host check's search (:func:`check_builtin_targets`)."""
    if target.flavour == "none" or facts is None:
        return None
    found = first_fit(list(facts.firmware.get(target.flavour, ())))
    return found.path if found is not None else None


def check_builtin_targets(targets: list[BuiltinTarget]) -> HostFacts | None:
    """Raise :class:`HostNotReady` before anything boots if this host cannot run a target;
    the host's facts when a target is confidential (or a baseline), else None.

    Built-in targets boot the dev guest, whose root is this host's over 9p, so the daemon
    runs here and the local host check is the one that counts.
    """
    tees = sorted({t.flavour for t in targets if t.flavour != "none"})
    if not tees:
        return None
    facts = gather_host_facts()
    for tee in tees:
        report = evaluate(facts, tee)  # type: ignore[arg-type]
        if not report.ready:
            raise HostNotReady(report.reasons() + " (cvmctl host check shows every requirement)")
    return facts


def resolve_targets(args: argparse.Namespace) -> dict[str, Target]:
    """``{"": target}`` for a plain run, ``{"A": ..., "B": ...}`` for ``--compare A,B``."""
    if not args.compare:
        names = [args.target]
    else:
        names = [s.strip() for s in args.compare.split(",")]
        if len(names) != 2 or not all(names):
            raise UsageError(f"--compare {args.compare!r}: expected two targets, A,B")
    builtins = [parse_target(name) for name in names]
    if len(builtins) == 2 and builtins[0] is not None and builtins[1] is not None:
        builtins = list(pair(builtins[0], builtins[1]))
    facts = check_builtin_targets([b for b in builtins if b is not None])
    hostd = args.host
    resolved = [
        resolve_target(name, builtin, hostd, facts) for name, builtin in zip(names, builtins, strict=True)
    ]
    if len(resolved) == 1:
        return {"": resolved[0]}
    return {"A": resolved[0], "B": resolved[1]}


async def run_with_targets(store: Store, request: RunRequest, progress: Any) -> int:
    """Run ``request`` with every VM target open (booted, agent connected) for its duration."""
    async with contextlib.AsyncExitStack() as stack:
        for target in request.targets.values():
            if isinstance(target, VMTarget):
                await stack.enter_async_context(target)
        return await run_benchmark(store, request, progress)


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
