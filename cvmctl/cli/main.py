"""Entry point of ``cvmctl``.

Each command group lives in its own module under :mod:`cvmctl.cli` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a handler
``(argparse.Namespace) -> int``. Handlers report a user's mistake or an unreachable peer
by raising :class:`cvmcore.errors.CvmError`; this module turns it into one line on stderr
and the error's exit code, never a traceback.

Some command groups need a dependency that only an extra installs (``pip install cvmctl``
in a guest brings what the agent needs and no more). When one is missing, the group is
still listed and answers with one line naming the extra, and every other command works.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from cvmcore import __version__
from cvmcore.daemon import first_cvm_error
from cvmcore.errors import CvmError, UsageError

# Modules under cvmctl.cli that provide a command group, in --help order.
COMMAND_MODULES: tuple[str, ...] = (
    "bench",
    "study",
    "results",
    "report",
    "vm",
    "agent",
    "idle_poll",
    "attest",
    "image",
    "host",
    "completion",
)

# Third-party modules that only an extra installs (pyproject.toml's optional-dependencies),
# each with the extra that brings it.
EXTRAS: dict[str, str] = {"cryptography": "verify", "matplotlib": "report", "shtab": "host"}

EPILOG = """\
examples:
  cvmctl bench nginx                  # boot the built-in dev guest, run nginx + wrk, store the run
  cvmctl bench --list                 # the catalogue, with the study's parameters
  cvmctl vm ls
  cvmctl agent health --connect unix:///run/cvm-agent.sock
  cvmctl agent info --connect vsock://3:1024 --json

addresses:
  unix:///path/to.sock          a unix socket
  tcp://HOST:PORT               TCP (use 127.0.0.1 or [::1] for local agents)
  vsock://CID:PORT              AF_VSOCK (from a host to a guest with that CID)
  hvsock:///path/to.sock:PORT   hybrid vsock: the host-side unix socket of a
                                Firecracker / Cloud Hypervisor / vhost-device-vsock VM
"""


class _Parser(argparse.ArgumentParser):
    """argparse, remembering its last error so that --json mode can repeat it as JSON."""

    last_error: str | None = None

    def error(self, message: str) -> NoReturn:
        _Parser.last_error = f"{self.prog}: {message}"
        super().error(message)


def print_error(message: str, exit_code: int, kind: str, *, as_json: bool) -> None:
    """One line on stderr; with --json also ``{"error": {...}}`` on stdout, for scripts."""
    print(f"cvmctl: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": {"type": kind, "message": message, "exit_code": exit_code}}))


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="cvmctl",
        description="Run, measure and monitor confidential VMs (SEV-SNP, TDX) beside normal VMs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cvmctl {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cvmctl.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cvmctl.cli.{name}":
                continue  # a command group not built yet
            extra = EXTRAS.get((exc.name or "").partition(".")[0])
            if extra is None:
                raise
            register_unavailable(sub, name.replace("_", "-"), extra)
            continue
        module.register(sub)
    return parser


def register_unavailable(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], command: str, extra: str
) -> None:
    """Add COMMAND as a group whose every use is one line: install EXTRA."""
    install = f"pip install 'cvmctl[{extra}]'"
    parser = sub.add_parser(
        command,
        help=f"not installed: {install}",
        description=f"cvmctl {command} needs the {extra} extra: {install}",
        # Every word after COMMAND, --help included, is a word: none is an option here.
        add_help=False,
        prefix_chars="+",
    )
    parser.add_argument("words", nargs="*")
    parser.set_defaults(func=functools.partial(run_unavailable, command, extra))


def run_unavailable(command: str, extra: str, args: argparse.Namespace) -> int:
    named = " ".join([command, *(word for word in args.words[:1] if not word.startswith("-"))])
    raise UsageError(f"cvmctl {named} needs the {extra} extra: pip install 'cvmctl[{extra}]'")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:
        if exc.code == 2 and "--json" in words and _Parser.last_error:
            error = {"type": "UsageError", "message": _Parser.last_error, "exit_code": 2}
            print(json.dumps({"error": error}))
        raise
    handler = getattr(args, "func", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    as_json = bool(getattr(args, "json", False))
    try:
        result: int = handler(args)
    except CvmError as exc:
        print_error(str(exc), exc.exit_code, type(exc).__name__, as_json=as_json)
        return exc.exit_code
    except BaseExceptionGroup as group:
        # trio hands a Ctrl-C that lands inside a nursery over in an exception group; a
        # CvmError raised inside one (a call through a vsock relay) arrives in a group too:
        # either is said in one line like any other, not as a traceback. (One clause for
        # both: a second `except BaseExceptionGroup` below this one would never be reached.)
        if group.subgroup(KeyboardInterrupt) is not None:
            print("cvmctl: interrupted", file=sys.stderr)
            return 130
        inner = first_cvm_error(group)
        if inner is None:
            raise
        print_error(str(inner), inner.exit_code, type(inner).__name__, as_json=as_json)
        return inner.exit_code
    except ModuleNotFoundError as exc:
        # A command that imports an extra's module only when it runs (matplotlib for figures).
        extra = EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        message = f"this command needs the {extra} extra ({exc.name} is not installed)"
        print_error(f"{message}: pip install 'cvmctl[{extra}]'", 2, "UsageError", as_json=as_json)
        return UsageError.exit_code
    except KeyboardInterrupt:
        print("cvmctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A file the command was pointed at (a directory that is a file, no permission):
        # the user's environment, said in one line like every other error.
        where = f"{exc.filename}: " if exc.filename else ""
        print_error(f"{where}{exc.strerror or exc}", 1, type(exc).__name__, as_json=as_json)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
