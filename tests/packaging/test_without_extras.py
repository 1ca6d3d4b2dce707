"""The guest's set (`pip install cvmctl`, no extras) runs the agent and cvmctl's other commands.

Each check runs in a fresh interpreter in which the modules only an extra installs cannot be
imported, as in a venv without them (scripts/test-wheel.sh does it for real with the wheel).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cvmctl.cli import main as cli_main
from tests.conftest import REPO_ROOT

# Importing any of these fails in the child, as when the extra is not installed.
BLOCKER = """\
import sys
for name in ("cryptography", "matplotlib", "shtab"):
    sys.modules[name] = None
"""


def run_without_extras(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def cvmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return run_without_extras("from cvmctl.cli.main import main\nsys.exit(main(sys.argv[1:]))", *args)


def test_the_agent_and_what_it_runs_import_without_extras() -> None:
    code = """
import importlib, pkgutil
for top in ("cvm", "cvmcore", "guest_agent", "workloads"):
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        importlib.import_module(info.name)
import guest_agent.main
print("ok")
"""
    result = run_without_extras(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


def test_agent_help_without_extras() -> None:
    result = run_without_extras("from guest_agent.main import main\nsys.exit(main(['--help']))")
    assert result.returncode == 0, result.stderr
    assert "--listen" in result.stdout


def test_cvmctl_version_help_and_agent_commands_without_extras() -> None:
    version = cvmctl("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("cvmctl ")
    usage = cvmctl("--help")
    assert usage.returncode == 0, usage.stderr
    assert "attest" in usage.stdout
    assert "pip install 'cvmctl[verify]'" in usage.stdout
    health = cvmctl("agent", "health", "--help")
    assert health.returncode == 0, health.stderr
    assert "--connect" in health.stdout


def test_attest_without_the_verify_extra_is_one_line() -> None:
    for args, named in [
        (("attest", "verify", "report.bin", "--certs", "certs.bin"), "attest verify"),
        (("attest", "--help"), "attest"),
        (("attest",), "attest"),
    ]:
        result = cvmctl(*args)
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr == (
            f"cvmctl: error: cvmctl {named} needs the verify extra: pip install 'cvmctl[verify]'\n"
        )


def test_completion_without_shtab_is_one_line() -> None:
    result = cvmctl("completion", "bash")
    assert result.returncode == 2
    assert (
        result.stderr == "cvmctl: error: cvmctl completion needs the host extra: pip install 'cvmctl[host]'\n"
    )


def test_an_extra_missing_when_a_command_runs_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As `cvmctl report` without matplotlib: its module imports, drawing does not.
    def draw(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    parser = argparse.ArgumentParser(prog="cvmctl")
    parser.set_defaults(func=draw)
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    assert cli_main.main([]) == 2
    assert capsys.readouterr().err == (
        "cvmctl: error: this command needs the report extra (matplotlib is not installed): "
        "pip install 'cvmctl[report]'\n"
    )


def test_other_missing_modules_are_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'grpc'", name="grpc")

    parser = argparse.ArgumentParser(prog="cvmctl")
    parser.set_defaults(func=broken)
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    with pytest.raises(ModuleNotFoundError):
        cli_main.main([])
