"""Dependencies point one way (STYLE.md, point 2), checked on the source with ``ast``:

* ``schemas`` imports only the standard library, msgspec and itself;
* ``gateway`` never imports ``adapters`` (adapters are found through the registry);
* ``adapters/<a>`` never imports ``adapters.<b>`` for another adapter ``b``.

Imports by string (``importlib.import_module("adapters.x")``) are out of scope.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "gateway", "adapters")
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}
SCHEMAS_MAY_IMPORT = {"msgspec", "schemas"}


def module_name(rel_path: str) -> str:
    """'adapters/webhook/decode.py' -> 'adapters.webhook.decode' (packages drop '__init__')."""
    parts = rel_path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(rel_path: str, source: str) -> list[tuple[int, str]]:
    """Every module an import statement of the file names, absolute, with its line.
    ``from X import Y`` yields both X and X.Y (Y may be a submodule)."""
    tree = ast.parse(source, filename=rel_path)
    mod = module_name(rel_path)
    is_package = rel_path.endswith("__init__.py")
    package = mod.split(".") if is_package else mod.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                found.append((node.lineno, base))
            for alias in node.names:
                if alias.name != "*":
                    found.append((node.lineno, f"{base}.{alias.name}" if base else alias.name))
    return found


def violations(rel_path: str, source: str) -> list[str]:
    """The dependency rules the file breaks, one line each ('path:line: what')."""
    parts = rel_path.split("/")
    top = parts[0]
    out: list[str] = []
    for line, name in imported_modules(rel_path, source):
        head = name.split(".")[0]
        where = f"{rel_path}:{line}"
        if top == "schemas":
            if head not in STDLIB and head not in SCHEMAS_MAY_IMPORT:
                out.append(f"{where}: schemas imports {name!r} (only the standard library and msgspec allowed)")
        elif top == "gateway":
            if head == "adapters":
                out.append(f"{where}: gateway imports {name!r} (the core finds adapters by name)")
        elif top == "adapters" and len(parts) >= 3:
            own = parts[1]
            names = name.split(".")
            if head == "adapters" and len(names) >= 2 and names[1] != own:
                out.append(f"{where}: adapter {own!r} imports {name!r} (adapters never import each other)")
    return out


def source_files() -> list[Path]:
    files = []
    for pkg in PACKAGES:
        files.extend(sorted((ROOT / pkg).rglob("*.py")))
    return [f for f in files if ".venv" not in f.parts and "__pycache__" not in f.parts]


def test_the_packages_exist_and_are_scanned() -> None:
    rels = {f.relative_to(ROOT).as_posix() for f in source_files()}
    # if the scan finds nothing the rule checks below pass vacuously
    assert "schemas/v1.py" in rels and "gateway/pipeline.py" in rels and "adapters/webhook/adapter.py" in rels
    assert len(rels) >= 20


@pytest.mark.parametrize("path", source_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_dependencies_point_one_way(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    assert violations(rel, path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(("rel", "source", "expected"), [
    ("schemas/v2.py", "import gateway.ids\n", "schemas imports 'gateway.ids'"),
    ("schemas/v2.py", "from adapters.webhook import decode\n", "schemas imports 'adapters.webhook'"),
    ("schemas/v2.py", "import os\nimport orjson\n", "schemas/v2.py:2: schemas imports 'orjson'"),
    ("schemas/v2.py", "def f():\n    import aiohttp\n", "schemas/v2.py:2: schemas imports 'aiohttp'"),
    ("schemas/v2.py", "from .. import gateway\n", "schemas imports 'gateway'"),
    ("gateway/x.py", "import adapters.webhook.adapter\n", "gateway imports 'adapters.webhook.adapter'"),
    ("gateway/x.py", "from adapters import webhook\n", "gateway imports 'adapters'"),
    ("gateway/sub/x.py", "if True:\n    from adapters.webhook.signing import sign\n",
     "gateway/sub/x.py:2: gateway imports 'adapters.webhook.signing'"),
    ("adapters/matrix/decode.py", "from adapters.webhook.signing import sign\n",
     "adapter 'matrix' imports 'adapters.webhook.signing'"),
    ("adapters/matrix/decode.py", "import adapters.webhook\n", "adapter 'matrix' imports 'adapters.webhook'"),
    ("adapters/matrix/decode.py", "from adapters import webhook\n", "adapter 'matrix' imports 'adapters.webhook'"),
    ("adapters/matrix/decode.py", "from ..webhook import signing\n", "adapter 'matrix' imports 'adapters.webhook'"),
])
def test_the_checker_reports_a_violation(rel: str, source: str, expected: str) -> None:
    found = violations(rel, source)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize(("rel", "source"), [
    ("schemas/v2.py", "import msgspec\nfrom typing import Annotated\nfrom schemas.v1 import Actor\nfrom . import v1\n"),
    ("gateway/x.py", "import aiohttp\nfrom schemas.v1 import Actor\nfrom gateway.ids import GroupId\n"),
    ("adapters/matrix/decode.py", "from adapters.matrix import native\nfrom . import native\n"
                                  "from gateway.adapter import Inbound\nimport schemas\n"),
])
def test_the_checker_accepts_allowed_imports(rel: str, source: str) -> None:
    assert violations(rel, source) == []


# -- no import cycles ------------------------------------------------------------------------
#
# Two modules that import each other (directly or through others) load in an
# order that depends on which one is imported first, and a name used at import
# time can be missing. Only what runs at import counts: imports at module level
# (also inside ``try``, ``if`` and class bodies), not those inside functions
# (made at call time) and not those under ``if TYPE_CHECKING:`` (never run).


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_nodes(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found.extend(_import_time_nodes(node.body))
            found.extend(_import_time_nodes(node.orelse))
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found.extend(_import_time_nodes(part))
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While, ast.ClassDef)):
            found.extend(_import_time_nodes(node.body))
            found.extend(_import_time_nodes(getattr(node, "orelse", [])))
    return found


def import_time_imports(rel_path: str, source: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that importing the file imports (each import
    resolved to the most specific module of ``known`` it names)."""
    tree = ast.parse(source, filename=rel_path)
    is_package = rel_path.endswith("__init__.py")
    package = module_name(rel_path).split(".")
    if not is_package:
        package = package[:-1]
    names: list[str] = []
    for node in _import_time_nodes(tree.body):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
            continue
        base_parts = package[: len(package) - (node.level - 1)] if node.level else []
        base = ".".join(base_parts + ([node.module] if node.module else []))
        for alias in node.names:
            full = f"{base}.{alias.name}" if base else alias.name
            names.append(full if full in known else base)
    out: set[str] = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    out.discard(module_name(rel_path))
    return out


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the modules it imports at import time, for files given as {relative path: source}."""
    known = {module_name(rel) for rel in sources}
    return {module_name(rel): import_time_imports(rel, src, known) for rel, src in sources.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # the shortest way from the group's first module back to it, inside the group
        start = min(group)
        came_from: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in came_from:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group):
                    if w not in came_from:
                        came_from[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(came_from[path[-1]])
        cycles.append(path[::-1])
    return sorted(cycles)


def test_no_import_cycles() -> None:
    sources = {f.relative_to(ROOT).as_posix(): f.read_text(encoding="utf-8") for f in source_files()}
    graph = import_graph(sources)
    assert "gateway.pipeline" in graph["gateway.runtime"]  # the graph has the edges it should
    cycles = import_cycles(graph)
    assert cycles == [], "modules that import each other:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(("sources", "expected"), [
    ({"gateway/a.py": "from gateway import b\n", "gateway/b.py": "import gateway.a\n"},
     [["gateway.a", "gateway.b", "gateway.a"]]),
    ({"gateway/a.py": "from gateway.b import f\n", "gateway/b.py": "from gateway.c import g\n",
      "gateway/c.py": "try:\n    from gateway.a import h\nexcept ImportError:\n    pass\n"},
     [["gateway.a", "gateway.b", "gateway.c", "gateway.a"]]),
    ({"gateway/web/__init__.py": "", "gateway/web/x.py": "from . import y\n",
      "gateway/web/y.py": "class C:\n    from gateway.web.x import Z\n"},
     [["gateway.web.x", "gateway.web.y", "gateway.web.x"]]),
    ({"gateway/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gateway.b import B\n",
      "gateway/b.py": "from gateway.a import A\n"}, []),
    ({"gateway/a.py": "def f():\n    from gateway.b import B\n", "gateway/b.py": "import gateway.a\n"}, []),
])
def test_the_cycle_checker(sources: dict[str, str], expected: list[list[str]]) -> None:
    assert import_cycles(import_graph(sources)) == expected
