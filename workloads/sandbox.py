"""Where a workload's processes run: beside the caller, or in a transient systemd unit of their own.

The agent's unit (``systemd/cvm-agent.service``) locks the agent down: loopback-only IP,
three capabilities, no devices beyond kmsg and the TEE guest devices, no writable and
executable memory. Everything it starts inherits that sandbox, and a benchmark cannot work
inside it: the host's wrk and iperf3 must reach the guest's nginx and iperf3, nginx and
``memcached -u nobody`` drop privileges (CAP_SETUID, CAP_SETGID), vmexit times ``/dev/port``
and the MSR device and runs a machine-code page. So under systemd the agent starts each
benchmark process in a *transient* service, ``cvm-workload-<workload>-<n>.service``, made by
``systemd-run`` (systemd-run(1): ``--unit``, ``--property``, ``--pipe``, ``--wait``,
``--collect``) with the sandbox in :data:`WORKLOAD_PROPERTIES`: the network open, the
capabilities and devices the catalogue's tools need and nothing else.

``JoinsNamespaceOf=cvm-agent.service`` with ``PrivateTmp=yes`` gives the workload unit the
agent's own private ``/tmp`` and ``/var/tmp`` (systemd.unit(5), JoinsNamespaceOf=): the
server directory the agent writes (nginx's config and page) and fio's scratch file are the
same files on both sides, and nothing of either lands in the guest's real ``/tmp``.

:func:`detect` picks the mode: ``systemd`` when the caller is itself ``cvm-agent.service``
(``$INVOCATION_ID`` is set, systemd.exec(5), and its cgroup is that unit's) on a system
booted with systemd (``/run/systemd/system`` exists, sd_booted(3)) and ``systemd-run`` is
installed; otherwise ``direct``, the plain fork and exec of the dev guest, the CLI's local
runs and the tests (also when they run inside some other service, e.g. a CI job).

The agent stops every leftover ``cvm-workload-*`` unit when it starts (:func:`stop_all_argv`):
a workload unit outlives an agent killed with SIGKILL (the parent-death signal reaches only
``systemd-run``), and the restarted agent, like its idle-polling recovery, puts things back.

Pure: argv building and the choice of mode; running them is :mod:`workloads.execute`'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

Mode = Literal["direct", "systemd"]
MODES: tuple[Mode, ...] = ("direct", "systemd")
AGENT_UNIT = "cvm-agent.service"
UNIT_PREFIX = "cvm-workload-"

WORKLOAD_PROPERTIES: tuple[str, ...] = (
    f"JoinsNamespaceOf={AGENT_UNIT}",
    "PrivateTmp=yes",
    # nginx chowns its temp dirs and its workers (like memcached -u) drop to nobody; servers
    # bind their ports; ping opens a raw socket; vmexit reads /dev/port and the MSR device;
    # stress-ng and fio raise their priority and lock memory.
    "CapabilityBoundingSet=CAP_CHOWN CAP_SETUID CAP_SETGID CAP_NET_BIND_SERVICE CAP_NET_RAW "
    "CAP_SYS_RAWIO CAP_SYS_NICE CAP_IPC_LOCK",
    "NoNewPrivileges=yes",
    "DevicePolicy=closed",
    "DeviceAllow=/dev/port rw",
    "DeviceAllow=char-cpu/msr rw",
    "ProtectSystem=full",
    "ProtectHome=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures=native",
    # No IPAddressDeny=: the host's clients reach the servers. No MemoryDenyWriteExecute=:
    # the vmexit workload runs a page of machine code it writes.
)
"""The workload unit's sandbox (systemd.exec(5), systemd.resource-control(5))."""

_counter = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """How to start a workload's processes: ``direct`` (fork and exec) or ``systemd`` (a unit)."""

    mode: Mode = "direct"
    properties: tuple[str, ...] = WORKLOAD_PROPERTIES

    @property
    def systemd(self) -> bool:
        return self.mode == "systemd"


DIRECT = Sandbox("direct")


def own_unit(cgroup_file: Path = Path("/proc/self/cgroup")) -> str | None:
    """The systemd unit this process runs in, from its cgroup v2 path (``0::/system.slice/X``)."""
    try:
        text = cgroup_file.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line.rsplit("/", 1)[-1] or None
    return None


def detect(
    environ: Mapping[str, str] | None = None,
    booted: Path = Path("/run/systemd/system"),
    cgroup_file: Path = Path("/proc/self/cgroup"),
) -> Sandbox:
    """``systemd`` when running as cvm-agent.service on a systemd system, else ``direct``.

    The unit itself matters, not only "some service": workload units join its namespaces, and
    a test or a CI job that runs inside another service must keep the direct spawn.
    """
    env = os.environ if environ is None else environ
    if (
        env.get("INVOCATION_ID")
        and booted.is_dir()
        and own_unit(cgroup_file) == AGENT_UNIT
        and shutil.which("systemd-run") is not None
    ):
        return Sandbox("systemd")
    return DIRECT


def choose(mode: str, environ: Mapping[str, str] | None = None) -> Sandbox:
    """The sandbox for ``--workload-sandbox MODE`` (``auto`` = :func:`detect`)."""
    if mode == "auto":
        return detect(environ)
    for known in MODES:
        if mode == known:
            return Sandbox(known)
    raise ValueError(f"unknown workload sandbox {mode!r} (auto, direct or systemd)")


def unit_name(workload: str) -> str:
    """A fresh unit name: ``cvm-workload-<workload>-<pid>-<n>.service`` (unique per agent run)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", workload)[:40] or "run"
    return f"{UNIT_PREFIX}{safe}-{os.getpid()}-{next(_counter)}.service"


def run_argv(sandbox: Sandbox, unit: str, argv: list[str]) -> list[str]:
    """``argv`` in ``unit``, systemd-run waiting for it (``--wait``) and handing it our stdio
    (``--pipe``): a command's stdout comes back to the caller and a server's stderr goes to
    the caller's file, and systemd-run's exit status is the command's. The unit's stdio are
    passed as open descriptors, so a path in the agent's private /tmp never needs resolving
    in the workload unit's namespace (systemd sets up stdio before namespaces)."""
    props = [f"--property={p}" for p in sandbox.properties]
    return ["systemd-run", "--quiet", "--collect", "--wait", "--pipe", f"--unit={unit}", *props, "--", *argv]


def stop_argv(unit: str) -> list[str]:
    """Stop one workload unit and wait until it is gone (SIGTERM, then SIGKILL after its stop
    timeout): the next server may want the same port at once (iperf3, every repetition)."""
    return ["systemctl", "stop", unit]


def kill_argv(unit: str) -> list[str]:
    return ["systemctl", "kill", "--signal=SIGKILL", unit]


def stop_all_argv() -> list[str]:
    """Stop every workload unit (the agent's start-up clean-up after a crash)."""
    return ["systemctl", "stop", f"{UNIT_PREFIX}*.service"]
