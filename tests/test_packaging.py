"""A fresh machine gets what was tested: every library the code imports is
declared with a major-version bound, pinned in ``constraints.txt``, and the
README's commands and ``.ci/run`` install from that file."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}
OWN = {"gateway", "adapters", "schemas", "tests", "loadtests"}
DIST_OF = {"paho": "paho-mqtt", "prometheus_client": "prometheus-client", "yaml": "pyyaml"}
"""Import names that differ from the distribution's name."""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _third_party_imports(*folders: str) -> dict[str, str]:
    """Top-level import name -> a file importing it, for every non-stdlib, non-project import."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "fedify_peer" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    top = n.split(".")[0]
                    if top not in STDLIB and top not in OWN:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[_name(name)] = version
    return pins


RUNTIME = {_name(r): r for r in PYPROJECT["project"]["dependencies"]}
TEST = {_name(r): r for r in PYPROJECT["project"]["optional-dependencies"]["test"]}


@pytest.mark.parametrize(("folders", "declared"), [
    (("gateway", "adapters", "schemas"), RUNTIME),
    (("tests", "loadtests"), {**RUNTIME, **TEST}),
])
def test_every_imported_library_is_declared(folders: tuple[str, ...], declared: dict[str, str]) -> None:
    missing = {imp: where for imp, where in _third_party_imports(*folders).items()
               if DIST_OF.get(imp, imp).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_dependency_has_an_upper_bound_and_a_pin() -> None:
    pins = _constraints()
    for name, requirement in {**RUNTIME, **TEST}.items():
        assert "<" in requirement.split(";")[0], f"{requirement!r} has no upper bound"
        assert name in pins, f"{name} is not pinned in constraints.txt"


def test_the_readme_commands_install_the_pins_and_ci_runs_the_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(python3 -m venv .venv .*?)\n```", readme)
    assert len(commands) >= 2, "the README's quick start has lost its two commands"
    demo = next(c for c in commands if c.endswith("civic-gateway demo"))
    test = next(c for c in commands if c.endswith("-m pytest"))
    assert "-c constraints.txt" in demo and "-c constraints.txt" in test
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [test], f".ci/run runs {ci}, the README says {test!r}"
