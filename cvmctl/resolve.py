"""From target names to :class:`workloads.runner.Target` objects, for ``cvmctl bench`` and
``cvmctl study``: ``local`` here, ``vm:NAME`` an existing VM of cvm-hostd, the built-in
targets (``vm``, ``sev-snp``, ``tdx`` and their modifiers, :mod:`cvmctl.targets`) as
:class:`cvmctl.vm_target.VMTarget`.

A confidential built-in target this host cannot run is refused here, before anything
boots, with the host check's reasons (:func:`check_builtin_targets`); a pair of built-in
targets is made each other's baseline (:func:`cvmctl.targets.pair`).
"""

from __future__ import annotations

from pathlib import Path

from cvmcore.errors import HostNotReady, UsageError
from cvmctl.targets import BuiltinTarget, pair, parse_target
from cvmctl.targets import usage as target_usage
from cvmctl.vm_target import VMTarget
from host_daemon.firmware import first_fit
from host_daemon.hostcheck import HostFacts, evaluate, gather_host_facts
from workloads.runner import LocalTarget, Target


def local_tee_name(root: Path) -> str:
    """The TEE of the machine the CLI runs on, by the agent's own detector."""
    from guest_agent.tee import detect_tee

    return str(detect_tee(root).tee.value)


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


def resolve_target_names(names: list[str], hostd: str | None) -> dict[str, Target]:
    """One name: ``{"": target}``; two: ``{"A": ..., "B": ...}``, a built-in pair made each
    other's baseline; the host check refuses what this host cannot run before anything boots."""
    builtins = [parse_target(name) for name in names]
    if len(builtins) == 2 and builtins[0] is not None and builtins[1] is not None:
        builtins = list(pair(builtins[0], builtins[1]))
    facts = check_builtin_targets([b for b in builtins if b is not None])
    resolved = [
        resolve_target(name, builtin, hostd, facts) for name, builtin in zip(names, builtins, strict=True)
    ]
    if len(resolved) == 1:
        return {"": resolved[0]}
    return {"A": resolved[0], "B": resolved[1]}
