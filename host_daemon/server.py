"""The HostDaemon gRPC service (cvm.v1.HostDaemon), served to the cvmctl CLI on a unix socket."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from cvm.v1 import host_pb2
from cvmctl import __version__
from cvmctl.grpc_bridge import CallInfo, GrpcBridge, service_handler

SERVICE = host_pb2.DESCRIPTOR.services_by_name["HostDaemon"]


class HostDaemonService:
    def __init__(self, *, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._started = time.monotonic()

    async def GetDaemonInfo(
        self, request: host_pb2.GetDaemonInfoRequest, call: CallInfo
    ) -> host_pb2.GetDaemonInfoResponse:
        return host_pb2.GetDaemonInfoResponse(
            daemon_version=__version__,
            uptime_seconds=time.monotonic() - self._started,
            state_dir=str(self._state_dir),
        )


def daemon_handlers(
    service: HostDaemonService,
) -> Callable[[GrpcBridge], Iterable[tuple[str, grpc.GenericRpcHandler[Any, Any]]]]:
    def make(bridge: GrpcBridge) -> Iterable[tuple[str, grpc.GenericRpcHandler[Any, Any]]]:
        yield SERVICE.full_name, service_handler(SERVICE, bridge, service)

    return make
