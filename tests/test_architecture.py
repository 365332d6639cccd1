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
    assert "schemas/v1.py" in rels and "gateway/pipeline/__init__.py" in rels and "adapters/webhook/adapter.py" in rels
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
