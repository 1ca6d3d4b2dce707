"""What pyproject.toml promises about the wheel, checked from the source tree in a second.

scripts/test-wheel.sh builds and installs the real wheel; these catch the same mistakes
sooner: floors older than the generated code, a verifier-only dependency in the guest's set,
a package or data file the wheel would leave out.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO_ROOT

PYPROJECT: dict[str, Any] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PROJECT: dict[str, Any] = PYPROJECT["project"]
SETUPTOOLS: dict[str, Any] = PYPROJECT["tool"]["setuptools"]
GENERATED = REPO_ROOT / "proto" / "cvm" / "v1"

# Top-level packages of the repository that are not part of the wheel.
NOT_SHIPPED = {"tests", "benchmarks"}
# What only an extra may bring: a guest's `pip install cvmctl` must not pull these.
EXTRA_ONLY = {"cryptography", "matplotlib", "shtab"}


def requirements(specs: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(spec) for spec in specs]
    return {canonicalize_name(req.name): req for req in parsed}


def floor(req: Requirement) -> Version:
    floors = [Version(spec.version) for spec in req.specifier if spec.operator == ">="]
    assert len(floors) == 1, f"{req}: expected one >= floor"
    return floors[0]


BASE = requirements(PROJECT["dependencies"])
EXTRAS = {name: requirements(specs) for name, specs in PROJECT["optional-dependencies"].items()}


def generated_protobuf_versions() -> dict[str, Version]:
    found = {}
    for path in sorted(GENERATED.glob("*_pb2.py")):
        match = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
            path.read_text(),
        )
        assert match, f"{path.name}: no ValidateProtobufRuntimeVersion call"
        found[path.name] = Version(".".join(match.groups()))
    assert found, "no generated *_pb2.py"
    return found


def generated_grpc_versions() -> dict[str, Version]:
    found = {}
    for path in sorted(GENERATED.glob("*_pb2_grpc.py")):
        match = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", path.read_text(), re.MULTILINE)
        assert match, f"{path.name}: no GRPC_GENERATED_VERSION"
        found[path.name] = Version(match.group(1))
    assert found, "no generated *_pb2_grpc.py"
    return found


def test_generated_messages_run_on_the_protobuf_floor() -> None:
    protobuf_floor = floor(BASE["protobuf"])
    too_new = {name: str(v) for name, v in generated_protobuf_versions().items() if v > protobuf_floor}
    assert not too_new, (
        f"generated code needs a newer protobuf than the declared floor {protobuf_floor}: {too_new}; "
        "raise the floor or regenerate with the pinned grpcio-tools (scripts/gen-proto.sh)"
    )


def test_generated_stubs_run_on_the_grpcio_floors() -> None:
    for dist in ("grpcio", "grpcio-health-checking"):
        dist_floor = floor(BASE[dist])
        too_new = {name: str(v) for name, v in generated_grpc_versions().items() if v > dist_floor}
        assert not too_new, f"generated stubs need a newer {dist} than the declared floor {dist_floor}"


def test_gen_proto_pins_the_generator_the_committed_code_came_from() -> None:
    script = (REPO_ROOT / "scripts" / "gen-proto.sh").read_text()
    match = re.search(r"^GRPCIO_TOOLS_VERSION=(\S+)", script, re.MULTILINE)
    assert match, "scripts/gen-proto.sh pins no GRPCIO_TOOLS_VERSION"
    assert set(generated_grpc_versions().values()) == {Version(match.group(1))}


def test_the_guest_set_has_no_extra_only_dependency() -> None:
    assert not EXTRA_ONLY & set(BASE), f"in the base dependencies: {EXTRA_ONLY & set(BASE)}"
    agent_needs = {"grpcio", "grpcio-health-checking", "protobuf", "prometheus-client", "structlog", "trio"}
    assert agent_needs <= set(BASE)


def test_extras_bring_what_their_commands_need() -> None:
    assert "cryptography" in EXTRAS["verify"]
    assert "matplotlib" in EXTRAS["report"]
    assert {"cryptography", "shtab"} <= set(EXTRAS["host"])
    union = set(EXTRAS["verify"]) | set(EXTRAS["report"]) | set(EXTRAS["host"])
    assert set(EXTRAS["all"]) == union


def test_every_dependency_has_one_floor_the_same_everywhere() -> None:
    seen: dict[str, str] = {}
    for group, reqs in [("dependencies", BASE), *((f"[{name}]", r) for name, r in EXTRAS.items())]:
        if group == "[dev]":
            continue  # tools for working on cvmctl, not what users install
        for name, req in reqs.items():
            floor(req)
            assert seen.setdefault(name, str(req.specifier)) == str(req.specifier), (
                f"{name}: {req.specifier} in {group}, {seen[name]} elsewhere"
            )


def test_build_backend_knows_license_expressions() -> None:
    # PEP 639 (`license = "Apache-2.0"`, license-files) needs setuptools >= 77.
    build = requirements(PYPROJECT["build-system"]["requires"])
    assert floor(build["setuptools"]) >= Version("77")
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def shipped_package_dirs() -> dict[str, Path]:
    """Package name -> directory, as setuptools' packages.find (namespaces on) finds them."""
    find = SETUPTOOLS["packages"]["find"]
    assert find.get("namespaces", True), "this mirror assumes namespace discovery (the default)"
    found: dict[str, Path] = {}
    for where in find["where"]:
        root = (REPO_ROOT / where).resolve()
        tops = [
            p for p in root.iterdir() if p.is_dir() and p.name.isidentifier() and p.name not in NOT_SHIPPED
        ]
        for top in tops:
            for directory in [top, *sorted(p for p in top.rglob("*") if p.is_dir())]:
                parts = directory.relative_to(root).parts
                if "__pycache__" in parts or not all(part.isidentifier() for part in parts):
                    continue
                name = ".".join(parts)
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in find["include"]):
                    found[name] = directory
    return found


def test_every_top_level_package_is_shipped_or_known_not_to_be() -> None:
    include = SETUPTOOLS["packages"]["find"]["include"]
    for init in sorted(REPO_ROOT.glob("*/__init__.py")):
        name = init.parent.name
        shipped = any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
        assert shipped or name in NOT_SHIPPED, f"package {name}/ is not in the wheel (packages.find.include)"
    assert "cvm" in shipped_package_dirs(), "the generated package cvm (proto/) is not in the wheel"


def test_every_data_file_of_a_package_is_package_data() -> None:
    packages = shipped_package_dirs()
    package_data: dict[str, list[str]] = SETUPTOOLS["package-data"]
    included: set[Path] = set()
    for name, directory in packages.items():
        for pattern in package_data.get("*", []) + package_data.get(name, []):
            included.update(directory.glob(pattern))
    data_files = {
        path
        for directory in packages.values()
        for path in directory.iterdir()
        if path.is_file() and path.suffix not in (".py", ".pyc")
    }
    missing = sorted(str(path.relative_to(REPO_ROOT)) for path in data_files - included)
    assert not missing, (
        f"files in packages that the wheel would leave out (tool.setuptools.package-data): {missing}"
    )
    for must in ("cvmattest/trust/amd_ark_milan.pem", "cvmattest/py.typed", "proto/cvm/v1/agent_pb2.pyi"):
        assert REPO_ROOT / must in included


@pytest.mark.parametrize(
    "package", ["cvm", "cvmattest", "cvmcore", "cvmctl", "guest_agent", "host_daemon", "workloads"]
)
def test_every_package_is_typed(package: str) -> None:
    assert (shipped_package_dirs()[package] / "py.typed").is_file()


def test_console_scripts() -> None:
    assert PROJECT["scripts"] == {
        "cvmctl": "cvmctl.cli.main:main",
        "cvm-hostd": "host_daemon.main:main",
        "cvm-agent": "guest_agent.main:main",
    }
