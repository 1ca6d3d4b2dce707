"""``cvmctl completion bash|zsh``: print a shell completion script for cvmctl.

The script is made by shtab (the ``host`` extra) from cvmctl's own argument parser, so it
knows every command, option and choice of the cvmctl that prints it; arguments that take a
path complete file names (directory names where the argument is a directory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvmcore.errors import UsageError

SHELLS = ("bash", "zsh")

EPILOG = """\
install it (again after upgrading cvmctl):
  bash, for you:        cvmctl completion bash > ~/.local/share/bash-completion/completions/cvmctl
  bash, for everyone:   cvmctl completion bash > /etc/bash_completion.d/cvmctl
  zsh:                  cvmctl completion zsh > ~/.zfunc/_cvmctl
                        (with fpath=(~/.zfunc $fpath); autoload -Uz compinit; compinit in ~/.zshrc)
  or in ~/.bashrc:      eval "$(cvmctl completion bash)"
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh)",
        description="Print a completion script for cvmctl's commands and options to stdout.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("shell", choices=SHELLS, help="the shell the script is for")
    parser.set_defaults(func=run_completion)


def run_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script(args.shell))
    return 0


def completion_script(shell: str) -> str:
    """The completion script for SHELL (one of :data:`SHELLS`)."""
    try:
        import shtab
    except ModuleNotFoundError:
        raise UsageError("cvmctl completion needs the host extra: pip install 'cvmctl[host]'") from None
    from cvmctl.cli.main import build_parser  # main imports this module: not at the top

    parser = build_parser()
    for action in walk_actions(parser):
        if action.type is Path or isinstance(action.type, argparse.FileType):
            is_dir = action.metavar in ("DIR", "DIRECTORY") or action.dest.endswith("_dir")
            # shtab reads the attribute `complete` of an action; argparse has none of its own.
            action.complete = shtab.DIRECTORY if is_dir else shtab.FILE  # type: ignore[attr-defined]
    script: str = shtab.complete(parser, shell=shell)
    return script if script.endswith("\n") else script + "\n"


def walk_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action of PARSER and of its subcommands' parsers, each once."""
    found: list[argparse.Action] = []
    seen: set[int] = set()

    def visit(current: argparse.ArgumentParser) -> None:
        if id(current) in seen:  # an alias names the same parser twice
            return
        seen.add(id(current))
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    visit(child)
            else:
                found.append(action)

    visit(parser)
    return found
