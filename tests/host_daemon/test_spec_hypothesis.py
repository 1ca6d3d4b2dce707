"""Property tests of the VM spec reader: whatever TOML text arrives (from a user or over the
daemon's API), ``parse_spec`` gives a VMSpec or its documented ``SpecError``, never another
exception. ``benchmarks/fuzz.py --target spec`` runs the same property coverage-guided."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_daemon.spec import UNKNOWN_KEY, SpecError, VMSpec, parse_spec

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The keys the format has (top level and tables), so that generated documents reach the
# readers behind them rather than stopping at "unknown key".
KNOWN_KEYS = [
    "name",
    "image",
    "tee",
    "baseline_for",
    "accel",
    "vcpus",
    "memory",
    "memory_backend",
    "memory_path",
    "prealloc",
    "cpu",
    "console",
    "host_cpus",
    "numa_node",
    "firmware",
    "kernel",
    "initrd",
    "cmdline",
    "path",
    "format",
    "iothread",
    "aio",
    "cache",
    "size",
    "mode",
    "forwards",
    "host_port",
    "guest_port",
    "host_address",
    "proto",
    "vhost",
    "queues",
    "ifname",
    "tag",
    "readonly",
    "swiotlb_force",
    "haltpoll",
    "idle_poll",
    "channel",
    "cid",
    "socket",
    "cbitpos",
    "reduced_phys_bits",
    "policy",
    "kernel_hashes",
    "host_data",
    "quote_generation_socket",
]
TABLES = ("pinning", "boot", "disk", "scratch", "network", "share", "guest", "agent", "sev_snp", "tdx")


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but non-ASCII stays as it is (JSON would
    write surrogate pairs, which TOML refuses) and DEL is escaped (TOML requires it)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key: str) -> str:
    return toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


keys = st.one_of(st.sampled_from(KNOWN_KEYS + list(TABLES)), st.text(min_size=1, max_size=12))
scalars = st.one_of(
    st.booleans(),
    st.integers(),  # beyond 64 bits too: tomllib reads any size
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["sev-snp", "tdx", "none", "2G", "0x30000", "tcg", "tap", "/dev/null", "vsock:2:4050"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A TOML document: top-level keys, then tables and arrays of tables, all with random values."""
    lines = []
    if draw(st.booleans()):
        lines.append(f"name = {json.dumps(draw(st.sampled_from(['vm', 'a-1', 'X', ''])))}")
    top = draw(st.dictionaries(keys, values, max_size=6))
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in top.items() if k != "name"]
    for table in draw(st.lists(st.sampled_from(TABLES), max_size=3, unique=True)):
        if table in top:
            continue
        header = f"[[{table}]]" if table in ("disk", "share") and draw(st.booleans()) else f"[{table}]"
        lines.append(header)
        body = draw(st.dictionaries(keys, values, max_size=5))
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def read(text: str) -> VMSpec | SpecError:
    try:
        return parse_spec(text, source="fuzz.toml")
    except SpecError as exc:
        assert exc.problems, "a SpecError lists its problems"
        assert str(exc).startswith("fuzz.toml: ")
        return exc


@SETTINGS
@given(documents())
def test_any_document_gives_a_spec_or_a_spec_error(text: str) -> None:
    read(text)


@SETTINGS
@given(st.text(max_size=400))
def test_any_text_gives_a_spec_or_a_spec_error(text: str) -> None:
    read(text)


@SETTINGS
@given(
    depth=st.integers(min_value=1, max_value=5000),
    opener=st.sampled_from(["[", "{a = ", "[{b = "]),
    where=st.sampled_from(["vcpus", "name", "extra", "boot.kernel"]),
)
def test_deep_nesting_is_a_spec_error_not_a_recursion_error(depth: int, opener: str, where: str) -> None:
    closer = {"[": "]", "{a = ": "}", "[{b = ": "}]"}[opener]
    value = opener * depth + "1" + closer * depth
    key, _, field = where.rpartition(".")
    text = 'name = "vm"\n' + (f"[{key}]\n" if key else "") + f"{field} = {value}\n"
    assert isinstance(read(text), SpecError)


@SETTINGS
@given(
    field=st.sampled_from(["vcpus", "memory", "accel", "tee", "prealloc", "console", "cpu"]),
    value=st.one_of(
        st.integers(min_value=2**31),
        st.integers(max_value=-1),
        st.floats(),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=2),
    ),
)
def test_a_wrong_type_or_huge_number_is_named(field: str, value: Any) -> None:
    result = read(f'name = "vm"\n{field} = {toml_value(value)}\n')
    assert isinstance(result, SpecError)
    assert field in {p.field for p in result.problems}, result


@SETTINGS
@given(
    key=st.text(min_size=1, max_size=20).filter(lambda k: k not in KNOWN_KEYS + list(TABLES)), value=values
)
def test_an_unknown_key_is_an_error_naming_it(key: str, value: Any) -> None:
    result = read(f'name = "vm"\n{toml_key(key)} = {toml_value(value)}\n')
    assert isinstance(result, SpecError)
    assert any(p.field == key and p.value is UNKNOWN_KEY for p in result.problems), result
