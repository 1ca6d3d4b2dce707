"""The GuestAgent gRPC service: async methods run in trio through the bridge.

Every method treats its request as hostile (in a confidential VM the host is
untrusted): sizes are bounded by the server options, fields are validated here, and
nothing from a request ever reaches a shell.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import grpc
import structlog
import trio
from prometheus_client import CollectorRegistry

from cvm.v1 import agent_pb2
from cvmcore import __version__
from cvmcore.errors import CvmError, UsageError
from cvmcore.grpc_bridge import CallInfo, GrpcBridge, RpcAbort, service_handler
from cvmcore.metrics_http import METRICS_CONTENT_TYPE, render_text
from cvmcore.tee import tee_to_proto
from guest_agent import idle_rpc
from guest_agent.attestation.guest import INTERFACES, NONCE_SIZE, Evidence, fetch_evidence
from guest_agent.attestation.steps import InterfaceUnavailable
from guest_agent.collectors.attestation import AttestationCollector, AttestationStats
from guest_agent.idle_polling import IdlePollingController
from guest_agent.idle_rpc import mode_from_proto, status_to_proto
from guest_agent.system import hostname, read_system_facts, uptime_seconds
from guest_agent.tee import TeeVerdict
from workloads.sandbox import DIRECT, Sandbox

log = structlog.get_logger("guest_agent")

#: How long a new workload server waits for the previous one to stop: longer than
#: workloads.execute.stop_process takes at most (SIGTERM, then SIGKILL, each given
#: SERVER_STOP_TIMEOUT), not imported here because the agent loads workloads on first use.
SERVER_STOP_WAIT = 25.0

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["GuestAgent"].full_name


TeeDetector = Callable[[], TeeVerdict]


class GuestInfo:
    """Builds GetInfo answers. What cannot change during a boot (kernel, boot id, command
    line, TEE) is read once; uptime and hostname are read per call from procfs, whose
    reads are served from memory and never wait on a device."""

    def __init__(self, root: Path, detect_tee: TeeDetector) -> None:
        self._root = root
        facts = read_system_facts(root)
        verdict = detect_tee()
        self.tee = str(verdict.tee)
        self._static = agent_pb2.GetInfoResponse(
            agent_version=__version__,
            kernel_release=facts.kernel_release,
            tee=tee_to_proto(verdict.tee),
            boot_id=facts.boot_id,
            kernel_cmdline=facts.kernel_cmdline,
            tee_evidence=verdict.evidence,
        )

    def response(self) -> agent_pb2.GetInfoResponse:
        response = agent_pb2.GetInfoResponse()
        response.CopyFrom(self._static)
        response.uptime_seconds = uptime_seconds(self._root)
        response.hostname = hostname(self._root)
        return response


class GuestAgentService:
    """Implements cvm.v1.GuestAgent. ``root`` is the filesystem the agent inspects."""

    def __init__(
        self,
        *,
        root: Path,
        detect_tee: TeeDetector,
        idle_polling: IdlePollingController | None = None,
        attestation_fetch: Callable[..., Evidence] = fetch_evidence,
        metrics: CollectorRegistry | None = None,
        workload_sandbox: Sandbox = DIRECT,
    ) -> None:
        self._root = root
        self._sandbox = workload_sandbox
        self._metrics = metrics
        self._fetch_evidence = attestation_fetch
        self.info = GuestInfo(root, detect_tee)
        self._idle_polling = idle_polling
        # One idle-polling change at a time: apply and revert must not interleave.
        self._idle_lock = trio.Lock()
        self._attestation_lock = trio.Lock()
        self._workload_server_busy = False
        self._workload_server_stopping: trio.Event | None = None  # set once the stop is done
        self._workload_run_busy = False
        self.attestation_stats = AttestationStats()
        if metrics is not None:
            metrics.register(AttestationCollector(self.attestation_stats))

    async def GetInfo(self, request: agent_pb2.GetInfoRequest, call: CallInfo) -> agent_pb2.GetInfoResponse:
        return self.info.response()

    async def GetAttestationReport(
        self, request: agent_pb2.GetAttestationReportRequest, call: CallInfo
    ) -> agent_pb2.GetAttestationReportResponse:
        report_data = bytes(request.report_data)
        if len(report_data) != NONCE_SIZE:
            raise UsageError(f"report_data must be exactly {NONCE_SIZE} bytes, got {len(report_data)}")
        interface = request.interface or "auto"
        if interface not in INTERFACES:
            raise UsageError(f"unknown interface {interface[:40]!r}; one of {', '.join(INTERFACES)}")
        vmpl = request.vmpl if request.HasField("vmpl") else None
        fetch = functools.partial(
            self._fetch_evidence, report_data, interface=interface, vmpl=vmpl, root=self._root
        )
        tee = self.info.tee
        async with self._attestation_lock:  # one request at a time: the interfaces are per-guest
            try:
                evidence = await trio.to_thread.run_sync(fetch)
            except InterfaceUnavailable:
                self.attestation_stats.record(tee, interface, "unavailable", None)
                raise
            except UsageError:
                self.attestation_stats.record(tee, interface, "bad_request", None)
                raise
            except CvmError:
                self.attestation_stats.record(tee, interface, "failed", None)
                raise
        self.attestation_stats.record(
            evidence.tee,
            evidence.interface,
            "success",
            evidence.total_seconds,
            [(t.step, t.seconds) for t in evidence.timings],
        )
        log.info(
            "attestation_report",
            interface=evidence.interface,
            tee=evidence.tee,
            seconds=round(evidence.total_seconds, 6),
            peer=call.peer,
        )
        return agent_pb2.GetAttestationReportResponse(
            tee=tee_to_proto(evidence.tee),
            interface=evidence.interface,
            evidence_kind=evidence.kind.value,
            evidence=evidence.data,
            certificates=evidence.certificates or b"",
            steps=[agent_pb2.AttestationStep(name=t.step, seconds=t.seconds) for t in evidence.timings],
        )

    async def GetMetrics(
        self, request: agent_pb2.GetMetricsRequest, call: CallInfo
    ) -> agent_pb2.GetMetricsResponse:
        if self._metrics is None:
            raise RpcAbort(grpc.StatusCode.UNIMPLEMENTED, "metrics are not enabled in this agent")
        # Collectors read snapshots kept fresh by trio tasks: rendering never waits on sysfs.
        text = await trio.to_thread.run_sync(render_text, self._metrics)
        return agent_pb2.GetMetricsResponse(content_type=METRICS_CONTENT_TYPE, text=text)

    # A benchmark's server lives as long as its stream: allow a day, not the default minute.
    rpc_max_seconds: ClassVar[dict[str, float]] = {"RunWorkload": 24 * 3600.0}

    async def RunWorkload(
        self, request: agent_pb2.RunWorkloadRequest, call: CallInfo
    ) -> AsyncIterator[agent_pb2.WorkloadEvent]:
        # Imported on first use: most agents never run a benchmark, and these modules cost
        # resident memory (the agent's budget is tight).
        from workloads.execute import ServerProcess, run_guest_request, start_server_request

        name, raw = request.workload[:64], dict(request.params)
        if request.role == agent_pb2.WORKLOAD_ROLE_SERVER:
            # The host ends one server's stream and asks for the next at once (a run's next
            # repetition or workload, often on the same port): wait for the previous server
            # to be gone, so that the new one is the one listening when it is reported ready.
            stopping = self._workload_server_stopping
            if self._workload_server_busy and stopping is not None:
                with trio.move_on_after(SERVER_STOP_WAIT):
                    await stopping.wait()
            if self._workload_server_busy:
                raise RpcAbort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "a workload server already runs in this guest"
                )
            self._workload_server_busy = True
            server = ServerProcess(self._sandbox)
            try:
                port = await start_server_request(name, raw, server)
                log.info("workload_server_ready", workload=name, port=port, peer=call.peer)
                yield agent_pb2.WorkloadEvent(server_ready=agent_pb2.WorkloadServerReady(port=port))
                await trio.sleep_forever()  # until the host cancels the stream
            finally:
                stopped = self._workload_server_stopping = trio.Event()
                with trio.CancelScope(shield=True):
                    await server.stop()
                self._workload_server_busy = False
                self._workload_server_stopping = None
                stopped.set()
                log.info("workload_server_stopped", workload=name)
        elif request.role == agent_pb2.WORKLOAD_ROLE_RUN:
            # One run at a time: a run measures this guest, and a queue of them would hold
            # RPC slots and worker threads that the agent's other calls need.
            if self._workload_run_busy:
                raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "a workload already runs in this guest")
            self._workload_run_busy = True
            try:
                yield agent_pb2.WorkloadEvent(progress=agent_pb2.WorkloadProgress(message=f"running {name}"))
                samples, missing = await run_guest_request(name, raw, sandbox=self._sandbox)
            finally:
                self._workload_run_busy = False
            for sample in samples:
                yield agent_pb2.WorkloadEvent(
                    sample=agent_pb2.WorkloadSample(
                        metric=sample.metric,
                        value=sample.value,
                        unit=sample.unit,
                        direction=sample.direction,
                        metadata=sample.metadata,
                    )
                )
            for note in missing:
                yield agent_pb2.WorkloadEvent(
                    unavailable=agent_pb2.WorkloadUnavailable(metric=note.metric, reason=note.reason)
                )
        else:
            raise UsageError("role must be SERVER or RUN")

    def _idle(self) -> IdlePollingController:
        if self._idle_polling is None:
            raise RpcAbort(grpc.StatusCode.UNIMPLEMENTED, "idle polling is not enabled in this agent")
        return self._idle_polling

    async def GetIdlePolling(
        self, request: agent_pb2.GetIdlePollingRequest, call: CallInfo
    ) -> agent_pb2.IdlePollingState:
        return status_to_proto(await trio.to_thread.run_sync(self._idle().status))

    async def SetIdlePolling(
        self, request: agent_pb2.SetIdlePollingRequest, call: CallInfo
    ) -> agent_pb2.IdlePollingState:
        controller = self._idle()
        mode = mode_from_proto(request.mode)
        params = idle_rpc.params_from_proto(request.params)
        async with self._idle_lock:
            # Shielded: a client that goes away must not leave a half-applied change.
            with trio.CancelScope(shield=True):
                status = await trio.to_thread.run_sync(controller.apply, mode, params)
        log.info("idle_polling_applied", mode=str(mode), peer=call.peer)
        return status_to_proto(status)

    async def RevertIdlePolling(
        self, request: agent_pb2.RevertIdlePollingRequest, call: CallInfo
    ) -> agent_pb2.IdlePollingState:
        controller = self._idle()
        async with self._idle_lock:
            with trio.CancelScope(shield=True):
                status = await trio.to_thread.run_sync(controller.revert)
        log.info("idle_polling_reverted", peer=call.peer)
        return status_to_proto(status)


def agent_handlers(
    service: GuestAgentService,
) -> Callable[[GrpcBridge], Iterable[tuple[str, grpc.GenericRpcHandler[Any, Any]]]]:
    def make(bridge: GrpcBridge) -> Iterable[tuple[str, grpc.GenericRpcHandler[Any, Any]]]:
        descriptor = agent_pb2.DESCRIPTOR.services_by_name["GuestAgent"]
        yield SERVICE_NAME, service_handler(descriptor, bridge, service)

    return make
