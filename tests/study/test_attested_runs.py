"""Attested results end to end: a real run, evidence over its record, ``cvmctl results verify``.

The confidential guest is played by a fake guest device tree (configfs-tsm, the attestation
tests' fake kernel) whose "firmware" signs each report with a test-only AMD-shaped chain
(tests/attestation/testchain.py). The evidence is fetched through a real agent over a unix
socket, as a VM target does, and verified with the chain's ARK passed as roots.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cvmcore.address import UnixAddress
from cvmcore.client import connect
from cvmcore.serve import ServerOptions, serve_grpc
from cvmctl.attested import agent_evidence, attest_run, local_evidence
from cvmctl.cli.main import main
from guest_agent.attestation.guest import fetch_evidence
from guest_agent.server import GuestAgentService, agent_handlers
from guest_agent.tee import detect_tee
from tests.attestation.test_attest_guest import FakeTsmKernel, _tree
from tests.attestation.testchain import FakeAmdChain, make_chain
from workloads import catalogue
from workloads.runner import LocalTarget, RunRequest, run_benchmark
from workloads.store import Store


@pytest.fixture(scope="module")
def chain(attestation_testdata: Path) -> FakeAmdChain:
    return make_chain(attestation_testdata)


def _kernel(chain: FakeAmdChain) -> FakeTsmKernel:
    kernel = FakeTsmKernel("sev_guest", chain.outblob())
    kernel.auxblob = chain.cert_table()
    return kernel


@pytest.fixture
async def agent(chain: FakeAmdChain, tmp_path: Path) -> AsyncIterator[str]:
    """A real agent whose guest is the fake device tree."""
    root = _tree(tmp_path / "guest")
    service = GuestAgentService(
        root=root,
        detect_tee=lambda: detect_tee(root),
        attestation_fetch=functools.partial(fetch_evidence, configfs=_kernel(chain)),
    )
    sock = tmp_path / "agent.sock"
    async with trio.open_nursery() as nursery:
        options = ServerOptions(listen=[UnixAddress(str(sock))], stop_grace=0.5)
        await nursery.start(serve_grpc, agent_handlers(service), options)
        yield f"unix://{sock}"
        nursery.cancel_scope.cancel()


async def _vmexit_run(store: Store) -> tuple[int, LocalTarget]:
    target = LocalTarget()
    workload = catalogue.get("vmexit")
    params = workload.validate({"iterations": "2000"})
    request = RunRequest(workload=workload, params=params, targets={"": target}, repeat=2, warmup=0)
    return await run_benchmark(store, request), target


def _verify(data_dir: Path, run_id: int, *extra: str) -> int:
    return main(["results", "verify", str(run_id), "--data-dir", str(data_dir), *extra])


async def test_run_attested_through_the_agent_verifies_and_an_altered_sample_is_rejected(
    agent: str, chain: FakeAmdChain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    roots = tmp_path / "test-ark.pem"
    roots.write_bytes(chain.ark_pem())
    with Store.open(data_dir) as store:
        run_id, target = await _vmexit_run(store)
        async with connect(UnixAddress(str(tmp_path / "agent.sock"))) as client:
            source = functools.partial(agent_evidence, client, "sev-snp")
            entry = await attest_run(store, run_id, {"": target}, sources={"": source})
    assert entry["arms"][""]["status"] == "attested"
    assert entry["arms"][""]["kind"] == "sev-snp-report"

    assert _verify(data_dir, run_id, "--roots", str(roots)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"run {run_id}: verified"

    # Against AMD's pinned roots the test chain is no proof at all.
    assert _verify(data_dir, run_id) == 1
    assert "rejected" in capsys.readouterr().out

    # One stored sample altered: the record's digest changes, REPORT_DATA no longer matches.
    with sqlite3.connect(data_dir / "results.sqlite3") as db:
        db.execute(
            "UPDATE samples SET value = value * 1.01"
            " WHERE rowid = (SELECT MIN(rowid) FROM samples WHERE run_id = ?)",
            (run_id,),
        )
    assert _verify(data_dir, run_id, "--roots", str(roots)) == 1
    out = capsys.readouterr().out
    assert "rejected: report_data" in out
    assert out.splitlines()[-1] == f"run {run_id}: rejected"


async def test_fake_device_tree_read_locally_verifies(chain: FakeAmdChain, tmp_path: Path) -> None:
    """The local target in a confidential guest reads the kernel itself (an injectable root)."""
    data_dir = tmp_path / "data"
    root = _tree(tmp_path / "guest")
    with Store.open(data_dir) as store:
        run_id, target = await _vmexit_run(store)
        source = functools.partial(local_evidence, root=root, configfs=_kernel(chain))
        await attest_run(store, run_id, {"": target}, sources={"": source})
    roots = tmp_path / "ark.pem"
    roots.write_bytes(chain.ark_pem())
    assert _verify(data_dir, run_id, "--roots", str(roots), "--json") == 0


async def test_normal_run_is_not_attested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    empty_root = tmp_path / "not-a-guest"
    empty_root.mkdir()
    with Store.open(data_dir) as store:
        run_id, target = await _vmexit_run(store)
        source = functools.partial(local_evidence, root=empty_root)
        entry = await attest_run(store, run_id, {"": target}, sources={"": source})
    assert entry["arms"][""] == {"status": "not attested", "reason": entry["arms"][""]["reason"]}
    assert "not a confidential guest" in entry["arms"][""]["reason"]
    assert _verify(data_dir, run_id) == 6
    assert capsys.readouterr().out.splitlines()[-1] == f"run {run_id}: not attested"
