"""A fake QEMU monitor: QMP on a unix socket answering with recorded statistics.

This machine cannot run KVM guests, so the KVM path of the exporter is tested against this
server. It speaks the QMP session of docs/interop/qmp-spec.rst (greeting, capabilities
negotiation, ``{"execute", "id"}`` -> ``{"return", "id"}``) and answers:

- ``query-stats-schemas``: ``data/kvm-query-stats-schemas.json`` (built to the shape of
  QEMU's qapi/stats.json with x86 KVM's statistic names), or with ``kvm=False`` the reply
  QEMU 10.0.2 gave under TCG on this machine (``data/tcg-query-stats-schemas.json``);
- ``query-stats`` (target ``vcpu``): ``data/kvm-query-stats-vcpu.json`` with every counter
  advanced on each call, only the statistics named in ``providers[].names`` when given
  (``[]`` without KVM, as TCG answers);
- ``query-blockstats``: one disk, ``disk0``, in the shape of qapi/block-core.json's BlockStats
  (the fields the exporter reads), its counters advanced on each call;
- ``query-cpus-fast``, ``query-status``; anything else: ``CommandNotFound``.

``FakeQemu.stop()`` makes it stop answering, like a monitor whose QEMU got SIGSTOP;
``FakeQemu.cont()`` answers what it was sent meanwhile, as QEMU does when continued.

Run as a program it serves a fleet, one socket per VM, for the benchmark::

    python -m tests.host_metrics.fake_qmp --dir /tmp/fleet --count 64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import trio

DATA = Path(__file__).resolve().parent / "data"


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


class FakeQemu:
    """The state of one fake QEMU: its statistics advance on every ``query-stats``."""

    def __init__(
        self, *, kvm: bool = True, vcpus: int = 2, version: tuple[int, int, int] = (10, 0, 2)
    ) -> None:
        self.kvm = kvm
        self.version = version
        self.blockstats_calls = 0
        self._running = trio.Event()
        self._running.set()
        self.calls: dict[str, int] = {}
        self.last_stats_arguments: dict[str, Any] = {}
        recorded = load("kvm-query-stats-vcpu.json")
        self._vcpu_stats = [copy.deepcopy(recorded[i % len(recorded)]) for i in range(vcpus)]
        for index, result in enumerate(self._vcpu_stats):
            result["qom-path"] = f"/machine/unattached/device[{index * 2}]"
        self._schemas = load("kvm-query-stats-schemas.json" if kvm else "tcg-query-stats-schemas.json")

    def stop(self) -> None:
        if self._running.is_set():
            self._running = trio.Event()

    def cont(self) -> None:
        self._running.set()

    async def wait_running(self) -> None:
        await self._running.wait()

    def answer(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        self.calls[command] = self.calls.get(command, 0) + 1
        if command == "query-stats-schemas":
            return {"return": self._schemas}
        if command == "query-stats":
            if not self.kvm or arguments.get("target") != "vcpu":
                return {"return": []}
            self.last_stats_arguments = arguments
            for result in self._vcpu_stats:
                for stat in result["stats"]:
                    if isinstance(stat["value"], int) and stat["name"] not in ("blocking", "guest_mode"):
                        stat["value"] += 1_000_000 if stat["name"].endswith("_ns") else 17
            wanted = {
                n
                for p in arguments.get("providers", [])
                if p.get("provider") == "kvm"
                for n in p.get("names", [])
            }
            if not wanted:
                return {"return": self._vcpu_stats}
            return {
                "return": [
                    {**result, "stats": [s for s in result["stats"] if s["name"] in wanted]}
                    for result in self._vcpu_stats
                ]
            }
        if command == "query-cpus-fast":
            return {
                "return": [
                    {"cpu-index": i, "qom-path": r["qom-path"], "thread-id": 0, "target": "x86_64"}
                    for i, r in enumerate(self._vcpu_stats)
                ]
            }
        if command == "query-status":
            return {"return": {"status": "running", "running": True}}
        if command == "query-blockstats":
            self.blockstats_calls += 1
            calls = self.blockstats_calls
            stats = {
                "rd_bytes": 4096 * calls,
                "wr_bytes": 512 * calls,
                "rd_operations": calls,
                "wr_operations": calls,
            }
            return {
                "return": [
                    {
                        "device": "disk0",
                        "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
                        "stats": stats,
                    }
                ]
            }
        return {"error": {"class": "CommandNotFound", "desc": f"The command {command} has not been found"}}


async def _session(fake: FakeQemu, stream: trio.SocketStream) -> None:
    major, minor, micro = fake.version
    greeting = {
        "QMP": {
            "version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "fake"},
            "capabilities": ["oob"],
        }
    }
    async with stream:
        await stream.send_all(json.dumps(greeting).encode() + b"\r\n")
        buffer = b""
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                await fake.wait_running()
                if not line.strip():
                    continue
                message = json.loads(line)
                command = message["execute"]
                if command == "qmp_capabilities":
                    reply: dict[str, Any] = {"return": {}}
                else:
                    reply = fake.answer(command, message.get("arguments", {}))
                if "id" in message:
                    reply["id"] = message["id"]
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\r\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


async def serve_fake_qmp(
    path: Path, fake: FakeQemu, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``fake`` at the unix socket ``path`` until cancelled."""
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    listener = trio.SocketListener(sock)
    async with listener:
        task_status.started()
        await trio.serve_listeners(lambda stream: _session(fake, stream), [listener])  # type: ignore[arg-type]


async def _fleet(directory: Path, count: int, kvm: bool, vcpus: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    async with trio.open_nursery() as nursery:
        for index in range(count):
            await nursery.start(serve_fake_qmp, directory / f"vm{index}.qmp", FakeQemu(kvm=kvm, vcpus=vcpus))
        print(f"ready {os.getpid()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fleet of fake QMP monitors (one socket per VM).")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--tcg", action="store_true", help="answer as QEMU under TCG (no KVM statistics)")
    args = parser.parse_args(argv)
    trio.run(_fleet, args.dir, args.count, not args.tcg, args.vcpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
