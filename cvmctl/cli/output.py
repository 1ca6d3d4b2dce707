"""Printing for people: aligned field/value tables on stdout (JSON lives with each command)."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(rows: Sequence[tuple[str, str]]) -> None:
    """Two aligned columns, field and value; continuation lines of a value stay aligned."""
    width = max((len(field) for field, _ in rows), default=0)
    for field, value in rows:
        lines = str(value).splitlines() or [""]
        print(f"{field:<{width}}  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<{width}}  {line}")
