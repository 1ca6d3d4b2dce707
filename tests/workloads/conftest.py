"""Helpers for the workload tests: the fixture folder, the CLI with the bench commands, tools.

``cvmctl bench``, ``results`` and ``report`` may not be in ``cvmctl.cli.main``'s
COMMAND_MODULES yet; :func:`cli` and :data:`CLI_PREFIX` add them (a no-op once they are).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# argv prefix that runs the CLI in a subprocess with the bench command groups registered.
CLI_SNIPPET = (
    "import sys; import cvmctl.cli.main as m; "
    "m.COMMAND_MODULES = tuple(dict.fromkeys((*m.COMMAND_MODULES, 'bench', 'results', 'report'))); "
    "sys.exit(m.main(sys.argv[1:]))"
)
CLI_PREFIX = [sys.executable, "-c", CLI_SNIPPET]


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


def cli(*args: str) -> int:
    """Run cvmctl in this process (output goes to capsys); the exit code."""
    import cvmctl.cli.main as main

    saved = main.COMMAND_MODULES
    main.COMMAND_MODULES = tuple(dict.fromkeys((*saved, "bench", "results", "report")))
    try:
        return main.main(list(args))
    finally:
        main.COMMAND_MODULES = saved


def require(*binaries: str) -> None:
    """Skip unless the binaries are installed (scripts/install-workload-tools.sh)."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/install-workload-tools.sh)")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private results store for the test (CVMCTL_DATA_DIR)."""
    path = tmp_path / "data"
    monkeypatch.setenv("CVMCTL_DATA_DIR", str(path))
    yield path
