"""The benchmark driver: warm-ups, repetitions, paired A/B interleaving, the store, targets.

A *target* is where the guest side of a workload runs. :class:`Target` is the protocol;
:class:`LocalTarget` runs the "guest" on this machine (``cvmctl bench --target local``,
the tests and ``benchmarks/bench_overhead.py``); the VM target drives the agent in a VM
through the host daemon and implements the same methods.

One run, by :func:`run_benchmark`::

    check what each target offers            -> WorkloadRefused with the reason (workloads.capabilities)
    check host tools (wrk, iperf3, ...)      -> MissingToolError naming the package
    store.begin(...)                          -> run id, status running
    for each arm: target.prepare(workload, params); target.describe()   (guest tools checked)
    [client-server] target.start_server(plan) -> (host, port)
    warm-ups, then repetitions; in each: every arm in turn (A B A B ...), every case
        [client-server] host client argv -> parse_host -> samples
        [guest]         target.run_guest(workload, case) -> samples
        store.add_samples(...) per arm and repetition (one transaction), progress callback
    for each arm: target.unavailable(workload, params); target.describe() again
    target.stop_server(); target.cleanup(workload, params)
    store.finish(completed | failed | aborted)

With one arm the server stays up across repetitions, as in the study; with two (a paired
comparison) each arm's server is started and stopped around its turn, so that the arms can
share ports and neither runs against the other's idle server. Every wait has a deadline:
each host command :meth:`Workload.timeout`, server readiness and stopping the deadlines of
:mod:`workloads.execute`.

Parameters of client/server workloads: unless the caller set ``listen``, the server binds
``target.listen_address`` (``127.0.0.1`` locally, all addresses in a guest). Every workload's
parameters then pass :meth:`Workload.for_target` with the target's capabilities (fio's
scratch file goes on the target's scratch disk).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import trio

from cvmcore.errors import CvmError, RemoteError, UsageError
from workloads.capabilities import Capabilities, WorkloadRefused, local_capabilities, refusal
from workloads.execute import ServerProcess, run_command, run_guest_work
from workloads.metadata import TeeDetector, run_metadata
from workloads.model import Sample, ServerPlan, Unavailable, Workload
from workloads.store import Store


class Target(Protocol):
    """Where the guest side runs. Methods are called in the order of the module docstring."""

    #: short name recorded with the run ("local", "vm:NAME", ...)
    name: str
    #: the address servers bind in this target (a client/server workload's ``listen``)
    listen_address: str

    def capabilities(self) -> Capabilities:
        """What this target offers workloads, and why not the rest; known before it boots."""

    async def prepare(self, workload: Workload, params: Mapping[str, Any]) -> None:
        """Get ready to run ``workload`` (check its guest tools, boot, ...)."""

    async def start_server(self, plan: ServerPlan) -> tuple[str, int]:
        """Start the workload's server; the (host, port) the host-side client connects to."""

    async def run_guest(self, workload: Workload, params: Mapping[str, Any]) -> list[Sample]:
        """One repetition of one case of a guest workload; its samples.

        ``params`` are those of one case (:meth:`Workload.cases`): a VM target sends
        ``workload.name`` and ``workload.format_params(params)`` to the agent, which
        validates them again and calls :func:`workloads.execute.run_guest_work`.
        """

    async def stop_server(self) -> None:
        """Stop the server started last (no-op when none runs)."""

    async def cleanup(self, workload: Workload, params: Mapping[str, Any]) -> None:
        """After the run: anything the target left on the guest side (scratch files are
        removed by :func:`workloads.execute.run_guest_work` after each repetition)."""

    def guest_address(self) -> str:
        """The address of the guest as the host sees it (what ``ping`` pings)."""

    def client_prefix(self) -> list[str]:
        """What the host-side client's argv runs under: ``[]``, or e.g. ``ip netns exec NS``
        when the guest is reachable only inside a network namespace."""

    async def unavailable(self, workload: Workload, params: Mapping[str, Any]) -> list[Unavailable]:
        """What the workload could not measure in this target, and why (asked after the run)."""

    def describe(self) -> dict[str, Any]:
        """Metadata about the target (for a VM: spec, QEMU version, TEE, boot phases).

        Asked after prepare (kept if the run fails) and again after the repetitions.
        """


@dataclass(frozen=True)
class Progress:
    """One step of a run, for a progress display: ``phase`` is "start" or "done"."""

    run_id: int
    arm: str
    repetition: int  # 0-based within warm-ups or within measured repetitions
    warmup: bool
    step: int  # 1-based over the whole run
    steps: int
    phase: Literal["start", "done"]
    samples: tuple[Sample, ...] = ()


ProgressCallback = Callable[[Progress], None]


@dataclass
class RunRequest:
    """What to run: a workload with validated params, on one target or on two arms."""

    workload: Workload
    params: dict[str, Any]
    targets: Mapping[str, Target]  # arm -> target; one entry with arm "" for a plain run
    repeat: int = 5
    warmup: int = 1
    explicit: frozenset[str] = field(default_factory=frozenset)  # params the user set
    metadata: dict[str, Any] = field(default_factory=dict)  # extra run metadata (the CLI's argv, ...)
    detect_tee: TeeDetector | None = None  # names the local machine's TEE for the metadata


def refuse_unrunnable(workload: Workload, targets: Mapping[str, Target]) -> None:
    """Raise :class:`WorkloadRefused` if a target cannot run ``workload`` (before anything runs)."""
    for target in targets.values():
        reason = refusal(workload, target.capabilities())
        if reason is not None:
            raise WorkloadRefused(reason)


def params_for(request: RunRequest, target: Target) -> dict[str, Any]:
    """The request's params with ``listen`` filled in from the target unless set explicitly,
    then adapted to the target's capabilities (:meth:`Workload.for_target`)."""
    params = dict(request.params)
    if "listen" in params and "listen" not in request.explicit:
        params["listen"] = target.listen_address
    return request.workload.for_target(params, target.capabilities(), request.explicit)


async def run_benchmark(store: Store, request: RunRequest, progress: ProgressCallback | None = None) -> int:
    """Run ``request``, storing as it goes; the run id. Re-raises what stopped it."""
    workload = request.workload
    refuse_unrunnable(workload, request.targets)
    if request.repeat < 1 or request.warmup < 0:
        raise UsageError("--repeat must be at least 1 and --warmup at least 0")
    workload.require_tools("host")
    arms = request.targets
    arm_params = {arm: params_for(request, target) for arm, target in arms.items()}
    packages = [*workload.host_tools.values(), *workload.guest_tools.values()]
    metadata = await trio.to_thread.run_sync(
        run_metadata, packages, request.detect_tee
    )  # dpkg-query, git: off the loop
    metadata.update(request.metadata)
    metadata["repeat"], metadata["warmup"] = request.repeat, request.warmup
    metadata["arms"] = {arm: target.name for arm, target in arms.items()} if len(arms) > 1 else {}
    target_name = ",".join(t.name for t in arms.values())
    first_params = next(iter(arm_params.values()))
    run_id = store.begin(workload.name, workload.format_params(first_params), target_name, metadata)
    status: Literal["completed", "failed", "aborted"] = "aborted"
    try:
        for arm, target in arms.items():
            await target.prepare(workload, arm_params[arm])
            metadata.setdefault("targets", {})[arm] = target.describe()
        await _repetitions(store, run_id, request, arm_params, progress)
        for arm, target in arms.items():
            # after the run: a VM target learns these from the agent while running
            notes = await target.unavailable(workload, arm_params[arm])
            metadata.setdefault("unavailable", {})[arm] = [
                {"metric": n.metric, "reason": n.reason} for n in notes
            ]
            metadata["targets"][arm] = target.describe()
        status = "completed"
    except CvmError as exc:
        status = "failed"
        metadata["error"] = str(exc)
        raise
    except BaseException as exc:  # Cancelled, KeyboardInterrupt: aborted
        metadata["error"] = f"interrupted ({type(exc).__name__})"
        raise
    finally:
        with trio.CancelScope(shield=True):
            for arm, target in arms.items():
                await target.stop_server()
                await target.cleanup(workload, arm_params[arm])
        store.finish(run_id, status, metadata)
    return run_id


async def _repetitions(
    store: Store,
    run_id: int,
    request: RunRequest,
    arm_params: dict[str, dict[str, Any]],
    progress: ProgressCallback | None,
) -> None:
    workload, arms = request.workload, request.targets
    plans = {arm: workload.guest_server(params) for arm, params in arm_params.items()}
    endpoints: dict[str, tuple[str, int]] = {}
    keep_up = len(arms) == 1 and not workload.fresh_server_each_repetition
    schedule = [(True, i) for i in range(request.warmup)] + [(False, i) for i in range(request.repeat)]
    steps = len(schedule) * len(arms)
    step = 0
    for warmup, repetition in schedule:
        for arm, target in arms.items():
            step += 1
            params = arm_params[arm]
            if progress:
                progress(Progress(run_id, arm, repetition, warmup, step, steps, "start"))
            plan = plans[arm]
            if plan is not None and arm not in endpoints:
                endpoints[arm] = await target.start_server(plan)
            samples: list[Sample] = []
            for i, case in enumerate(workload.cases(params)):
                if i and plan is not None and workload.fresh_server_each_repetition:
                    await target.stop_server()  # each client test meets a server of its own
                    endpoints[arm] = await target.start_server(plan)
                samples += check_finite(workload, await run_case(workload, target, case, endpoints.get(arm)))
            store.add_samples(run_id, repetition, warmup, samples, arm=arm)
            if plan is not None and not keep_up:
                await target.stop_server()
                del endpoints[arm]
            if progress:
                progress(Progress(run_id, arm, repetition, warmup, step, steps, "done", tuple(samples)))


async def run_case(
    workload: Workload, target: Target, params: Mapping[str, Any], endpoint: tuple[str, int] | None
) -> list[Sample]:
    """One case of one repetition on ``target``: the host client, or the guest's commands."""
    if workload.kind == "guest":
        return await target.run_guest(workload, params)
    if workload.kind == "external":
        # A VM target measures these itself (a boot through the daemon, an attestation
        # request through the agent); run_benchmark checked that it can.
        measure: Callable[[Workload, Mapping[str, Any]], Awaitable[list[Sample]]]
        measure = target.measure_external  # type: ignore[attr-defined]
        return await measure(workload, params)
    host, port = endpoint if endpoint is not None else (target.guest_address(), 0)
    argv = workload.host_command(params, host, port)
    if argv is None:
        raise UsageError(f"{workload.name} has no host-side client")
    argv = [*target.client_prefix(), *argv]
    output = await run_command(argv, workload.timeout(params), workload.name, workload.output_complete)
    return workload.parse_host(output, params)


# -- the local target -------------------------------------------------------------------


class LocalTarget:
    """The guest side on this machine: servers on 127.0.0.1, commands as subprocesses.

    It does what the agent does in a guest, with the same code (:mod:`workloads.execute`)
    and deadlines, so a local run measures the tools and our overhead, not a VM.
    """

    listen_address = "127.0.0.1"

    def __init__(self, existing_port: int | None = None) -> None:
        """``existing_port``: a server already runs on 127.0.0.1 at that port; use it, start none.

        That is ``--target local:PORT``, for measuring cvmctl's own overhead against the
        same server a plain client uses (benchmarks/bench_overhead.py).
        """
        self.existing_port = existing_port
        self.name = "local" if existing_port is None else f"local:{existing_port}"
        self._server = ServerProcess()

    def capabilities(self) -> Capabilities:
        return local_capabilities()

    async def prepare(self, workload: Workload, params: Mapping[str, Any]) -> None:
        workload.require_tools("guest")

    async def unavailable(self, workload: Workload, params: Mapping[str, Any]) -> list[Unavailable]:
        return workload.unavailable(params)

    def client_prefix(self) -> list[str]:
        return []

    def guest_address(self) -> str:
        return "127.0.0.1"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": "local", "note": "guest side run on this machine; no VM"}
        if self.existing_port is not None:
            info["existing_server"] = f"{self.listen_address}:{self.existing_port}"
        return info

    async def start_server(self, plan: ServerPlan) -> tuple[str, int]:
        if self.existing_port is not None:
            return self.listen_address, self.existing_port
        return self.listen_address, await self._server.start(plan, self.listen_address)

    async def stop_server(self) -> None:
        await self._server.stop()

    async def cleanup(self, workload: Workload, params: Mapping[str, Any]) -> None:
        """Nothing left to do: :func:`run_guest_work` removes the scratch files it created."""

    async def run_guest(self, workload: Workload, params: Mapping[str, Any]) -> list[Sample]:
        return await run_guest_work(workload, params)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_finite(workload: Workload, samples: list[Sample]) -> list[Sample]:
    """``samples``, after making sure no value is NaN or infinite (a broken tool, not a result)."""
    for sample in samples:
        if not math.isfinite(sample.value):
            raise RemoteError(f"{workload.name}: {sample.metric} is {sample.value}, not a measurement")
    return samples
