"""Connecting the host exporter to the daemon's VM manager.

In ``host_daemon/main.py``, with ``--metrics-listen tcp://127.0.0.1:9465``::

    from host_daemon.metrics.wiring import serve_host_metrics
    ...
    await nursery.start(manager.run)
    if args.metrics_listen:
        await nursery.start(serve_host_metrics, manager, args.metrics_listen)

:func:`manager_views` is the provider: for every live VM (starting, running, stopping) it
gives the exporter the record's pid, vCPU thread ids, boot phases and agent address, and from
the manager's live handle the QMP client the lifecycle already holds (a QMP socket serves one
client at a time, so the exporter shares it rather than opening its own). The TEE comes from
the VM's spec, the machine type from the QEMU command line the daemon wrote, the QEMU version
from the QMP greeting; each is worked out once per QEMU process. Every VM the manager knows is
in the view, running or not (its state, vCPUs and memory from the spec), so a stopped or
crashed VM keeps its ``cvm_vm_state`` series.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import trio
from prometheus_client.registry import Collector

from cvmcore.address import TcpAddress, parse_address
from cvmcore.errors import UsageError
from host_daemon.metrics.collector import DEFAULT_INTERVAL, HostCollector
from host_daemon.metrics.http import HostEndpoint, serve_host_metrics_http
from host_daemon.metrics.libvirt import LibvirtFollower
from host_daemon.metrics.state import VMView
from host_daemon.netns import network_from_argv
from host_daemon.spec import spec_size, spec_tee
from host_daemon.store import VMRecord
from host_daemon.vms import VMManager


@functools.lru_cache(maxsize=256)
def _machine_of(argv_path: Path, pid: int) -> str:
    """The machine type from the ``-machine`` argument the daemon wrote (``pid`` keys the cache)."""
    try:
        argv = argv_path.read_text().splitlines()
    except OSError:
        return ""
    for flag, value in itertools.pairwise(argv):
        if flag in ("-machine", "-M"):
            return value.split(",", 1)[0].removeprefix("type=")
    return ""


@functools.lru_cache(maxsize=256)
def _tap_of(argv: tuple[str, ...]) -> str:
    """The tap a VM on the daemon's tap path uses, in the namespace its QEMU runs in ("" otherwise)."""
    network = network_from_argv(argv)
    return network.tap if network.namespace else ""


def view_of(manager: VMManager, record: VMRecord) -> VMView:
    live = manager.live_vm(record.name) if record.state.live else None  # the handle: its QMP client
    qmp = live.qmp if live is not None else None
    vcpus, memory_mib = spec_size(record.spec_toml)
    version = ""
    if qmp is not None and qmp.greeting is not None:
        version = ".".join(str(part) for part in qmp.greeting.version)
    run_dir = live.run_dir if live is not None else manager.state_dir / "vms" / record.name
    return VMView(
        name=record.name,
        tee=spec_tee(record.spec_toml),
        machine=_machine_of(run_dir / "qemu.argv", record.qemu_pid) if record.state.live else "",
        qemu_version=version,
        pid=record.qemu_pid,
        vcpu_tids=record.vcpu_thread_ids,
        qmp=qmp,
        agent_address=record.agent_address,
        boot_phases=dict(record.boot_phases),
        boot_unmeasured=dict(record.boot_unmeasured),
        state=str(record.state),
        vcpus=vcpus,
        memory_bytes=float(memory_mib * 1024 * 1024),
        started_at=record.started_at if record.state.live else 0.0,
        tap=_tap_of(tuple(record.qemu_argv)) if record.state.live else "",
    )


def manager_views(manager: VMManager) -> Callable[[], list[VMView]]:
    """The exporter's provider for ``manager``: a view of every VM it knows, running or not."""

    def views() -> list[VMView]:
        return [view_of(manager, record) for record in manager.list()]

    return views


async def serve_host_metrics(
    manager: VMManager,
    listen: str,
    *,
    interval: float = DEFAULT_INTERVAL,
    advertise: str | None = None,
    libvirt: str | None = None,
    extra: Sequence[Collector] = (),
    task_status: trio.TaskStatus[HostEndpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the exporter for ``manager`` and serve it at ``listen`` (``tcp://HOST:PORT``) until cancelled.

    ``libvirt``: a libvirt URI whose domains are followed too (``--libvirt``).
    ``extra`` collectors join the host's /metrics (the daemon's count of undecodable requests).
    """
    address = parse_address(listen, listening=True)
    if not isinstance(address, TcpAddress):
        raise UsageError(f"--metrics-listen must be tcp://HOST:PORT (Prometheus scrapes TCP), not {listen}")
    follower = LibvirtFollower(libvirt) if libvirt else None
    if follower is not None:
        await trio.to_thread.run_sync(follower.poll)  # a bad URI or no libvirt-python: fail at start
    collector = HostCollector(manager_views(manager), interval=interval, libvirt=follower)
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.run)
        endpoint = await nursery.start(
            functools.partial(
                serve_host_metrics_http,
                collector,
                address.host,
                address.port,
                advertise=advertise,
                extra=extra,
            )
        )
        task_status.started(endpoint)
