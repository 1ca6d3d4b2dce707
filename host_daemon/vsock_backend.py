"""The agent's vsock channel on the host side: a CID, or a vhost-user backend process.

Two ways to give a guest a vsock device (see :mod:`host_daemon.accel` for which is used):

``vhost-vsock``
    the kernel's ``/dev/vhost-vsock``: the guest gets a context id (CID) unique on the
    host, and the host dials ``vsock://CID:PORT``. CIDs 0-2 are reserved (hypervisor,
    local, host), so guests count from 3.
``vhost-user-vsock``
    ``vhost-device-vsock`` (rust-vmm) holds the device in user space and exposes the
    guest's ports on a unix socket with Firecracker's hybrid-vsock handshake
    (``CONNECT PORT``), dialled as ``hvsock:///run_dir/vm.vsock:PORT``. Each VM has its own
    backend, so the guest CID (3) need not be unique.

Dialling a vhost-user-vsock backend too early
---------------------------------------------
``vhost-device-vsock`` 0.3.0 (the Debian package) handles each host connection as an event of
its one worker thread. An event that comes after QEMU has handed it the guest's memory but
before the guest's driver has its queues ready makes the worker fail on the not-ready queue;
the thread ends, silently, and from then on no host connection is accepted: the agent answers
inside the guest while every dial from the host hangs (reproduced here by dialling in a tight
loop during boots: one boot in six; at the daemon's own pace, about one boot in eighty).
Later upstream versions check the queue's readiness first. The daemon therefore dials only
after QEMU reports the device's vhost back end started (:func:`wait_vhost_started`: QMP
``x-query-virtio-status``, member ``vhost-started``, QEMU >= 7.2), which happens when the
guest's driver sets DRIVER_OK, after its queues are set up.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

import trio

from cvmcore.address import HybridVsockAddress, VsockAddress
from cvmcore.defaults import AGENT_VSOCK_PORT
from cvmcore.errors import CvmError, UsageError
from host_daemon import process as proc
from host_daemon.boottiming import tail_lines
from host_daemon.qmp import QMPClient, QMPError

FIRST_GUEST_CID: Final = 3
#: After QEMU reports the vhost device started, before the first dial: the backend may still be
#: reading the last vhost-user messages QEMU sent without waiting for a reply.
VHOST_START_SETTLE_SECONDS: Final = 0.25
QMP_DEADLINE_SECONDS: Final = 5.0
BACKEND_SOCKET: Final = "vhost-user.sock"
HYBRID_SOCKET: Final = "vm.vsock"
SOCKET_WAIT_SECONDS: Final = 10.0


def stale_sockets(run_dir: Path) -> list[Path]:
    """Sockets a previous boot may have left in ``run_dir``; removed before a start."""
    names = (BACKEND_SOCKET, HYBRID_SOCKET, f"{HYBRID_SOCKET}_{AGENT_VSOCK_PORT}")
    return [run_dir / name for name in names]


def free_cid(used: Iterable[int]) -> int:
    """The lowest guest CID not in ``used``."""
    taken = set(used)
    cid = FIRST_GUEST_CID
    while cid in taken:
        cid += 1
    return cid


def agent_address(channel: str, run_dir: Path, cid: int | None) -> str:
    """The address the host dials to reach the agent, or "" when the channel has none."""
    if channel == "vhost-user-vsock":
        return str(HybridVsockAddress(str(run_dir / HYBRID_SOCKET), AGENT_VSOCK_PORT))
    if channel == "vhost-vsock" and cid is not None:
        return str(VsockAddress(cid, AGENT_VSOCK_PORT))
    return ""


async def start_vhost_device_vsock(run_dir: Path) -> proc.Spawned:
    """The vhost-user backend of the guest's vsock device; QEMU connects to its socket."""
    socket_path = run_dir / BACKEND_SOCKET
    argv = [
        "vhost-device-vsock",
        "--vm",
        f"guest-cid={FIRST_GUEST_CID},socket={socket_path},uds-path={run_dir / HYBRID_SOCKET}",
    ]
    try:
        helper = proc.spawn(argv, run_dir / "vhost-device-vsock.log")
    except OSError as exc:
        raise UsageError(
            f"cannot start vhost-device-vsock: {exc.strerror} (install it with "
            "scripts/install-vhost-device-vsock.sh)"
        ) from exc
    with trio.move_on_after(SOCKET_WAIT_SECONDS):
        while not socket_path.exists():
            if helper.pidfd >= 0 and proc.process_start_ticks(helper.pid) is None:
                break
            await trio.sleep(0.002)
    if not socket_path.exists():
        await proc.kill_and_reap(helper)
        detail = " ".join(tail_lines(run_dir / "vhost-device-vsock.log", 3))
        raise CvmError(f"vhost-device-vsock did not create its socket: {detail}")
    return helper


async def wait_vhost_started(qmp: QMPClient, poll: float = 0.05) -> bool:
    """Until QEMU reports the vsock device's vhost back end started (see the module doc).

    False, at once, where this QEMU cannot say (no ``x-query-virtio``, an unstable command, no
    vsock device, no ``vhost-started`` member) or QMP fails meanwhile (QEMU exiting, a reply
    late on a loaded host): the caller then dials as before, and the exit task tells the rest.
    The caller's deadline bounds the wait.
    """
    try:
        devices = await qmp.execute("x-query-virtio", deadline=QMP_DEADLINE_SECONDS)
        paths = [d.get("path", "") for d in devices if "vsock" in str(d.get("name", ""))]
        if not paths:
            return False
        while True:
            status = await qmp.execute(
                "x-query-virtio-status", {"path": paths[0]}, deadline=QMP_DEADLINE_SECONDS
            )
            if "vhost-started" not in status:
                return False
            if status["vhost-started"]:
                await trio.sleep(VHOST_START_SETTLE_SECONDS)
                return True
            await trio.sleep(poll)
    except (QMPError, AttributeError, TypeError):  # AttributeError, TypeError: an unexpected reply shape
        return False
