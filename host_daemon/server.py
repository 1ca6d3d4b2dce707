"""The HostDaemon gRPC service (cvm.v1.HostDaemon), served to the cvmctl CLI on a unix socket."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import trio

from cvm.v1 import host_pb2
from cvmcore import __version__
from cvmcore.grpc_bridge import CallInfo, GrpcBridge, RpcAbort, service_handler
from cvmcore.tee import tee_to_proto
from host_daemon.accel import resolve_accel
from host_daemon.boottiming import PHASES
from host_daemon.spec import spec_tee
from host_daemon.store import VMRecord, VMState
from host_daemon.vms import VMConflict, VMManager, VMNotFound

SERVICE = host_pb2.DESCRIPTOR.services_by_name["HostDaemon"]

STATE_TO_PROTO = {
    VMState.DEFINED: host_pb2.VM_STATE_DEFINED,
    VMState.STARTING: host_pb2.VM_STATE_STARTING,
    VMState.RUNNING: host_pb2.VM_STATE_RUNNING,
    VMState.STOPPING: host_pb2.VM_STATE_STOPPING,
    VMState.STOPPED: host_pb2.VM_STATE_STOPPED,
    VMState.CRASHED: host_pb2.VM_STATE_CRASHED,
}

MAX_SPEC_BYTES = 256 * 1024


def vm_to_proto(record: VMRecord) -> host_pb2.VM:
    message = host_pb2.VM(
        name=record.name,
        state=STATE_TO_PROTO[record.state],
        tee=tee_to_proto(spec_tee(record.spec_toml)),
        accel=record.accel,
        qemu_pid=record.qemu_pid,
        last_console_lines=list(record.last_console_lines),
        boot_phases=[
            host_pb2.BootPhase(name=phase, seconds=record.boot_phases[phase])
            for phase in PHASES
            if phase in record.boot_phases
        ],
        boot_unmeasured=dict(record.boot_unmeasured),
        agent_address=record.agent_address,
        spec_toml=record.spec_toml,
        created_at=record.created_at,
        started_at=record.started_at,
        state_reason=record.state_reason,
        boot_count=record.boot_count,
        console_path=record.console_path,
        vcpu_thread_ids=list(record.vcpu_thread_ids),
        qemu_argv=list(record.qemu_argv),
        vcpu_pins=[
            host_pb2.VcpuPin(
                vcpu=pin.vcpu, thread_id=pin.thread_id, host_cpu=pin.host_cpu, allowed_cpus=pin.allowed_cpus
            )
            for pin in record.vcpu_pins
        ],
        emulator_cpus=record.emulator_cpus,
    )
    if record.exit_status is not None:
        message.exit_status = record.exit_status
    return message


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.removeprefix("QEMU emulator version ").split(" ")[0]


def _name(value: str) -> str:
    if not value or len(value) > 64:
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "a VM name is 1 to 64 characters")
    return value


class HostDaemonService:
    def __init__(self, *, state_dir: Path, manager: VMManager) -> None:
        self._state_dir = state_dir
        self._manager = manager
        self._started = time.monotonic()
        self._qemu_version: str | None = None

    async def GetDaemonInfo(
        self, request: host_pb2.GetDaemonInfoRequest, call: CallInfo
    ) -> host_pb2.GetDaemonInfoResponse:
        if self._qemu_version is None:
            self._qemu_version = await trio.to_thread.run_sync(qemu_version, self._manager.qemu_binary)
        try:
            accel = resolve_accel("auto").accel
        except Exception:
            accel = "tcg"
        return host_pb2.GetDaemonInfoResponse(
            daemon_version=__version__,
            uptime_seconds=time.monotonic() - self._started,
            state_dir=str(self._state_dir),
            qemu_version=self._qemu_version,
            default_accel=accel,
        )

    async def CreateVM(self, request: host_pb2.CreateVMRequest, call: CallInfo) -> host_pb2.VM:
        if len(request.spec_toml.encode()) > MAX_SPEC_BYTES:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the spec is larger than {MAX_SPEC_BYTES} bytes"
            )
        try:
            record = self._manager.create(request.spec_toml, request.source)
        except VMConflict as exc:
            raise RpcAbort(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
        return vm_to_proto(record)

    async def StartVM(self, request: host_pb2.VMRef, call: CallInfo) -> host_pb2.VM:
        return vm_to_proto(await self._guard(self._manager.start(_name(request.name))))

    async def StopVM(self, request: host_pb2.StopVMRequest, call: CallInfo) -> host_pb2.VM:
        timeout = request.timeout_seconds or 10.0
        if not 0 < timeout <= 600:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds must be in (0, 600]")
        with trio.CancelScope(shield=True):  # a stop, once begun, finishes even if the client leaves
            record = await self._guard(self._manager.stop(_name(request.name), timeout))
        return vm_to_proto(record)

    async def KillVM(self, request: host_pb2.VMRef, call: CallInfo) -> host_pb2.VM:
        return vm_to_proto(await self._guard(self._manager.kill(_name(request.name))))

    async def DestroyVM(self, request: host_pb2.VMRef, call: CallInfo) -> host_pb2.DestroyVMResponse:
        await self._guard(self._manager.destroy(_name(request.name)))
        return host_pb2.DestroyVMResponse()

    async def ListVMs(self, request: host_pb2.ListVMsRequest, call: CallInfo) -> host_pb2.ListVMsResponse:
        return host_pb2.ListVMsResponse(vms=[vm_to_proto(r) for r in self._manager.list()])

    async def GetVM(self, request: host_pb2.VMRef, call: CallInfo) -> host_pb2.VM:
        try:
            return vm_to_proto(self._manager.get(_name(request.name)))
        except VMNotFound as exc:
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, str(exc)) from exc

    async def WatchVMs(
        self, request: host_pb2.WatchVMsRequest, call: CallInfo
    ) -> AsyncIterator[host_pb2.VMEvent]:
        async for event, record in self._manager.watch():
            if record is not None:
                yield host_pb2.VMEvent(vm=vm_to_proto(record), event=event, timestamp=time.time())

    @staticmethod
    async def _guard(operation: Any) -> Any:
        try:
            return await operation
        except VMNotFound as exc:
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        except VMConflict as exc:
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc


def daemon_handlers(
    service: HostDaemonService,
) -> Callable[[GrpcBridge], Iterable[tuple[str, grpc.GenericRpcHandler[Any, Any]]]]:
    def make(bridge: GrpcBridge) -> Iterable[tuple[str, grpc.GenericRpcHandler[Any, Any]]]:
        yield SERVICE.full_name, service_handler(SERVICE, bridge, service)

    return make
