"""``cvmctl completion bash|zsh``: the scripts parse, and bash's completes cvmctl's words."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cvmctl.cli.completion import completion_script
from cvmctl.cli.main import build_parser, main

pytest.importorskip("shtab")


def top_level_commands() -> set[str]:
    parser = build_parser()
    subparsers = parser._subparsers
    assert subparsers is not None
    return {name for action in subparsers._group_actions for name in getattr(action, "choices", None) or {}}


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers for the last of WORDS (after `cvmctl`), as the user pressing TAB."""
    line = " ".join(["cvmctl", *words])
    program = (
        f"source {script}\n"
        f"COMP_WORDS=(cvmctl {' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words)}\n"
        f"COMP_LINE={line!r}\n"
        "COMP_POINT=${#COMP_LINE}\n"
        "_shtab_cvmctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [word.strip() for word in result.stdout.splitlines() if word.strip()]


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "cvmctl.bash"
    path.write_text(completion_script("bash"))
    return path


def test_command_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    out = capsys.readouterr().out
    assert "complete " in out
    assert "_shtab_cvmctl" in out
    assert main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("#compdef cvmctl")


def test_unknown_shell_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["completion", "fish"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fish'" in capsys.readouterr().err


def test_bash_script_parses(bash_script: Path) -> None:
    subprocess.run(["bash", "-n", str(bash_script)], check=True)


def test_zsh_script_parses(tmp_path: Path) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (scripts/setup.sh installs it)")
    path = tmp_path / "_cvmctl"
    path.write_text(completion_script("zsh"))
    subprocess.run([zsh, "-n", str(path)], check=True)


def test_bash_completes_every_command(bash_script: Path) -> None:
    commands = top_level_commands()
    assert {"agent", "attest", "completion", "vm"} <= commands
    assert set(complete(bash_script, "")) >= commands
    assert complete(bash_script, "ag") == ["agent"]


def test_bash_completes_subcommands_options_and_choices(bash_script: Path) -> None:
    assert set(complete(bash_script, "agent", "")) >= {"health", "info"}
    assert "--connect" in complete(bash_script, "agent", "health", "--")
    assert complete(bash_script, "completion", "") == ["bash", "zsh"]


def test_path_arguments_complete_file_names(bash_script: Path) -> None:
    text = bash_script.read_text()
    # attest show FILE is a pathlib.Path argument: bash completes file names there.
    assert "_shtab_cvmctl_attest_show_pos_0_COMPGEN=_shtab_compgen_files" in text
