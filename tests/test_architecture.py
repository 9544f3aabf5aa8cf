"""The package's import graph: no cycles, and the torch layer's leaf modules stay leaves.

Every module of ``python/asymlora`` is parsed with ``ast``; each ``import`` and
``from ... import`` becomes an edge to the asymlora module it names, including imports
inside functions (a function-level import that dodges a cycle is still a cycle: it
only moves the failure from import time to call time). Excluded are imports under
``if TYPE_CHECKING:``, which never run, and the lazy attribute table of
``asymlora/__init__.py`` (``importlib`` at first use), which is not an import statement.

``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg`` (the name is an attribute of ``pkg/__init__.py``). Parent packages that Python
initialises on the way to a submodule are not edges: a package ``__init__`` that
re-exports its submodules would otherwise always form a cycle with them.

That ``import asymlora`` does not import torch is checked at run time by
``tests/test_cli.py::test_torch_is_not_imported``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "python" / "asymlora"
PACKAGE = "asymlora"

#: the torch layer, bottom up: a module of ``asymlora.nn`` imports other ``asymlora.nn``
#: modules only from the layers below its own, so each can be read (and changed) knowing
#: only what is under it. A new module of ``asymlora.nn`` gets a place here.
NN_LAYERS = (
    ("tensors", "optional"),  # numpy <-> torch conversions, optional libraries' classes
    ("base",),  # the base layer, float or quantised: shape, dtype, float weight, merge
    ("layer",),  # the adapted layer
    ("model", "targets", "routing", "kbit"),  # a wrapped model; what can be adapted; routes;
    # readying a quantised model for training
    ("experts",),  # adapted parameters (target_parameters): their layer, wrapper, targets
    ("distributed.process", "distributed.dtensor"),
    ("distributed.ddp",),
    ("distributed.fingerprint",),
    ("distributed",),  # re-exports the four above
    ("factory",),  # builds and installs LoraLayers (for wrap and load_adapter)
    ("adapters",),  # several adapters: active one, delete, disable, per-row routing
    ("wrap", "serialization"),
)
#: kept for code that imported the helpers from there; asymlora itself must not
COMPAT_MODULES = ("asymlora.distributed",)


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line`` of ``source``'s file."""

    source: str
    target: str
    line: int


def module_names(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted name -> file of every module (``.pyi`` alone for compiled ones like ``_native``)."""
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if path.suffix == ".py" or name not in names:
            names[name] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in ``node``, at any depth, except under ``if TYPE_CHECKING:``."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)  # only the else branch runs
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from _imports(child)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]
) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    source = _absolute(node, module, is_package)
    if source not in known:
        return []
    return [
        f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
        for alias in node.names
    ]


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import of one asymlora module by another, with the line it is on."""
    known = set(modules)
    edges: dict[tuple[str, str], Edge] = {}  # the first import of a module counts
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.stem == "__init__"
        for node in _imports(tree):
            for target in _targets(node, module, is_package, known):
                if target != module:
                    edges.setdefault((module, target), Edge(module, target, node.lineno))
    return list(edges.values())


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """The edges of one import cycle, in order, or ``None`` when the graph has none."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
    done: set[str] = set()
    path: list[Edge] = []
    on_path: dict[str, int] = {}  # module -> index in path of the edge leaving it

    def visit(module: str) -> list[Edge] | None:
        on_path[module] = len(path)
        for edge in graph.get(module, []):
            if edge.target in on_path:
                return [*path[on_path[edge.target] :], edge]
            if edge.target not in done:
                path.append(edge)
                cycle = visit(edge.target)
                if cycle:
                    return cycle
                path.pop()
        del on_path[module]
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def describe(cycle: list[Edge], modules: dict[str, Path]) -> str:
    """``a -> b -> a`` plus the file and line of every import on the way."""
    names = " -> ".join([cycle[0].source, *(e.target for e in cycle)])
    lines = [
        f"  {modules[e.source].relative_to(PACKAGE_DIR.parent)}:{e.line}: imports {e.target}"
        for e in cycle
    ]
    return "\n".join([f"import cycle: {names}", *lines])


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return module_names()


@pytest.fixture(scope="module")
def edges(modules) -> list[Edge]:
    return import_edges(modules)


def test_the_graph_sees_the_package(modules, edges):
    # Guards the other tests against passing on an empty or misread graph.
    assert {"asymlora", "asymlora.nn", "asymlora.nn.wrap", "asymlora._native"} <= set(modules)
    found = {(e.source, e.target) for e in edges}
    assert ("asymlora.nn.wrap", "asymlora.nn.layer") in found
    assert ("asymlora.adapter", "asymlora._native") in found
    assert ("asymlora.cli", "asymlora.demo") in found  # an import inside a function


def test_there_is_no_import_cycle(modules, edges):
    cycle = find_cycle(edges)
    assert cycle is None, describe(cycle, modules)


def test_the_torch_layer_imports_only_downwards(modules, edges):
    level = {f"asymlora.nn.{m}": i for i, layer in enumerate(NN_LAYERS) for m in layer}
    nn_modules = {m for m in modules if m.startswith("asymlora.nn.")}
    assert nn_modules <= set(level), f"place {sorted(nn_modules - set(level))} in NN_LAYERS"
    upward = [
        f"{modules[e.source].name}:{e.line}: {e.source} imports {e.target}"
        for e in edges
        if e.source in level and e.target in level and level[e.target] >= level[e.source]
    ]
    assert not upward, "imports at or above their own layer:\n" + "\n".join(upward)


def test_compatibility_modules_are_not_imported_by_asymlora(edges):
    users = [f"{e.source}:{e.line}" for e in edges if e.target in COMPAT_MODULES]
    assert not users, f"import the real home (asymlora.nn.distributed), not: {users}"


def test_cycle_finder_reports_the_path():
    edges = [Edge("a", "b", 1), Edge("b", "c", 2), Edge("c", "a", 3), Edge("c", "d", 4)]
    cycle = find_cycle(edges)
    assert cycle is not None
    assert [e.source for e in cycle] == ["a", "b", "c"] and cycle[-1].target == "a"
    assert find_cycle([Edge("a", "b", 1), Edge("b", "c", 2), Edge("a", "c", 3)]) is None


def test_type_checking_and_relative_imports_are_resolved(tmp_path):
    pkg = tmp_path / "asymlora"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from asymlora import sub\n"
    )
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\nfrom .. import other\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from asymlora.sub import leaf\n")
    (pkg / "other.py").write_text("from .sub.leaf import f\n")
    found = {(e.source, e.target) for e in import_edges(module_names(pkg))}
    assert found == {
        ("asymlora.sub", "asymlora.sub.leaf"),
        ("asymlora.sub", "asymlora.other"),
        ("asymlora.other", "asymlora.sub.leaf"),
    }


def test_lazy_torch_names_match_their_type_checking_imports():
    # asymlora/__init__.py names each torch-layer export twice: in the lazy table that
    # loads it on first use and in the TYPE_CHECKING imports that static tools read.
    tree = ast.parse((PACKAGE_DIR / "__init__.py").read_text())
    lazy = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") == "_TORCH_API" for t in node.targets)
    )
    static = {
        alias.asname or alias.name: imp.module
        for node in tree.body
        if isinstance(node, ast.If) and _is_type_checking(node.test)
        for imp in node.body
        if isinstance(imp, ast.ImportFrom)
        for alias in imp.names
    }
    assert static == lazy
