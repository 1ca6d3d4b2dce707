"""The vhost-user-vsock back end: the daemon dials the agent only once QEMU reports the
device's vhost back end started (see host_daemon.vsock_backend's module doc)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from host_daemon.qmp import open_qmp
from host_daemon.vms import AgentDials
from host_daemon.vsock_backend import wait_vhost_started
from tests.host_daemon.test_qmp_client import Peer, fake_qmp

# As QEMU 10.0 answers for the dev guest (x-query-virtio lists the vhost-user-vsock-pci
# device as "vhost-vsock"), trimmed to the members read.
DEVICES = [
    {"name": "virtio-9p", "path": "/machine/peripheral-anon/device[1]/virtio-backend"},
    {"name": "vhost-vsock", "path": "/machine/peripheral-anon/device[2]/virtio-backend"},
]


def status(started: bool) -> dict[str, Any]:
    return {"name": "vhost-vsock", "started": started, "vhost-started": started}


async def test_waits_until_the_vhost_back_end_started(tmp_path: Path) -> None:
    asked: list[dict[str, Any]] = []

    async def script(peer: Peer) -> None:
        await peer.handshake()
        asked.append(await peer.reply(DEVICES))
        for started in (False, False, True):
            asked.append(await peer.reply(status(started)))
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path, deadline=5) as qmp:
        with trio.fail_after(5):
            assert await wait_vhost_started(qmp, poll=0.01) is True
    assert [a["execute"] for a in asked] == ["x-query-virtio"] + ["x-query-virtio-status"] * 3
    assert asked[1]["arguments"] == {"path": DEVICES[1]["path"]}


async def test_qmp_trouble_means_dialling_as_before(tmp_path: Path) -> None:
    """A reply without the member, or a QMP error other than a missing command: not waited for."""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        await peer.reply(DEVICES)
        await peer.reply({"name": "vhost-vsock", "started": True})  # no vhost-started
        await peer.reply(DEVICES)
        cmd = await peer.recv()
        await peer.send({"error": {"class": "GenericError", "desc": "Path not found"}, "id": cmd["id"]})
        await peer.reply([{"name": "vhost-vsock"}, "not a mapping"])
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path, deadline=5) as qmp:
        with trio.fail_after(5):
            for _ in range(3):
                assert await wait_vhost_started(qmp) is False


async def test_a_qemu_that_cannot_say_is_not_waited_for(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        cmd = await peer.recv()
        await peer.send(
            {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "The command x-query-virtio has not been found",
                },
                "id": cmd["id"],
            }
        )
        await peer.reply([])  # a second QEMU-like answer: no virtio device at all
        await trio.sleep_forever()

    async with fake_qmp(tmp_path, script) as path, open_qmp(path, deadline=5) as qmp:
        with trio.fail_after(5):
            assert await wait_vhost_started(qmp) is False
            assert await wait_vhost_started(qmp) is False


def test_a_boot_that_times_out_says_how_its_dials_went() -> None:
    assert AgentDials().describe() == ""  # it never came to dial: the reason adds nothing
    assert (
        "vsock device never started"
        in AgentDials(waiting="the guest's vsock device never started").describe()
    )
    dials = AgentDials()
    dials.attempts, dials.last_error = 87, "hvsock:///run/vm.vsock:1024: no answer within 2 s"
    assert dials.describe() == (
        "87 dial(s) to the agent failed, the last with: hvsock:///run/vm.vsock:1024: no answer within 2 s"
    )
