"""Every option in a golden command line is explained in docs/qemu-options.md.

The golden ``.args`` files are tokenised into names: each option (``-machine``), the type an
option's value starts with (``-object sev-snp-guest``, ``-accel tcg``, ``-qmp unix``), each
``key=`` of a ``key=value,...`` list (``-machine confidential-guest-support``), each ``+flag``
of ``-cpu``, each parameter of the kernel command line (``-append console``), and the options
of the ``numactl`` prefix (``numactl --membind``). Values (paths, sizes, ids, numbers) are
not names. A key is explained by a row for ``<option> <type> <key>`` or, for every type at
once, ``<option> <key>``.

The table's rows name what they explain in their first column, in backticks; a row may name
several (``-cpu +avx512f``, ``-cpu +avx512dq``, ...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "docs" / "qemu-options.md"
GOLDEN = Path(__file__).parent / "golden"

PROGRAMS = {"qemu-system-x86_64"}
WORD = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]*")
LIST_OPTIONS = {
    "-accel",
    "-chardev",
    "-cpu",
    "-device",
    "-display",
    "-drive",
    "-fsdev",
    "-machine",
    "-name",
    "-netdev",
    "-object",
    "-qmp",
    "-serial",
}
"""Options whose value is ``[type][,key=value...]``; the others take a path, size or number."""


def split_list(value: str) -> list[str]:
    """Split a QEMU ``a,b=c,...`` value at single commas (``,,`` is an escaped comma)."""
    return [part.replace("\0", ",") for part in value.replace(",,", "\0").split(",")]


def value_names(option: str, value: str) -> Iterator[str]:
    if option == "-append":
        for word in value.split():
            yield f"{option} {word.split('=', 1)[0]}"
        return
    if option not in LIST_OPTIONS:
        return
    if value.startswith("{"):
        data = json.loads(value)
        kind = data.pop("qom-type", None) or data.pop("type", None)
        yield f"{option} {kind}"
        for key in data:
            yield f"{option} {kind} {key}"
        return
    parts = split_list(value)
    kind = ""
    if "=" not in parts[0]:
        head = parts.pop(0).split(":", 1)[0]  # "unix:/path" and "chardev:id" name their kind
        if WORD.fullmatch(head):
            kind = head
            yield f"{option} {kind}"
    for part in parts:
        key = part.split("=", 1)[0]
        yield f"{option} {kind} {key}" if kind else f"{option} {key}"


def argv_names(argv: list[str]) -> Iterator[tuple[str, str]]:
    """(name, fallback name or "") for everything in ``argv`` that the table must explain."""
    i = 0
    if argv[0] == "numactl":
        yield "numactl", ""
        i = 1
        while argv[i] != "--":
            yield f"numactl {argv[i].split('=', 1)[0]}", ""
            i += 1
        i += 1
    assert argv[i] in PROGRAMS, argv[i]
    i += 1
    while i < len(argv):
        option = argv[i]
        assert option.startswith("-"), f"expected an option, got {option!r}"
        yield option, ""
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
        i += 2 if value is not None else 1
        if value is None:
            continue
        for name in value_names(option, value):
            words = name.split(" ")
            # "<option> <type> <key>" may be explained for every type as "<option> <key>"
            yield name, (f"{words[0]} {words[2]}" if len(words) == 3 else "")


def golden_names() -> dict[str, tuple[str, set[str]]]:
    """name -> (fallback, the golden cases it appears in)."""
    names: dict[str, tuple[str, set[str]]] = {}
    for args in sorted(GOLDEN.glob("*.args")):
        for name, fallback in argv_names(args.read_text().splitlines()):
            names.setdefault(name, (fallback, set()))[1].add(args.stem)
    return names


def table_rows() -> dict[str, str]:
    """Each name explained in the table -> its row."""
    rows: dict[str, str] = {}
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) >= 3 and all(cells[:3]), f"a row needs option, reference and why: {line}"
        for name in re.findall(r"`([^`]+)`", cells[0]):
            assert name not in rows, f"{name!r} is explained twice"
            rows[name] = line
    return rows


def test_tokeniser() -> None:
    argv = [
        "numactl",
        "--membind=1",
        "--",
        "qemu-system-x86_64",
        "-nodefaults",
        "-machine",
        "q35,memory-backend=ram1",
        "-object",
        '{"qom-type":"tdx-guest","id":"tdx0","quote-generation-socket":{"type":"unix","path":"/q"}}',
        "-drive",
        "file=/a,,b,if=none",
        "-qmp",
        "unix:/run/q.sock,server=on",
        "-cpu",
        "EPYC-v4,+avx512f",
        "-append",
        "root=/dev/vda quiet",
        "-m",
        "512M",
    ]
    assert list(argv_names(argv)) == [
        ("numactl", ""),
        ("numactl --membind", ""),
        ("-nodefaults", ""),
        ("-machine", ""),
        ("-machine q35", ""),
        ("-machine q35 memory-backend", "-machine memory-backend"),
        ("-object", ""),
        ("-object tdx-guest", ""),
        ("-object tdx-guest id", "-object id"),
        ("-object tdx-guest quote-generation-socket", "-object quote-generation-socket"),
        ("-drive", ""),
        ("-drive file", ""),
        ("-drive if", ""),
        ("-qmp", ""),
        ("-qmp unix", ""),
        ("-qmp unix server", "-qmp server"),
        ("-cpu", ""),
        ("-cpu EPYC-v4", ""),
        ("-cpu EPYC-v4 +avx512f", "-cpu +avx512f"),
        ("-append", ""),
        ("-append root", ""),
        ("-append quiet", ""),
        ("-m", ""),
    ]


def test_every_golden_option_is_explained() -> None:
    rows = table_rows()
    missing = [
        f"{name}  (in {', '.join(sorted(cases))})"
        for name, (fallback, cases) in sorted(golden_names().items())
        if name not in rows and not (fallback and fallback in rows)
    ]
    assert not missing, "docs/qemu-options.md does not explain:\n" + "\n".join(missing)


def test_the_table_explains_nothing_that_is_gone() -> None:
    """A row whose option left every golden is stale (options of other cases may stay if marked)."""
    names = golden_names()
    used = set(names) | {fallback for fallback, _ in names.values() if fallback}
    stale = [
        name for name, row in table_rows().items() if name not in used and "(not in a golden)" not in row
    ]
    assert not stale, (
        "rows for options no golden uses (mark them '(not in a golden)' if kept):\n" + "\n".join(stale)
    )


@pytest.mark.parametrize("case", ["sev-snp", "tdx"])
def test_the_cvm_goldens_are_covered(case: str) -> None:
    """The CVM command lines hold what the references require of them."""
    names = {name for name, _ in argv_names((GOLDEN / f"{case}.args").read_text().splitlines())}
    kind = "sev-snp-guest" if case == "sev-snp" else "tdx-guest"
    assert {f"-object {kind}", "-bios", "-machine q35 confidential-guest-support"} <= names
