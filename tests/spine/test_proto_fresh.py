"""The committed generated code matches what scripts/gen-proto.sh makes from proto/ now."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        cwd=REPO_ROOT,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "gen-proto.sh produced nothing"
    stale = [
        str(rel)
        for rel in generated
        if not filecmp.cmp(tmp_path / rel, REPO_ROOT / "proto" / rel, shallow=False)
    ]
    assert not stale, f"generated code is stale, run scripts/gen-proto.sh: {stale}"
    committed = {p.relative_to(REPO_ROOT / "proto") for p in (REPO_ROOT / "proto").rglob("*_pb2*.py*")}
    assert committed == set(generated), "generated files without a .proto (or the reverse)"
