"""Logging for every cvmctl program: structlog, JSON lines or a readable console.

``configure_logging()`` picks JSON lines when stderr is not a terminal (journald, files,
CI), and a coloured console otherwise; ``fmt`` forces one. Logs go to stderr so that a
program's stdout stays its output (tables, JSON).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]

LEVELS = ("debug", "info", "warning", "error")

_current_level = "info"


def logs_at(level: str) -> bool:
    """Whether a line at ``level`` is written with the configured level (hot paths ask first)."""
    return LEVELS.index(level) >= LEVELS.index(_current_level)


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    global _current_level
    _current_level = level
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
