"""Dependencies point one way (STYLE.md, point 2), checked on the source with ``ast``:

* ``schemas`` imports only the standard library, msgspec and itself;
* ``gateway`` never imports ``adapters`` (adapters are found through the registry);
* ``adapters/<a>`` never imports ``adapters.<b>`` for another adapter ``b``;
* ``adapters/**`` imports nothing of ``gateway`` but ``gateway.kit``, the adapter kit;
* an adapter's ``decode.py`` and ``encode.py`` are pure: no network, event-loop
  or file I/O module, none of the kit's I/O names, no ``open()``.

And every adapter folder has the same file roles (docs/contributing.md,
"Writing an adapter"): ``adapter``, ``config``, ``decode``, ``encode``,
``inbound``, ``outbound``, and none named ``server``, ``client``,
``appservice`` or ``delivery``.

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
KIT = "gateway.kit"
PURE = ("decode.py", "encode.py")
IO_MODULES = frozenset({"aiohttp", "aiomqtt", "paho", "asyncio", "socket", "ssl", "selectors", "http",
                        "urllib.request", "requests", "httpx", "asyncpg", "sqlite3", "subprocess", "shutil",
                        "tempfile", "pathlib", "io"})
"""Modules (and their submodules) whose import means a pure module does, or can do, I/O."""
KIT_IO = frozenset({"GuardedSession", "BodyReader", "TaskGroup", "AdapterState", "AdapterContext"})
"""Kit names that move bytes or touch state: never in a pure module."""
ROLES = ("adapter.py", "config.py", "decode.py", "encode.py", "inbound.py", "outbound.py")
OTHER_ROLES = ("server.py", "client.py", "appservice.py", "delivery.py")
PENDING: dict[str, str] = {}
"""Known, dated exceptions to the rules below, each with why and what ends it
(``test_pending_exceptions_are_still_needed`` fails once one is no longer needed)."""


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
    found = set(imported_modules(rel_path, source))
    for line, name in sorted(found):
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
            if head == "gateway" and name != KIT and not name.startswith(KIT + ".") \
                    and not (name == "gateway" and (line, KIT) in found):
                out.append(f"{where}: adapter {own!r} imports {name!r} (adapters import only {KIT} from the core)")
            if parts[-1] in PURE:
                if any(name == m or name.startswith(m + ".") for m in IO_MODULES):
                    out.append(f"{where}: {parts[-1]} is pure but imports {name!r} (I/O belongs in inbound/outbound)")
                if name.startswith(KIT + ".") and name.split(".")[-1] in KIT_IO:
                    out.append(f"{where}: {parts[-1]} is pure but imports {name!r} (I/O belongs in inbound/outbound)")
    if top == "adapters" and parts[-1] in PURE:
        for node in ast.walk(ast.parse(source, filename=rel_path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                out.append(f"{rel_path}:{node.lineno}: {parts[-1]} is pure but calls open()")
    return out


def source_files() -> list[Path]:
    files = []
    for pkg in PACKAGES:
        files.extend(sorted((ROOT / pkg).rglob("*.py")))
    return [f for f in files if ".venv" not in f.parts and "__pycache__" not in f.parts]


def test_the_packages_exist_and_are_scanned() -> None:
    rels = {f.relative_to(ROOT).as_posix() for f in source_files()}
    # if the scan finds nothing the rule checks below pass vacuously
    assert "schemas/v1.py" in rels and "gateway/pipeline/__init__.py" in rels and "adapters/webhook/adapter.py" in rels
    assert len(rels) >= 20


@pytest.mark.parametrize("path", source_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_dependencies_point_one_way(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    if rel in PENDING:
        pytest.skip(PENDING[rel])
    assert violations(rel, path.read_text(encoding="utf-8")) == []


def adapter_folders() -> list[Path]:
    return sorted(d for d in (ROOT / "adapters").iterdir() if (d / "__init__.py").is_file())


def role_problems(folder: str, files: set[str]) -> list[str]:
    """What the folder ``adapters/<folder>`` holding ``files`` lacks or has too many, one line each."""
    out = [f"adapters/{folder}: no {role} (every adapter has {', '.join(ROLES)})" for role in ROLES
           if role not in files and f"adapters/{folder}/{role}" not in PENDING]
    out += [f"adapters/{folder}/{name}: not a role of an adapter folder (receiving is inbound.py, sending "
            f"outbound.py; a protocol helper is named for what it is)" for name in OTHER_ROLES
            if name in files and f"adapters/{folder}/{name}" not in PENDING]
    return out


def test_there_are_adapter_folders() -> None:
    assert {d.name for d in adapter_folders()} >= {"webhook", "mqtt", "matrix", "activitypub"}


@pytest.mark.parametrize("folder", adapter_folders(), ids=lambda d: d.name)
def test_every_adapter_folder_has_the_same_file_roles(folder: Path) -> None:
    assert role_problems(folder.name, {f.name for f in folder.glob("*.py")}) == []


@pytest.mark.parametrize(("files", "expected"), [
    ({"adapter.py", "config.py", "decode.py", "encode.py", "inbound.py"}, "adapters/x: no outbound.py"),
    ({*ROLES, "server.py"}, "adapters/x/server.py: not a role"),
    ({*ROLES, "client.py"}, "adapters/x/client.py: not a role"),
])
def test_the_role_check_reports_a_missing_or_stray_role(files: set[str], expected: str) -> None:
    assert any(expected in p for p in role_problems("x", files)), role_problems("x", files)


def test_pending_exceptions_are_still_needed() -> None:
    """An exception is removed once its file keeps the rules (or is gone / exists)."""
    for rel in PENDING:
        path = ROOT / rel
        if rel.endswith("/outbound.py"):
            assert not path.exists(), f"{rel} exists now: drop it from PENDING"
        else:
            assert path.exists() and (violations(rel, path.read_text(encoding="utf-8"))
                                      or path.name in OTHER_ROLES), f"{rel} keeps the rules now: drop it from PENDING"


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
    ("adapters/matrix/adapter.py", "from gateway.adapter import Adapter\n",
     "adapters/matrix/adapter.py:1: adapter 'matrix' imports 'gateway.adapter' (adapters import only gateway.kit"),
    ("adapters/matrix/outbound.py", "import os\nimport gateway.netguard\n",
     "adapters/matrix/outbound.py:2: adapter 'matrix' imports 'gateway.netguard'"),
    ("adapters/matrix/inbound.py", "import gateway\n", "adapter 'matrix' imports 'gateway'"),
    ("adapters/matrix/inbound.py", "from gateway import kit, metrics\n", "adapter 'matrix' imports 'gateway.metrics'"),
    ("adapters/mqtt/sub/x.py", "def f():\n    from gateway.tasks import TaskGroup\n",
     "adapters/mqtt/sub/x.py:2: adapter 'mqtt' imports 'gateway.tasks'"),
    ("adapters/mqtt/x.py", "from ...gateway import ids\n", "adapter 'mqtt' imports 'gateway.ids'"),
    ("adapters/webhook/decode.py", "import aiohttp\n", "decode.py is pure but imports 'aiohttp'"),
    ("adapters/webhook/encode.py", "from aiohttp import web\n", "encode.py is pure but imports 'aiohttp'"),
    ("adapters/mqtt/decode.py", "import asyncio\n", "decode.py is pure but imports 'asyncio'"),
    ("adapters/mqtt/encode.py", "import paho.mqtt.client\n", "encode.py is pure but imports 'paho.mqtt.client'"),
    ("adapters/matrix/encode.py", "from gateway.kit import GuardedSession\n",
     "encode.py is pure but imports 'gateway.kit.GuardedSession'"),
    ("adapters/matrix/decode.py", "def f(p):\n    return open(p).read()\n",
     "adapters/matrix/decode.py:2: decode.py is pure but calls open()"),
])
def test_the_checker_reports_a_violation(rel: str, source: str, expected: str) -> None:
    found = violations(rel, source)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize(("rel", "source"), [
    ("schemas/v2.py", "import msgspec\nfrom typing import Annotated\nfrom schemas.v1 import Actor\nfrom . import v1\n"),
    ("gateway/x.py", "import aiohttp\nfrom schemas.v1 import Actor\nfrom gateway.ids import GroupId\n"),
    ("adapters/matrix/decode.py", "from adapters.matrix import native\nfrom . import native\n"
                                  "from gateway.kit import Inbound\nimport schemas\nimport re\n"),
    ("adapters/matrix/decode.py", "from gateway import kit\nfrom gateway.kit import Decoded, schema_problem\n"),
    ("adapters/matrix/inbound.py", "import aiohttp\nfrom gateway.kit import GuardedSession, TaskGroup\n"),
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
