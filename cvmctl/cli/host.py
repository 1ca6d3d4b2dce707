"""cvmctl host check: can this host run normal VMs, SEV-SNP guests, TDX guests?"""

from __future__ import annotations

import argparse
import json
import sys

from host_daemon.hostcheck import TEES, HostReport, TeeName, evaluate, gather

DESCRIPTION = """\
Check this host's requirements for each kind of guest, one line per requirement: ok,
missing (the guest cannot start) or warn (it starts, with a caveat), and for each that is
not ok what to do. The host daemon runs the same checks before it starts a confidential
VM and refuses one this host cannot run.

What is checked: CPU support (cpuinfo flags), KVM and its module parameters
(kvm_amd.sev_snp, kvm_intel.tdx), /dev/kvm, /dev/sev and its access, the SEV-SNP firmware
version, QEMU's version and whether it knows sev-snp-guest / tdx-guest (QEMU is asked),
the firmware each TEE needs and where it was looked for, the TDX quote generation service,
hugepages, and whether normal VMs get KVM or TCG.
"""

EPILOG = """\
exit status:
  0  every TEE asked for with --tee is ready (without --tee: normal VMs can run)
  1  a TEE asked for is not ready
  2  bad input

examples:
  cvmctl host check
  cvmctl host check --tee sev-snp
  cvmctl host check --json | jq '.[] | select(.ready | not) | .tee'
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("host", help="check what this host can run", description="About this host.")
    commands = parser.add_subparsers(title="host commands", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="check the requirements of normal, SEV-SNP and TDX guests",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "--tee",
        action="append",
        choices=TEES,
        help="check only this kind of guest (repeatable; default: all three)",
    )
    check.add_argument("--qemu", default="qemu-system-x86_64", metavar="BINARY", help="the QEMU to ask")
    check.add_argument("--json", action="store_true", help="print a JSON list, one object per TEE")
    check.set_defaults(func=run_check)


def print_report(report: HostReport) -> None:
    verdict = "ready" if report.ready else "not ready"
    under = f" (VMs run under {report.accel})" if report.ready and report.accel else ""
    print(f"{report.tee}: {verdict}{under}")
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        print(f"  {c.status:<8} {c.name:<{width}}  {c.detail}")
        if c.remedy and c.status != "ok":
            print(f"  {'':<8} {'':<{width}}  -> {c.remedy}")


def run_check(args: argparse.Namespace) -> int:
    asked: list[TeeName] = list(dict.fromkeys(args.tee)) if args.tee else list(TEES)
    facts = gather(qemu_binary=args.qemu)
    reports = [evaluate(facts, tee) for tee in asked]
    if args.json:
        json.dump([r.to_json() for r in reports], sys.stdout, indent=2)
        print()
    else:
        for i, report in enumerate(reports):
            if i:
                print()
            print_report(report)
    deciding = reports if args.tee else [r for r in reports if r.tee == "normal"]
    return 0 if all(r.ready for r in deciding) else 1
