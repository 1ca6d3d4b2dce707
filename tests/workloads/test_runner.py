"""The driver against a recording fake target: order, warm-ups, failure and abort states."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from cvmcore.errors import RemoteError
from workloads.capabilities import Capabilities, local_capabilities
from workloads.catalogue import get
from workloads.model import Sample, ServerPlan, Unavailable, Workload
from workloads.runner import Progress, RunRequest, run_benchmark
from workloads.store import Store


class FakeTarget:
    listen_address = "127.0.0.1"

    def __init__(self, name: str, log: list[str], value: float = 10.0, fail_at: int | None = None) -> None:
        self.name, self.log, self.value, self.fail_at, self.calls = name, log, value, fail_at, 0

    def capabilities(self) -> Capabilities:
        return local_capabilities()

    async def prepare(self, workload: Workload, params: Mapping[str, Any]) -> None:
        self.log.append(f"{self.name}:prepare")

    async def unavailable(self, workload: Workload, params: Mapping[str, Any]) -> list[Unavailable]:
        return [Unavailable("hypercall", "kernel code")]

    async def start_server(self, plan: ServerPlan) -> tuple[str, int]:
        self.log.append(f"{self.name}:start")
        return "127.0.0.1", plan.port

    async def stop_server(self) -> None:
        self.log.append(f"{self.name}:stop")

    async def cleanup(self, workload: Workload, params: Mapping[str, Any]) -> None:
        self.log.append(f"{self.name}:cleanup")

    def guest_address(self) -> str:
        return "127.0.0.1"

    def client_prefix(self) -> list[str]:
        return []

    async def run_guest(self, workload: Workload, params: Mapping[str, Any]) -> list[Sample]:
        self.calls += 1
        self.log.append(f"{self.name}:run")
        if self.fail_at == self.calls:
            raise RemoteError("the tool crashed")
        if self.fail_at == -self.calls:
            raise KeyboardInterrupt
        await trio.lowlevel.checkpoint()
        return [Sample("score", self.value + self.calls, "ops/s", "higher")]

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake", "name": self.name}


def sysbench_request(targets: dict[str, Any], repeat: int = 3, warmup: int = 1) -> RunRequest:
    workload = get("sysbench")
    return RunRequest(workload, workload.validate({}), targets, repeat=repeat, warmup=warmup)


async def test_interleaves_a_b_and_keeps_warmups_apart(tmp_path: Path) -> None:
    log: list[str] = []
    events: list[Progress] = []
    targets = {"A": FakeTarget("a", log, 100.0), "B": FakeTarget("b", log, 90.0)}
    with Store.open(tmp_path) as store:
        run_id = await run_benchmark(store, sysbench_request(targets), events.append)
        run = store.run(run_id)
        stored = store.samples(run_id)
    assert [e for e in log if e.endswith("run")] == ["a:run", "b:run"] * 4  # 1 warm-up + 3, A B A B
    assert run.status == "completed" and run.target == "a,b"
    assert run.metadata["arms"] == {"A": "a", "B": "b"}
    assert run.metadata["unavailable"]["A"] == [{"metric": "hypercall", "reason": "kernel code"}]
    assert run.metadata["targets"]["B"] == {"kind": "fake", "name": "b"}
    assert "host" in run.metadata and "cvmctl_version" in run.metadata
    assert [(s.arm, s.warmup, s.repetition) for s in stored[:4]] == [
        ("A", True, 0),
        ("B", True, 0),
        ("A", False, 0),
        ("B", False, 0),
    ]
    assert [(e.step, e.phase) for e in events[:2]] == [(1, "start"), (1, "done")]
    assert events[-1].step == events[-1].steps == 8


async def test_a_failing_tool_fails_the_run_and_keeps_what_finished(tmp_path: Path) -> None:
    target = FakeTarget("local", [], fail_at=3)
    with Store.open(tmp_path) as store:
        with pytest.raises(RemoteError):
            await run_benchmark(store, sysbench_request({"": target}))
        [run] = store.runs()
        assert run.status == "failed" and run.metadata["error"] == "the tool crashed"
        assert len(store.samples(run.id)) == 2  # the warm-up and the first repetition


async def test_an_interrupt_aborts_the_run(tmp_path: Path) -> None:
    target = FakeTarget("local", [], fail_at=-2)
    with Store.open(tmp_path) as store:
        with pytest.raises(KeyboardInterrupt):
            await run_benchmark(store, sysbench_request({"": target}))
        assert store.runs()[0].status == "aborted"


async def test_server_up_once_for_one_arm_and_per_turn_for_two(tmp_path: Path) -> None:
    class Once(FakeTarget):
        pass

    workload = get("nginx")
    log: list[str] = []

    # The host client is wrk; replace the case runner's client by a stub through the workload.
    class StubNginx(type(workload)):  # type: ignore[misc]
        def host_command(self, params: Mapping[str, Any], host: str, port: int) -> list[str]:
            return ["echo", "Requests/sec: 5\n  7 requests in 1.00s, 1KB read"]

        def parse_host(self, output: str, params: Mapping[str, Any]) -> list[Sample]:
            return [Sample("requests_per_second", 5.0, "req/s", "higher")]

    stub = StubNginx()
    with Store.open(tmp_path) as store:
        await run_benchmark(
            store, RunRequest(stub, stub.validate({}), {"": Once("one", log)}, repeat=2, warmup=1)
        )
        assert log == ["one:prepare", "one:start", "one:stop", "one:cleanup"]
        log.clear()
        targets = {"A": Once("a", log), "B": Once("b", log)}
        await run_benchmark(store, RunRequest(stub, stub.validate({}), targets, repeat=1, warmup=0))
        assert log == [
            "a:prepare", "b:prepare", "a:start", "a:stop", "b:start", "b:stop",
            "a:stop", "a:cleanup", "b:stop", "b:cleanup",
        ]  # fmt: skip
        params = store.runs()[0].params
        assert params["listen"] == "127.0.0.1"  # filled in from the target


async def test_iperf_gets_a_fresh_server_for_each_client_test(tmp_path: Path) -> None:
    """iperf3 -s serves one test well and not always the next: each datagram size of
    iperf-udp meets a server of its own, within a repetition as across them."""
    workload = get("iperf-udp")

    class StubIperf(type(workload)):  # type: ignore[misc]
        def host_command(self, params: Mapping[str, Any], host: str, port: int) -> list[str]:
            return ["true"]

        def parse_host(self, output: str, params: Mapping[str, Any]) -> list[Sample]:
            return [Sample(f"throughput_{params['length']}B", 1.0, "Gbit/s", "higher")]

    stub = StubIperf()
    log: list[str] = []
    with Store.open(tmp_path) as store:
        params = stub.validate({"length": "64,1460"})
        await run_benchmark(store, RunRequest(stub, params, {"": FakeTarget("one", log)}, repeat=2, warmup=0))
    assert log == ["one:prepare"] + ["one:start", "one:stop"] * 4 + ["one:stop", "one:cleanup"]


async def test_a_workload_the_target_cannot_run_is_refused_before_anything(tmp_path: Path) -> None:
    from workloads.capabilities import ICMP, WorkloadRefused

    class NoIcmp(FakeTarget):
        def capabilities(self) -> Capabilities:
            local = local_capabilities()
            offered = {k: v for k, v in local.offered.items() if k != ICMP}
            return Capabilities(offered, {**local.lacking, ICMP: "its network passes no ICMP"})

    log: list[str] = []
    ping = get("ping")
    request = RunRequest(ping, ping.validate({}), {"A": FakeTarget("a", log), "B": NoIcmp("b", log)})
    with Store.open(tmp_path) as store:
        with pytest.raises(
            WorkloadRefused, match=r"^ping needs ICMP echo from the host to the guest: its network"
        ):
            await run_benchmark(store, request)
        assert store.runs() == [] and log == []
