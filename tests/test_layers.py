"""The floor plan, enforced: imports only point down, the two daemons never meet, no cycles.

Layers, bottom to top (README, "Layout")::

    cvm (generated protocol)
    cvmcore                         the foundation every program stands on
    cvmattest, workloads            libraries: evidence; the benchmark catalogue
    guest_agent, host_daemon        the two daemons, side by side
    cvmctl                          the CLI, on top

A package may import its own modules and packages of lower layers, never one beside it or
above it; that covers lazy imports inside functions too, since they run back up just the same.
Inside the CLI, command modules share only the helpers in :data:`CLI_SHARED`. Module-level
imports form no cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LAYERS: dict[str, int] = {
    "cvm": 0,
    "cvmcore": 1,
    "cvmattest": 2,
    "workloads": 2,
    "guest_agent": 3,
    "host_daemon": 3,
    "cvmctl": 4,
}
PACKAGE_DIRS = {name: REPO / ("proto/cvm" if name == "cvm" else name) for name in LAYERS}
#: What CLI command modules may import from each other (argument types, printing).
CLI_SHARED = {"cvmctl.cli.args", "cvmctl.cli.output", "cvmctl.cli.runview"}
#: The CLI modules that put the commands together.
CLI_ASSEMBLY = {"cvmctl.cli.main", "cvmctl.cli.completion", "cvmctl.cli"}


def module_name(path: Path) -> str:
    root = REPO / "proto" if path.is_relative_to(REPO / "proto") else REPO
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Iterator[tuple[str, Path]]:
    for directory in PACKAGE_DIRS.values():
        for path in sorted(directory.rglob("*.py")):
            if not path.name.endswith("_pb2.py") and not path.name.endswith("_pb2_grpc.py"):
                yield module_name(path), path


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    package = base if module_is_package(module) else base[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def module_is_package(module: str) -> bool:
    return any(name == module and path.name == "__init__.py" for name, path in ALL_MODULES)


def imports(module: str, path: Path, *, top_level_only: bool) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each first-party import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    nodes: list[ast.AST]
    if top_level_only:
        nodes = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        # module-level try/except and if blocks (not TYPE_CHECKING) import at load time too
        for n in tree.body:
            if isinstance(n, (ast.Try, ast.If)) and not _is_type_checking(n):
                nodes += [m for m in ast.walk(n) if isinstance(m, (ast.Import, ast.ImportFrom))]
    else:
        nodes = list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            # "from pkg import mod" imports pkg.mod when that is a module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULE_NAMES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in LAYERS:
                yield target, node.lineno


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


ALL_MODULES = list(modules())
MODULE_NAMES = {name for name, _ in ALL_MODULES}


def test_every_package_is_placed() -> None:
    found = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert found <= set(LAYERS), f"place {sorted(found - set(LAYERS))} in LAYERS (README, Layout)"


@pytest.mark.parametrize(("module", "path"), ALL_MODULES, ids=[m for m, _ in ALL_MODULES])
def test_imports_point_down(module: str, path: Path) -> None:
    package = module.split(".")[0]
    wrong = []
    for target, line in imports(module, path, top_level_only=False):
        other = target.split(".")[0]
        if other != package and LAYERS[other] >= LAYERS[package]:
            wrong.append(f"{path.relative_to(REPO)}:{line}: {module} imports {target}")
        in_cli = module.startswith("cvmctl.cli.") and target.startswith("cvmctl.cli.")
        if in_cli and module not in CLI_ASSEMBLY and target not in CLI_SHARED and target != module:
            wrong.append(f"{path.relative_to(REPO)}:{line}: CLI command {module} borrows from {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph = {
        name: {t for t, _ in imports(name, path, top_level_only=True) if t in MODULE_NAMES and t != name}
        for name, path in ALL_MODULES
    }
    # A package's __init__ importing its own submodules (a public face) is not a cycle back
    # into the package: drop the edges from a submodule to its enclosing packages.
    for name, targets in graph.items():
        targets -= {t for t in targets if name.startswith(t + ".")}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1 (or with a self-loop)."""
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rule itself works: an upward import is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import host_daemon.vms\nfrom cvmctl.cli import bench\n")
    found = [t for t, _ in imports("guest_agent.bad", bad, top_level_only=False)]
    assert found == ["host_daemon.vms", "cvmctl.cli.bench"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
