"""Argument types and the arguments several ``cvmctl`` commands share."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

from cvmcore.client import DEFAULT_TIMEOUT
from cvmcore.defaults import AGENT_ENV, DATA_DIR_ENV
from cvmcore.errors import UsageError


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def parse_time(text: str | None) -> datetime:
    """``--at TIME`` (ISO 8601; UTC when no zone is given), or now."""
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"--at {text!r} is not an ISO-8601 time (e.g. 2025-06-01T00:00:00Z)") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def yes_no(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("y", "yes", "1", "true", "on"):
        return True
    if lowered in ("n", "no", "0", "false", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not yes or no")


CONNECT_HELP = "agent address: unix:///PATH, tcp://HOST:PORT, vsock://CID:PORT or hvsock:///PATH:PORT"


def add_connection_arguments(parser: argparse.ArgumentParser, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """``--connect ADDR`` (default ``$CVM_AGENT``) and ``--timeout SECONDS``."""
    from_env = os.environ.get(AGENT_ENV)
    parser.add_argument(
        "--connect",
        required=not from_env,
        default=from_env,
        metavar="ADDR",
        help=f"{CONNECT_HELP} (default: ${AGENT_ENV})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        metavar="SECONDS",
        help=f"give up after this long (default: {timeout:g})",
    )


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=f"results store directory (default: ${DATA_DIR_ENV}, else $XDG_DATA_HOME/cvmctl)",
    )
