"""Man pages for ``cvmctl``, ``cvm-agent`` and ``cvm-hostd``, generated from their argparse parsers.

The units' ``Documentation=man:cvm-agent(8)`` and ``man:cvm-hostd(8)`` need pages that
exist, and a page written by hand drifts from ``--help``. So the page is the parser: its
description, its options (with their help and defaults), its sub-commands recursively
(``cvmctl vm create`` gets a subsection) and its epilog (examples). The output is roff with
the classic ``man`` macros (man(7): ``.TH``, ``.SH``, ``.SS``, ``.TP``, ``.B``, ``.I``),
which man-db renders everywhere; text is escaped per groff(7) (a backslash becomes ``\\e``,
a line starting with ``.`` or ``'`` gets a ``\\&`` in front, ``-`` in option names is
``\\-``). Nothing here reads the clock: the date in ``.TH`` is the caller's, so the same
parser gives the same bytes.

``cvmctl image build debian`` installs the pages in the guest; ``python -m cvmctl.manpages
MAN_DIR`` writes them into any man tree (``/usr/local/share/man`` on a host).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from cvmcore import __version__

#: (program, man section, one-line NAME text, the parser's factory)
PAGES: tuple[tuple[str, int, str], ...] = (
    ("cvmctl", 1, "run, measure and monitor confidential VMs"),
    ("cvm-agent", 8, "the cvmctl guest agent (gRPC over vsock to the host)"),
    ("cvm-hostd", 8, "the cvmctl host daemon (VMs, benchmarks and metrics)"),
)
DATE = "2026"  # the .TH date field: the release year, not the build time (reproducible pages)


def parser_for(program: str) -> argparse.ArgumentParser:
    """The argparse parser behind ``program`` (imported here only: the CLI layer sees all three)."""
    factories: dict[str, Callable[[], argparse.ArgumentParser]] = {}
    if program == "cvmctl":
        from cvmctl.cli.main import build_parser as cli_parser

        factories[program] = cli_parser
    elif program == "cvm-agent":
        from guest_agent.main import build_parser as agent_parser

        factories[program] = agent_parser
    elif program == "cvm-hostd":
        from host_daemon.main import build_parser as hostd_parser

        factories[program] = hostd_parser
    else:
        raise KeyError(program)
    parser = factories[program]()
    parser.prog = program
    return parser


def escape(text: str) -> str:
    """Text safe in a roff body: backslashes, leading control characters, hyphens."""
    lines = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        stripped = line.lstrip()
        if stripped.startswith((".", "'")):
            line = "\\&" + stripped
        lines.append(line)
    return "\n".join(lines)


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if action.help is None or action.help == argparse.SUPPRESS:
        return ""
    text = action.help
    if "%" in text:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            text = text % {**vars(action), "prog": parser.prog}
    return text


def _invocation(action: argparse.Action) -> str:
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if not action.option_strings:
        return f"\\fI{escape(str(metavar))}\\fR"
    names = ", ".join(f"\\fB{escape(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} \\fI{escape(str(metavar))}\\fR"


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # aliases
                    continue
                seen.add(id(sub))
                yield name, helps.get(name, ""), sub


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        out += [".TP", _invocation(action)]
        text = _help_text(parser, action)
        if action.choices is not None and not isinstance(action.choices, dict):
            text += f" (one of: {', '.join(str(c) for c in action.choices)})"
        out.append(escape(text) if text else "")
    return out


def _section_for(parser: argparse.ArgumentParser, path: str, out: list[str]) -> None:
    for name, help_text, sub in _subparsers(parser):
        full = f"{path} {name}"
        out += [".SS " + escape(full), escape(sub.description or help_text)]
        options = _options(sub)
        if options:
            out += [".PP", "Options:", *options]
        if sub.epilog:
            out += [".PP", ".nf", escape(sub.epilog), ".fi"]
        _section_for(sub, full, out)


def render(program: str, section: int, summary: str, parser: argparse.ArgumentParser) -> str:
    """The man page of ``parser`` as roff text (pure)."""
    out = [
        f'.TH {program.upper()} {section} "{DATE}" "cvmctl {__version__}" "cvmctl"',
        ".SH NAME",
        f"{escape(program)} \\- {escape(summary)}",
        ".SH SYNOPSIS",
        f"\\fB{escape(program)}\\fR [\\fIOPTIONS\\fR]"
        + (" \\fICOMMAND\\fR ..." if any(_subparsers(parser)) else ""),
        ".SH DESCRIPTION",
        escape(parser.description or summary),
    ]
    options = _options(parser)
    if options:
        out += [".SH OPTIONS", *options]
    commands: list[str] = []
    _section_for(parser, program, commands)
    if commands:
        out += [".SH COMMANDS", *commands]
    if parser.epilog:
        out += [".SH NOTES", ".nf", escape(parser.epilog), ".fi"]
    others = [f"\\fB{escape(p)}\\fR({s})" for p, s, _ in PAGES if p != program]
    out += [".SH SEE ALSO", ", ".join([*others, "\\fBsystemd.exec\\fR(5)"])]
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    """Every page of :data:`PAGES`, rendered: ``<program>.<section>`` -> roff."""
    return {
        f"{program}.{section}": render(program, section, summary, parser_for(program))
        for program, section, summary in PAGES
    }


def write_pages(man_dir: Path) -> list[Path]:
    """Write :func:`pages` as ``man_dir/man<section>/<program>.<section>`` (a man tree, as
    man-db's search path has them: ``/usr/local/share/man`` is on its default path); the files.
    """
    written = []
    for name, text in pages().items():
        path = man_dir / f"man{name.rsplit('.', 1)[1]}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cvmctl.manpages",
        description="Write the man pages cvmctl(1), cvm-agent(8) and cvm-hostd(8), generated from "
        "the programs' own parsers, into a man tree: MAN_DIR/man1 and MAN_DIR/man8. The units' "
        "Documentation= lines name them; the Debian guest image has them already.",
        epilog="example (a host running cvm-hostd.service):\n"
        "  sudo .venv/bin/python -m cvmctl.manpages /usr/local/share/man && man cvm-hostd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("man_dir", metavar="MAN_DIR", type=Path, help="the root of a man tree")
    args = parser.parse_args(argv)
    for path in write_pages(args.man_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
