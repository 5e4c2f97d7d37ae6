"""The package's shape, checked: no import circle, no private names shared across modules, no
core module depending on the zoo of examples, no module grown long without a stated reason.

Imports are read from the source (module level and inside functions alike: a circle closed at
run time is still a circle), except those under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "pytest_convergence"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
# A module longer than this states why in a "Length:" paragraph of its docstring.
MAX_LINES = 600


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module
    names: tuple[str, ...]  # the names taken from it ("" for ``import target``)
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _compiled(module: str) -> bool:
    """A compiled extension module of the package (its stub or its C source is in the tree)."""
    path = ROOT.parent.joinpath(*module.split("."))
    return path.with_suffix(".pyi").exists() or path.with_suffix(".c").exists()


def _under_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _under_type_checking(node):
            for branch in node.orelse:
                yield from _import_nodes(branch)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _import_nodes(node)


def imports_of(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found += [
                Import(module, alias.name, ("",), node.lineno)
                for alias in node.names
                if alias.name.split(".")[0] == PACKAGE
            ]
        elif node.module and node.module.split(".")[0] == PACKAGE and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES or _compiled(submodule):  # ``from package import module``
                    found.append(Import(module, submodule, ("",), node.lineno))
                else:
                    found.append(Import(module, node.module, (alias.name,), node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, the lazy facade of the top package left out (it
    imports everything on demand, and nothing imports it for a module's sake)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES if name != PACKAGE}
    for module, targets in graph.items():
        targets.update(
            found.target for found in imports_of(module) if found.target not in (PACKAGE, module)
        )
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_module_imports_a_circle_of_modules() -> None:
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names() -> None:
    shared = [
        f"{found.module}:{found.line} takes {name} from {found.target}"
        for module in MODULES
        for found in imports_of(module)
        for name in found.names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert shared == []


@pytest.mark.parametrize(
    "module",
    sorted(
        name
        for name in MODULES
        if not name.startswith(f"{PACKAGE}.zoo") and name != f"{PACKAGE}.plugin"
    ),
)
def test_the_core_never_imports_the_zoo(module: str) -> None:
    """The zoo is examples; the core stands without it (the plugin and the session add it as a
    workload source by name, which imports nothing)."""
    allowed = {f"{PACKAGE}.session"}
    zoo = [found for found in imports_of(module) if found.target.startswith(f"{PACKAGE}.zoo")]
    assert module in allowed or zoo == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_long_module_says_why_it_is_long(module: str) -> None:
    path = MODULES[module]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if lines <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert "Length:" in docstring, f"{path.name}: {lines} lines and no 'Length:' reason"
