"""What a workload is: parameters, samples, and which side runs what.

A *workload* (nginx, iperf, fio, the VMEXIT loop, ...) is a plain description plus pure
functions; it never starts a process itself. Whoever runs it (a :class:`Target` from
:mod:`workloads.runner` on the host, the agent in the guest) asks it for argv lists and
hands it the outputs back to parse. That split is what lets the same catalogue drive a
local run, a normal VM and a confidential VM, and it is a security property: in a
confidential VM the host is untrusted, so the agent receives only a workload *name* and
*string parameters*, validates them here (:meth:`Workload.validate`) and builds every
argv itself. Nothing the host sends becomes a shell string.

The shapes::

    Param       one parameter: name, kind ("int" | "float" | "str" | "bool" | "list[int]"),
                the study's value as default, help, optional bounds / choices
    Sample      one measured value: metric, value, unit, direction ("higher" | "lower"
                is better) and string metadata (tool, case, ...)
    ServerPlan  what the agent starts in the guest for a client/server workload: argv, the
                files written into a private temp dir first, the port, how to tell it is up
    Unavailable a measurement that cannot be taken here, with the reason (never faked)

The three kinds of workload (:attr:`Workload.kind`):

``client-server``
    :meth:`Workload.guest_server` gives a :class:`ServerPlan` run in the guest; the host
    runs :meth:`Workload.host_command` against it and :meth:`Workload.parse_host` reads
    the client's stdout (wrk, iperf3 -c, memaslap). ``ping`` is the degenerate case: no
    server, only a host command aimed at the guest.
``guest``
    :meth:`Workload.guest_commands` gives argv lists the guest runs in order;
    :meth:`Workload.parse_guest` reads their stdouts (fio, mbw, sysbench, stress-ng). A
    workload may instead set :attr:`Workload.in_process` and implement
    :meth:`Workload.run_in_process` (``vmexit``: a machine-code loop run through ctypes).
``external``
    The samples come from elsewhere (boot phases from the host daemon, attestation step
    timings from the agent): :meth:`Workload.samples_from` adapts a ``{name: seconds}``
    mapping.

List parameters that name *cases* (ping sizes, UDP packet lengths, fio jobs, vmexit
leaves) are expanded by :meth:`Workload.cases`: one params dict per case, with the list
replaced by a single value, so that every command stays one invocation of one tool. The
metric names carry the case (``rtt_mean_64B``, ``throughput_1460B``), so that samples of
one metric are always comparable.

Placeholders: in :class:`ServerPlan` argv and file contents, ``{dir}`` stands for the
private directory the runner creates for the server (it is substituted as text, after the
plan is built, by whoever starts the server).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Protocol

from cvmcore.errors import CvmError, UsageError
from workloads.capabilities import Capabilities

ParamKind = Literal["int", "float", "str", "bool", "list[int]"]
Direction = Literal["higher", "lower"]
WorkloadKind = Literal["client-server", "guest", "external"]

# Spellings accepted for "bool" parameters (case-insensitive), as the rest of cvmctl does.
_TRUE = ("y", "yes", "1", "true", "on")
_FALSE = ("n", "no", "0", "false", "off")

# The place-holder for the server's private directory in ServerPlan argv and files.
DIR_PLACEHOLDER = "{dir}"

INSTALL_HINT = "scripts/install-workload-tools.sh"

#: The longest parameter text accepted (characters); longer is refused before parsing.
MAX_PARAM_TEXT = 4096


class MissingToolError(CvmError):
    """A binary a workload needs is not on PATH; the message names its Debian package."""

    exit_code = 2


class WorkloadStopped(Exception):
    """Raised by :meth:`Workload.run_in_process` when asked to stop (cancelled, out of time).

    The caller asked for it, so it never reaches a user: the caller raises what stopped it.
    """


class StopFlag(Protocol):
    """What :meth:`Workload.run_in_process` polls between chunks of work (a threading.Event)."""

    def is_set(self) -> bool: ...


class _NeverStop:
    def is_set(self) -> bool:
        return False


NEVER_STOP: StopFlag = _NeverStop()


@dataclass(frozen=True)
class Param:
    """One parameter of a workload, parsed from the ``--param name=value`` text.

    ``default`` is the study's value where the study fixed one (its source is cited in the
    workload's docstring). ``minimum``/``maximum`` bound numbers (and every element of a
    ``list[int]``), ``max_items`` the length of a ``list[int]``; ``choices`` restricts ``str``
    values. Every text is at most :data:`MAX_PARAM_TEXT` characters: the agent parses what
    an untrusted host sends.
    """

    name: str
    kind: ParamKind
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    hex: bool = False  # shown in hexadecimal (ports, MSRs, cpuid leaves); parsing accepts both
    max_items: int | None = None

    def allowed(self) -> str:
        """What values are allowed, in words, for error messages and ``--list``."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        what = {
            "int": "a whole number",
            "float": "a number",
            "str": "text",
            "bool": "yes or no",
            "list[int]": "comma-separated whole numbers",
        }[self.kind]
        num = (lambda v: f"{int(v):#x}") if self.hex else _num
        if self.minimum is not None and self.maximum is not None:
            what += f" from {num(self.minimum)} to {num(self.maximum)}"
        elif self.minimum is not None:
            what += f" >= {num(self.minimum)}"
        elif self.maximum is not None:
            what += f" <= {num(self.maximum)}"
        if self.max_items is not None:
            what += f", at most {self.max_items} of them"
        return what

    def parse(self, text: str) -> Any:
        """The typed value of ``text``; :class:`UsageError` naming the parameter otherwise."""
        try:
            value = self._convert(text.strip()) if len(text) <= MAX_PARAM_TEXT else None
        except ValueError:
            value = None
        if value is None or not self._in_range(value):
            shown = repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text)} characters)"
            raise UsageError(f"parameter {self.name}: {shown} is not allowed (expected {self.allowed()})")
        return value

    def format(self, value: Any) -> str:
        """The text form of a value, the inverse of :meth:`parse` (for metadata and ``--list``)."""
        if self.kind == "list[int]":
            return ",".join(f"{v:#x}" if self.hex else str(v) for v in value)
        if self.kind == "int" and self.hex:
            return f"{value:#x}"
        if self.kind == "bool":
            return "yes" if value else "no"
        return str(value)

    def _convert(self, text: str) -> Any:
        if self.kind == "int":
            return int(text, 0)  # 0x80 for ports and cpuid leaves
        if self.kind == "float":
            number = float(text)
            return number if math.isfinite(number) else None
        if self.kind == "bool":
            lowered = text.lower()
            return True if lowered in _TRUE else False if lowered in _FALSE else None
        if self.kind == "list[int]":
            items = [item.strip() for item in text.split(",")]
            if not items or any(not item for item in items):
                return None
            return [int(item, 0) for item in items]
        return text if text else None

    def _in_range(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.max_items is not None and self.kind == "list[int]" and len(value) > self.max_items:
            return False
        numbers = value if self.kind == "list[int]" else [value] if self.kind in ("int", "float") else []
        return all(
            (self.minimum is None or n >= self.minimum) and (self.maximum is None or n <= self.maximum)
            for n in numbers
        )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Sample:
    """One measured value. ``direction`` says which way is better, for comparisons and figures."""

    metric: str
    value: float
    unit: str
    direction: Direction
    metadata: dict[str, str] = field(default_factory=dict)

    def with_metadata(self, **extra: str) -> Sample:
        return replace(self, metadata={**self.metadata, **extra})


@dataclass(frozen=True)
class Unavailable:
    """A measurement the workload knows of but cannot take here, and why (e.g. hypercalls)."""

    metric: str
    reason: str


@dataclass(frozen=True)
class ServerPlan:
    """A server the agent starts in the guest (the runner's LocalTarget does the same locally).

    ``files`` (path relative to the private dir -> content) are written first; ``{dir}`` in
    ``argv`` and in file contents is replaced by that dir's absolute path. The dir is made
    0755, because servers started as root drop their workers to an unprivileged user
    (nginx: ``nobody``) who must read the page. The server is up when ``port`` accepts a
    TCP connection (``ready="tcp-port"``, the only readiness check so far). It runs in the
    foreground (no daemonising) and is stopped with SIGTERM, then SIGKILL.
    """

    argv: list[str]
    files: dict[str, bytes]
    port: int
    ready: Literal["tcp-port"] = "tcp-port"

    def materialise(self, directory: str) -> tuple[list[str], dict[str, bytes]]:
        """argv and files with ``{dir}`` replaced by ``directory``."""
        argv = [arg.replace(DIR_PLACEHOLDER, directory) for arg in self.argv]
        files = {
            path: content.replace(DIR_PLACEHOLDER.encode(), directory.encode())
            for path, content in self.files.items()
        }
        return argv, files


class Workload:
    """Base class of every catalogue entry; subclasses set the class attributes and override.

    Class attributes: ``name``, ``summary`` (one line), ``kind``, ``params``,
    ``guest_tools`` / ``host_tools`` ({binary: Debian package}), ``duration_param`` (the
    parameter that :meth:`scaled` sets from ``--duration``; ``None`` when a run's length is
    not a parameter), ``case_param`` (the list parameter :meth:`cases` expands) and
    ``in_process`` (the guest side is :meth:`run_in_process`, not argv lists) and ``needs``
    (what a target must offer, from :data:`workloads.capabilities.CAPABILITIES`: a target
    that lacks one refuses the workload before anything boots).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kind: ClassVar[WorkloadKind] = "guest"
    params: ClassVar[tuple[Param, ...]] = ()
    guest_tools: ClassVar[dict[str, str]] = {}
    host_tools: ClassVar[dict[str, str]] = {}
    duration_param: ClassVar[str | None] = None
    case_param: ClassVar[str | None] = None
    in_process: ClassVar[bool] = False
    #: The metrics with their units, in words, for ``bench --list`` (empty: not listed).
    metrics_help: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    #: A server that serves one test well and not always the next (iperf3): started afresh
    #: for every client test (each repetition, and each case of one, such as iperf-udp's
    #: datagram sizes) instead of kept up across them.
    fresh_server_each_repetition: ClassVar[bool] = False
    #: The parameter naming the directory the guest side writes its files in (fio's scratch
    #: file). For each run the runner makes a private directory inside it, passes that in
    #: its place and removes it afterwards (:func:`workloads.execute.own_scratch_dir`).
    scratch_dir_param: ClassVar[str | None] = None

    # -- parameters -------------------------------------------------------------------

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {p.name: (list(p.default) if isinstance(p.default, list) else p.default) for p in self.params}

    def validate(self, raw: Mapping[str, str]) -> dict[str, Any]:
        """The defaults updated with ``raw`` (text values), each parsed and range-checked.

        Raises :class:`UsageError` naming the parameter, the value and what is allowed; an
        unknown parameter likewise, listing the known ones.
        """
        values = self.defaults()
        known = {p.name: p for p in self.params}
        for name, text in raw.items():
            if name not in known:
                names = ", ".join(known) or "none"
                raise UsageError(f"{self.name} has no parameter {name!r} (parameters: {names})")
            values[name] = known[name].parse(text)
        self.check(values)
        return values

    def check(self, params: dict[str, Any]) -> None:
        """Checks across parameters (a subclass hook); raise :class:`UsageError`."""

    def format_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Parameters as text: what travels to the agent and what the store records."""
        known = {p.name: p for p in self.params}
        return {
            name: known[name].format(value) if name in known else str(value) for name, value in params.items()
        }

    def for_target(
        self, params: dict[str, Any], capabilities: Capabilities, explicit: frozenset[str]
    ) -> dict[str, Any]:
        """``params`` adapted to a target's :class:`Capabilities` (fio: its scratch directory).

        ``explicit`` names the parameters the user set, which are never changed.
        """
        return params

    def scaled(self, params: dict[str, Any], duration_seconds: float) -> dict[str, Any]:
        """``params`` with the run length set so one repetition takes about ``duration_seconds``.

        The default sets :attr:`duration_param` (in whole seconds, at least 1), divided
        over the cases; workloads whose length is a count override this.
        """
        if self.duration_param is None:
            return dict(params)
        out = dict(params)
        per_case = duration_seconds / max(1, len(self.cases(params)))
        param = self.param(self.duration_param)
        value = max(1, round(per_case))
        if param.minimum is not None:
            value = max(value, int(param.minimum))
        out[self.duration_param] = value
        return out

    def check_scratch_dir(self, real_path: str) -> None:
        """Refuse (:class:`UsageError`) a scratch directory whose real path, symbolic links
        resolved where the workload runs, is not a place for scratch files."""

    def cases(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One params dict per case (the :attr:`case_param` list split into single values)."""
        if self.case_param is None:
            return [dict(params)]
        return [{**params, self.case_param: [value]} for value in params[self.case_param]]

    # -- tools ------------------------------------------------------------------------

    def missing_tools(self, side: Literal["guest", "host"]) -> dict[str, str]:
        """The {binary: package} of ``side`` that are not on PATH here."""
        tools = self.guest_tools if side == "guest" else self.host_tools
        return {binary: package for binary, package in tools.items() if shutil.which(binary) is None}

    def missing_here(self) -> str | None:
        """Why this workload cannot run on this machine at all, whatever the target (a
        runtime an extra installs, a suite no package provides); None when it can.
        ``bench --list`` prints it and ``bench`` refuses with it before anything boots."""
        return None

    def require_tools(self, side: Literal["guest", "host"]) -> None:
        """Raise :class:`MissingToolError` for the first missing binary of ``side``."""
        for binary, package in self.missing_tools(side).items():
            raise MissingToolError(
                f"{self.name} needs {binary!r}, which is not installed: install the Debian package "
                f"{package} ({INSTALL_HINT})"
            )

    # -- the work ---------------------------------------------------------------------

    def guest_server(self, params: Mapping[str, Any]) -> ServerPlan | None:
        """The server the guest runs for a client/server workload; ``None`` otherwise."""
        return None

    def guest_commands(self, params: Mapping[str, Any]) -> list[list[str]]:
        """argv lists the guest runs in order, for one repetition (guest workloads)."""
        return []

    def parse_guest(self, outputs: list[str], params: Mapping[str, Any]) -> list[Sample]:
        """Samples from the stdouts of :meth:`guest_commands`, in the same order."""
        return []

    def run_in_process(self, params: Mapping[str, Any], stop: StopFlag = NEVER_STOP) -> list[Sample]:
        """One repetition run in the calling process (workloads with :attr:`in_process`).

        It runs on a worker thread, which nothing can interrupt: it polls ``stop`` often
        (at least every few hundred milliseconds) and raises :class:`WorkloadStopped` once
        it is set, so that a cancelled run ends instead of running on abandoned.
        """
        raise NotImplementedError(f"{self.name} does not run in process")

    def unavailable(self, params: Mapping[str, Any]) -> list[Unavailable]:
        """What this workload cannot measure where it is called, and why."""
        return []

    def host_command(self, params: Mapping[str, Any], host: str, port: int) -> list[str] | None:
        """The host-side client's argv against ``host:port``, for one case (client/server)."""
        return None

    def parse_host(self, output: str, params: Mapping[str, Any]) -> list[Sample]:
        """Samples from the host client's stdout, for one case."""
        return []

    #: Whether the host client's stdout so far holds all that :meth:`parse_host` reads; the
    #: client is then stopped if it does not exit by itself (:func:`workloads.execute.run_command`).
    #: None: wait for the client to exit.
    output_complete: Callable[[str], bool] | None = None

    def timeout(self, params: Mapping[str, Any]) -> float:
        """A deadline (seconds) for one command of one case: the run length plus slack."""
        length = float(params[self.duration_param]) if self.duration_param else 60.0
        return length * 2 + 30.0

    def samples_from(self, values: Mapping[str, float]) -> list[Sample]:
        """External workloads: samples from a ``{name: seconds}`` mapping."""
        raise NotImplementedError(f"{self.name} measures its own samples")


def euid_is_root() -> bool:
    """Whether this process is root (servers then drop to an unprivileged user)."""
    return os.geteuid() == 0
