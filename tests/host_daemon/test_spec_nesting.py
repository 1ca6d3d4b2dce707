"""The spec reader bounds nesting before tomllib recurses (issue 13: a 1,000-deep spec was
INTERNAL, RecursionError, in the daemon; how deep tomllib gets depends on the caller's stack)."""

from __future__ import annotations

import sys
import time

import pytest

from host_daemon.spec import MAX_SPEC_NESTING, SpecError, parse_spec, value_nesting


def test_nesting_is_counted_outside_strings_and_comments() -> None:
    assert value_nesting("a = 1") == 0
    assert value_nesting('[boot]\nkernel = "/x[y]"\n') == 1
    assert value_nesting("x = [[1,2],[3]]  # [[[[[[") == 2
    assert value_nesting('s = """\n[[[[\n"""\nt = {a = [1]}') == 2
    assert value_nesting("s = '[[[['") == 0
    assert value_nesting('x = "a\\"[[" + [1]') == 1
    assert value_nesting("s = '''\n[[''[[\n'''\nx=[1]") == 1
    assert value_nesting("x = " + "[" * 1000 + "]" * 1000) == 1000
    assert value_nesting("x = " + "[" * 1000, stop_above=32) == 1000  # a run counts at once


@pytest.mark.parametrize(
    "deep",
    [
        "x = " + "[" * 1000 + "]" * 1000,
        "x = " + "{a=" * 1000 + "1" + "}" * 1000,
        'name = "a"\nx = ' + "[" * (MAX_SPEC_NESTING + 1) + "]" * (MAX_SPEC_NESTING + 1),
    ],
)
def test_a_deep_spec_is_a_spec_error_whatever_the_recursion_limit(deep: str) -> None:
    limit = sys.getrecursionlimit()
    try:
        for raised in (limit, 100_000):  # a process that raised it must not parse it either
            sys.setrecursionlimit(raised)
            with pytest.raises(SpecError, match="nested too deeply"):
                parse_spec(deep)
    finally:
        sys.setrecursionlimit(limit)


def test_the_scan_stays_linear_on_hostile_text() -> None:
    """Unterminated strings, lone backslashes, quote runs: each scanned once (256 KiB each)."""
    size = 256 * 1024
    for unit in ('"""a', '"\\', "'''", "\\", '"""\\', "'", "[]", '"a', "''''", '"""""'):
        text = unit * (size // len(unit))
        started = time.perf_counter()
        value_nesting(text)
        assert time.perf_counter() - started < 5, unit  # quadratic would take minutes
