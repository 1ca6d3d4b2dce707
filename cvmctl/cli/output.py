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


def print_columns(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def format_value(value: float | None) -> str:
    """Four significant digits, without exponent for everyday magnitudes (45990, not 4.599e+04)."""
    if value is None:
        return "-"
    if 1e3 <= abs(value) < 1e12:
        return f"{value:.0f}"
    return f"{value:.4g}"
