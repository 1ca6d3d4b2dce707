"""Fixtures for the guest-agent tests: fixture kernel trees copied into tmp_path."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

SYSROOTS = Path(__file__).resolve().parent.parent / "fixtures" / "sysroots"


@pytest.fixture
def sysroot(tmp_path: Path) -> Callable[[str], Path]:
    """Copy a fixture tree (by name) into tmp_path and return the copy."""

    def copy(name: str) -> Path:
        target = tmp_path / "roots" / name
        shutil.copytree(SYSROOTS / name, target)
        return target

    return copy
