"""The architecture, checked: imports point down the layers, and nothing imports
itself round a circle.

Layers, lowest first: ``core`` (pure) <- ``stores`` <- ``runtime`` <- ``net``
<- ``cli``. ``client`` may import only ``core``, and only ``cli`` (the
project's own programs: watch, status, demo) imports ``client``. The package's own
``__init__``/``__main__`` sit on top. ``core`` imports no I/O: no trio, no
sockets, no database, no threads, no files.

Imports are read with ``ast`` from the source, every ``import`` statement
wherever it is (inside functions and ``TYPE_CHECKING`` blocks too): a
dependency is a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "budget_actor"
LAYERS = ("core", "stores", "runtime", "net", "cli")
# What the pure layer may not import (top-level module names): an event
# loop, the network, databases, threads, processes, files.
IO_MODULES = frozenset(
    {
        "trio",
        "trio_websocket",
        "anyio",
        "asyncio",
        "h11",
        "wsproto",
        "psycopg",
        "sqlite3",
        "socket",
        "ssl",
        "select",
        "selectors",
        "threading",
        "concurrent",
        "multiprocessing",
        "subprocess",
        "fcntl",
        "os",
        "io",
        "shutil",
        "tempfile",
        "pathlib",
        "prometheus_client",
    }
)


def read_sources(package: Path) -> dict[str, tuple[str, bool]]:
    """``{module name: (source, is a package)}`` for every module under ``package``."""
    sources = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        sources[".".join(parts)] = (path.read_text(encoding="utf-8"), is_package)
    return sources


def imports_of(name: str, source: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """Every module ``name`` imports: package modules by full name (a
    ``from pkg import module`` names the module), others by top-level name."""
    known = set(known)
    here = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in known else module)
    return {m if m in known else m.split(".")[0] for m in found}


def dependency_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, set[str]]:
    return {
        name: imports_of(name, source, is_package, sources)
        for name, (source, is_package) in sources.items()
    }


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in (*LAYERS, "client") else None


def layer_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Imports that point up a layer, out of client, or from core to I/O."""
    problems = []
    for module, imported in sorted(graph.items()):
        mine = layer_of(module)
        for target in sorted(imported):
            theirs = layer_of(target)
            if mine == "core" and target.split(".")[0] in IO_MODULES:
                problems.append(f"{module} imports {target}: core does no I/O")
            if mine is None or theirs is None or mine == theirs:
                continue
            if mine == "client":
                if theirs != "core":
                    problems.append(f"{module} imports {target}: client may import only core")
            elif theirs == "client":
                if mine != "cli":
                    problems.append(f"{module} imports {target}: {mine} is below {theirs}")
            elif LAYERS.index(theirs) > LAYERS.index(mine):
                problems.append(f"{module} imports {target}: {mine} is below {theirs}")
    return problems


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import cycles among the graph's own modules (Tarjan's strongly
    connected components of more than one module, or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Cycles between layers (modules collapsed into their layer)."""
    layered: dict[str, set[str]] = {}
    for module, imported in graph.items():
        mine = layer_of(module) or module
        targets = {layer_of(t) or t for t in imported if t in graph}
        layered.setdefault(mine, set()).update(targets - {mine})
    return cycles(layered)


# -- the checks ----------------------------------------------------------------


def test_imports_point_down_the_layers_and_core_does_no_io() -> None:
    graph = dependency_graph(read_sources(PACKAGE))
    assert {layer_of(m) for m in graph} >= set(LAYERS), "a layer is missing: is PACKAGE right?"
    assert layer_violations(graph) == []


def test_no_import_cycles_between_modules_or_layers() -> None:
    graph = dependency_graph(read_sources(PACKAGE))
    assert cycles(graph) == []
    assert layer_cycles(graph) == []


# -- the checker can fail --------------------------------------------------------


def _fake(tmp_path: Path, files: Mapping[str, str]) -> dict[str, set[str]]:
    for name, text in {"__init__.py": "", **files}.items():
        path = tmp_path / "budget_actor" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    return dependency_graph(read_sources(tmp_path / "budget_actor"))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"core/ledger.py": "import trio\n"}, "core does no I/O"),
        ({"core/ledger.py": "def f():\n    from psycopg import connect\n"}, "core does no I/O"),
        ({"core/ledger.py": "from ..runtime import actor\n", "runtime/actor.py": ""}, "below"),
        (
            {"stores/x.py": "from budget_actor.net.server import serve\n", "net/server.py": ""},
            "below",
        ),
        (
            {"client/c.py": "from ..runtime.service import Budget\n", "runtime/service.py": ""},
            "only core",
        ),
        ({"core/a.py": "from ..client import c\n", "client/c.py": ""}, "below"),
        ({"net/server.py": "from ..client import c\n", "client/c.py": ""}, "below"),
    ],
)
def test_the_layer_check_catches_an_upward_import(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    problems = layer_violations(_fake(tmp_path, files))
    assert problems and all(expected in p for p in problems), problems


def test_the_programs_may_use_the_client(tmp_path: Path) -> None:
    files = {"cli/watch.py": "from ..client import c\n", "client/c.py": "from ..core import m\n"}
    files["core/m.py"] = ""
    assert layer_violations(_fake(tmp_path, files)) == []


def test_the_cycle_check_catches_a_circle(tmp_path: Path) -> None:
    graph = _fake(
        tmp_path,
        {
            "stores/store.py": "from . import sqlite\n",
            "stores/sqlite.py": "from .store import Store\n",
            "core/a.py": "",
        },
    )
    assert cycles(graph) == [["budget_actor.stores.sqlite", "budget_actor.stores.store"]]
