"""scripts/install-monitoring.sh: idempotent, and no service starts while apt installs.

apt-get, dpkg-query and prometheus are replaced by stubs on PATH; the stub apt-get records
what policy-rc.d answers at install time (101 = "do not start services").
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "install-monitoring.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the script insists on root")


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def run(
    tmp_path: Path, installed: bool, policy_before: str | None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "apt.log"
    policy = tmp_path / "policy-rc.d"
    if policy_before is not None:
        policy.write_text(policy_before)
        policy.chmod(0o755)
    status = "install ok installed" if installed else "unknown ok not-installed"
    stub(bin_dir, "dpkg-query", f"printf '{status}'")
    stub(
        bin_dir,
        "apt-get",
        f'echo "$*" >>{log}; [ "$1" = install ] || exit 0; "{policy}" x start; echo "policy=$?" >>{log}',
    )
    stub(bin_dir, "prometheus", "echo 'prometheus, version 2.42.0'")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CVM_POLICY_RC_D": str(policy)}
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    return result, log


def test_installs_with_services_forbidden_and_removes_its_policy(tmp_path: Path) -> None:
    result, log = run(tmp_path, installed=False, policy_before=None)
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    assert lines[0].startswith("update")
    assert "prometheus prometheus-node-exporter" in lines[1] and lines[2] == "policy=101"
    assert not (tmp_path / "policy-rc.d").exists()


def test_puts_back_an_existing_policy(tmp_path: Path) -> None:
    result, _ = run(tmp_path, installed=False, policy_before="#!/bin/sh\nexit 0\n")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "policy-rc.d").read_text() == "#!/bin/sh\nexit 0\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("policy-rc.d.")] == []


def test_does_nothing_when_installed(tmp_path: Path) -> None:
    result, log = run(tmp_path, installed=True, policy_before=None)
    assert result.returncode == 0 and "already installed" in result.stderr
    assert not log.exists()
