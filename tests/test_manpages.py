"""The man pages come from the argparse parsers: every option is there, escaped, reproducible."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cvmctl.manpages import PAGES, escape, main, parser_for, render


@pytest.mark.parametrize(("program", "section", "summary"), PAGES)
def test_every_option_is_on_the_page(program: str, section: int, summary: str) -> None:
    parser = parser_for(program)
    page = render(program, section, summary, parser)
    assert page.startswith(f".TH {program.upper()} {section} ")
    assert page == render(program, section, summary, parser_for(program))  # no clock, no randomness
    for action in parser._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert escape(option) in page, option


def test_cvmctl_page_has_the_subcommands() -> None:
    page = render("cvmctl", 1, "x", parser_for("cvmctl"))
    assert ".SS cvmctl image build" in page
    assert ".SS cvmctl vm create" in page


def test_escape() -> None:
    assert escape("a\\b") == "a\\eb"
    assert escape(".TH not a macro") == "\\&.TH not a macro"
    assert escape("--listen") == "\\-\\-listen"


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_renders_the_agent_page(tmp_path: Path) -> None:
    assert main([str(tmp_path)]) == 0
    out = subprocess.run(
        ["man", "-M", str(tmp_path), "-P", "cat", "cvm-agent"],  # by name, as Documentation= has it
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert "cvm-agent - the cvmctl guest agent" in out.stdout
    assert "--workload-sandbox" in out.stdout
