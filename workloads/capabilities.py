"""What a workload needs from a target, what a target offers, and the refusal when they differ.

A workload that cannot run on a target must say so before anything boots, never fail
midway (a ping that times out, a fio that runs out of space after the file is half laid
out). The check is data, not code spread over the workloads:

- each :class:`workloads.model.Workload` declares :attr:`~workloads.model.Workload.needs`,
  a set of names from :data:`CAPABILITIES`;
- each target answers :class:`Capabilities`: what it offers (with a detail: for
  ``scratch-disk`` the directory scratch files go in) and, for what it lacks, why;
- :func:`refusal` compares the two: ``None`` when the workload can run, else one line for
  the user, e.g. ``ping needs ICMP echo from the host to the guest: target vm ...``.

``cvmctl bench --list`` prints the same answers per workload and target, and ``cvmctl
bench`` refuses up front with them (exit status 2, nothing booted, nothing stored).

The capabilities:

``tcp``
    the host's client reaches a TCP server in the guest (nginx, iperf-tcp, memcached; and
    iperf3's control connection for UDP);
``udp``
    UDP datagrams flow between the host's client and a server in the guest (iperf-udp);
``icmp``
    the host can ping the guest (ping);
``scratch-disk``
    a writable file system on a block device, with O_DIRECT and room for a scratch file
    (fio); the detail is its directory, which becomes fio's ``directory`` unless set;
``vm``
    a VM of the host daemon with its agent: boot phases come from the daemon, attestation
    from the agent (boot, attestation).

An unknown target (one that does not answer) is assumed to offer what the local machine
offers, except ``vm``, which it offers when it can measure external workloads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cvmcore.errors import UsageError

if TYPE_CHECKING:
    from workloads.model import Workload

TCP: Final = "tcp"
UDP: Final = "udp"
ICMP: Final = "icmp"
SCRATCH_DISK: Final = "scratch-disk"
VM: Final = "vm"

#: capability -> how a refusal names the need, with ``{workload}`` for the workload's name
CAPABILITIES: Final[dict[str, str]] = {
    TCP: "{workload} needs the host's client to reach a TCP server in the guest",
    UDP: "{workload} needs UDP between the host's client and a server in the guest",
    ICMP: "{workload} needs ICMP echo from the host to the guest",
    SCRATCH_DISK: (
        "{workload} needs a scratch disk (a file system on a block device, with O_DIRECT and room "
        "for the scratch file)"
    ),
    VM: "{workload} is measured by the host daemon and the agent of a VM",
}


class WorkloadRefused(UsageError):
    """A workload the chosen target cannot run; raised before anything boots or is stored."""


@dataclass(frozen=True)
class Capabilities:
    """What a target offers (capability -> detail) and what it lacks (capability -> why)."""

    offered: Mapping[str, str] = field(default_factory=dict)
    lacking: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*self.offered, *self.lacking):
            if name not in CAPABILITIES:
                raise ValueError(f"unknown capability {name!r}")
        if set(self.offered) & set(self.lacking):
            raise ValueError("a capability is both offered and lacking")

    def missing(self, needs: Iterable[str]) -> dict[str, str]:
        """{need: why not} for every need this target does not offer."""
        return {
            need: self.lacking.get(need, "this target does not say that it offers it")
            for need in sorted(needs)
            if need not in self.offered
        }


def local_capabilities() -> Capabilities:
    """This machine: loopback networking and the host's own /var/tmp; no VM."""
    return Capabilities(
        offered={TCP: "loopback", UDP: "loopback", ICMP: "loopback", SCRATCH_DISK: "/var/tmp"},
        lacking={VM: "use --target vm or vm:NAME (not local)"},
    )


def refusal(workload: Workload, capabilities: Capabilities) -> str | None:
    """Why ``workload`` cannot run on a target with ``capabilities``; None when it can.

    First what rules it out on any target here (:meth:`Workload.missing_here`: a runtime an
    extra installs, a suite no package provides), then the target's missing capabilities.
    """
    here = workload.missing_here()
    if here is not None:
        return here
    missing = capabilities.missing(workload.needs)
    if not missing:
        return None
    return "; ".join(
        f"{CAPABILITIES[need].format(workload=workload.name)}: {why}" for need, why in missing.items()
    )


def check(workload: Workload, capabilities: Capabilities) -> None:
    """Raise :class:`WorkloadRefused` with the :func:`refusal` when there is one."""
    reason = refusal(workload, capabilities)
    if reason is not None:
        raise WorkloadRefused(reason)
