"""Before QEMU runs: can this host start this VM? The host check applied to one spec.

A confidential VM that this host cannot run must be refused at ``vm start`` with the host
check's own words, in well under a second, never fail deep inside QEMU (``-object
tdx-guest`` unknown, KVM refusing the launch, a firmware that will not boot the kernel).
:func:`preflight` takes the spec, after the dev guest has filled it in, and the host's
facts (:func:`host_daemon.hostcheck.gather`), and either raises
:class:`~cvmcore.errors.HostNotReady` listing everything missing, or returns what the
argv builder needs from the host (the TDX quote service the check found).

What is checked, per spec:

* a TEE (``tee = "sev-snp" | "tdx"``): everything ``cvmctl host check --tee T`` checks,
  except that the firmware is the spec's own ``boot.firmware`` when it names one;
* a baseline (``baseline_for``): the firmware, with the same rules as its TEE arm (one
  image must boot both);
* ``[pinning] numa_node``: the ``numactl`` program QEMU is started under;
* ``[pinning] host_cpus``: CPUs this host has and the daemon may use.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace

from cvmcore.errors import HostNotReady
from host_daemon.firmware import check_firmware
from host_daemon.hostcheck import FIRMWARE_CHECK, Check, HostFacts, HostReport, evaluate
from host_daemon.pinning import check_host_cpus
from host_daemon.spec import QgsAddress, VMSpec


@dataclass(frozen=True)
class HostGrant:
    """What the host gives this VM's argv: the resolved TDX quote service, numactl's path."""

    qgs: QgsAddress | None = None
    numactl: str = "numactl"


def _firmware_check(spec: VMSpec) -> Check | None:
    """The spec's own image: for a TEE, what that TEE needs; for a baseline, what a normal VM
    booting a ``-kernel`` needs (the pairing is the user's choice, e.g. an AmdSev image with
    kernel hashes for a measured SNP boot beside a plain OVMF for its baseline)."""
    if spec.boot.firmware is None or spec.flavour == "none":
        return None
    hashes = spec.tee == "sev-snp" and spec.sev_snp.kernel_hashes
    if spec.tee != "none":
        candidate = check_firmware(spec.boot.firmware, spec.tee, kernel_hashes=hashes, pair=not hashes)
    else:
        candidate = check_firmware(spec.boot.firmware, "none", pair=False)
    name = FIRMWARE_CHECK[spec.flavour]
    if candidate.fits:
        return Check(name, "ok", str(spec.boot.firmware))
    why = "; ".join(candidate.problems) if candidate.exists else "does not exist"
    return Check(name, "missing", f"{spec.boot.firmware}: {why}", "set boot.firmware to an image that fits")


def needs_facts(spec: VMSpec) -> bool:
    """Whether :func:`preflight` has anything to check (a plain VM skips gathering)."""
    return spec.flavour != "none"


def preflight(
    spec: VMSpec, facts: HostFacts | None, *, which: Callable[[str], str | None] = shutil.which
) -> HostGrant:
    """Raise :class:`HostNotReady` if this host cannot start ``spec``; else what it grants.

    ``facts`` may be None when :func:`needs_facts` says so. ``[pinning] host_cpus`` naming a
    CPU this host lacks or the daemon may not use is refused here too.
    """
    check_host_cpus(spec.pinning.host_cpus, name=spec.name)
    find = which
    missing: list[Check] = []
    report: HostReport | None = None
    if spec.tee != "none":
        assert facts is not None, "needs_facts(spec) was true"
        report = evaluate(facts, spec.tee)
        checks = list(report.checks)
        own = _firmware_check(spec)
        if own is not None:  # the spec's own image replaces the search of the host's
            checks = [own if c.name == own.name else c for c in checks]
        if spec.tee == "tdx" and spec.tdx.quote_generation_socket != "auto":
            checks = [c for c in checks if c.name != "quote generation service"]
        missing += [c for c in checks if c.status == "missing"]
    else:
        own = _firmware_check(spec)
        if own is not None and own.status == "missing":
            missing.append(own)
    numactl = "numactl"
    if spec.pinning.numa_node is not None:
        found = find("numactl")
        if found is None:
            missing.append(
                Check(
                    "numactl",
                    "missing",
                    "[pinning] numa_node starts QEMU under numactl",
                    "apt install numactl",
                )
            )
        else:
            numactl = found
    if missing:
        tee = spec.tee if spec.tee != "none" else "normal"
        shown = HostReport(tee, tuple(missing)) if report is None else replace(report, checks=tuple(missing))
        raise HostNotReady(f"VM {spec.name!r}: " + shown.reasons())
    qgs = facts.qgs if spec.tee == "tdx" and facts is not None else None
    return HostGrant(qgs=qgs, numactl=numactl)
