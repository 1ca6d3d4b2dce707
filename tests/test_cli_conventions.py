"""What a script or a person relies on in every ``cvmctl`` command."""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from cvmcore.errors import UsageError
from cvmctl.cli.main import build_parser, main

#: Commands that print no data (a script, not a result).
NO_JSON = {"completion"}


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, child in action.choices.items():
            yield from leaves(child, (*path, name))


LEAVES = list(leaves(build_parser()))


@pytest.mark.parametrize(("path", "parser"), LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_command_that_prints_data_has_json(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    if path[0] in NO_JSON:
        return
    assert any("--json" in a.option_strings for a in parser._actions), f"cvmctl {' '.join(path)} lacks --json"


@pytest.mark.parametrize(("path", "parser"), LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_help_teaches_without_this_machine_or_markup(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    text = parser.format_help()
    for leak in (str(Path.home()), sys.prefix, str(Path(__file__).resolve().parents[1])):
        assert leak not in text, f"cvmctl {' '.join(path)} --help shows {leak}"
    for markup in ("``", ":mod:", ":func:", ":class:", ":data:"):
        assert markup not in text, f"cvmctl {' '.join(path)} --help has {markup}"


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_errors_are_json_in_json_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_json(
        ["agent", "health", "--connect", f"unix://{tmp_path}/none.sock", "--json"], capsys
    )
    assert code == 3
    assert out == {"error": {"type": "ConnectError", "message": out["error"]["message"], "exit_code": 3}}  # type: ignore[index]
    assert "nothing is listening" in err
    code, out, _ = run_json(["results", "show", "999", "--json", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and out["error"]["type"] == "UsageError"  # type: ignore[index]
    buffer = io.StringIO()
    with pytest.raises(SystemExit) as bad, redirect_stdout(buffer):
        main(["bench", "nginx", "--repeat", "x", "--json"])
    assert bad.value.code == 2
    error = json.loads(buffer.getvalue())["error"]
    assert error["exit_code"] == 2 and "--repeat" in error["message"]


def test_agent_address_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--connect defaults to $CVM_AGENT, as --host to $CVM_HOSTD."""
    monkeypatch.setenv("CVM_AGENT", f"unix://{tmp_path}/agent.sock")
    code, out, _ = run_json(["agent", "health", "--json"], capsys)
    assert code == 3 and str(tmp_path / "agent.sock") in out["error"]["message"]  # type: ignore[index]
    monkeypatch.delenv("CVM_AGENT")
    with pytest.raises(SystemExit):
        main(["agent", "health"])
    assert "--connect" in capsys.readouterr().err


def test_environment_errors_are_one_line_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError from a path the user gave: one line (and JSON), never a traceback."""
    (tmp_path / "file").write_text("")
    code, out, err = run_json(
        ["image", "clean", "--cache-dir", str(tmp_path / "file" / "x"), "--json"], capsys
    )
    assert code == 1 and out["error"]["type"] == "NotADirectoryError"  # type: ignore[index]
    assert err.startswith("cvmctl: error: ") and "Traceback" not in err


def test_options_that_need_another_are_not_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_json(["attest", "verify", "x.bin", "--kds-url", "http://kds", "--json"], capsys)
    assert code == 2 and "--kds-url applies only with --kds" in out["error"]["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("raised", "code", "said"),
    [
        (BaseExceptionGroup("nursery", [KeyboardInterrupt()]), 130, "cvmctl: interrupted"),
        (ExceptionGroup("relay", [ValueError("x"), UsageError("bad input")]), 2, "bad input"),
    ],
)
def test_an_exception_group_from_a_nursery_is_one_line(
    raised: BaseException, code: int, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """trio hands Ctrl-C and a CvmError raised in a nursery over in a group: both are said in
    one line with their exit code (both need the one ``except BaseExceptionGroup``)."""

    def handler(args: argparse.Namespace) -> int:
        raise raised

    parser = build_parser()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parser, "parse_args", lambda words: argparse.Namespace(func=handler))
        mp.setattr("cvmctl.cli.main.build_parser", lambda: parser)
        assert main(["anything"]) == code
    assert said in capsys.readouterr().err
