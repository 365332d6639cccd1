"""The committed JSON Schema files are exactly what the code generates, and the
schema carries no engagement counters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway import cli
from gateway.schema_export import canonical, documents

ROOT = Path(__file__).resolve().parent.parent
JSON_DIR = ROOT / "schemas" / "json"
HINT = "the committed schema is stale: run `civic-gateway schema export schemas/json`"
COUNT_WORDS = ("count", "likes", "favourites", "followers")


def test_committed_files_mean_what_the_code_generates() -> None:
    """Compared as schemas, not as bytes: how a msgspec release prints a
    docstring or orders an ``anyOf`` must not fail a fresh clone."""
    docs = documents()
    assert len(docs) >= 12
    for fname, data in docs.items():
        path = JSON_DIR / fname
        assert path.is_file(), f"{fname} is missing; {HINT}"
        assert canonical(orjson.loads(path.read_bytes())) == canonical(orjson.loads(data)), f"{fname} differs; {HINT}"


def test_the_comparison_sees_a_change_of_meaning_but_not_of_print() -> None:
    doc = orjson.loads(documents()["membership.schema.json"])
    reprinted = orjson.loads(orjson.dumps(doc))  # then made cosmetic changes a msgspec release makes
    for node in _walk(reprinted):
        if isinstance(node.get("anyOf"), list):
            node["anyOf"].reverse()
        if isinstance(node.get("description"), str):
            node["description"] = node["description"].replace("\n", "\n    ")
    assert canonical(reprinted) == canonical(doc)
    changed = orjson.loads(orjson.dumps(doc))
    changed["$defs"]["Membership"]["required"] = []
    assert canonical(changed) != canonical(doc)


def _walk(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        found.append(node)
        for v in node.values():
            found.extend(_walk(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(_walk(v))
    return found


def test_no_stale_or_extra_file_in_schemas_json() -> None:
    committed = {p.name for p in JSON_DIR.iterdir()}
    extra = committed - set(documents())
    assert not extra, f"files no type generates any more: {sorted(extra)}; {HINT} and delete them"


def test_documents_are_deterministic_and_self_identifying() -> None:
    first, second = documents(), documents()
    assert first == second
    for fname, data in first.items():
        doc = orjson.loads(data)
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert doc["$id"].endswith(f":{fname}")
        assert data.endswith(b"\n")


def test_cli_schema_export_writes_the_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "json"
    assert cli.main(["schema", "export", str(out)]) == 0
    docs = documents()
    assert {p.name for p in out.iterdir()} == set(docs)
    for fname, data in docs.items():
        assert (out / fname).read_bytes() == data
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted(docs)


def property_names(schema: Any) -> set[str]:
    """Every property name anywhere in a JSON Schema (including $defs)."""
    names: set[str] = set()
    if isinstance(schema, dict):
        props = schema.get("properties")
        if isinstance(props, dict):
            names.update(props)
        for value in schema.values():
            names |= property_names(value)
    elif isinstance(schema, list):
        for value in schema:
            names |= property_names(value)
    return names


def count_like(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(w in n.lower() for w in COUNT_WORDS))


def test_the_count_check_finds_a_counter() -> None:
    synthetic = {"$defs": {"Post": {"properties": {"text": {}, "likeCount": {}, "Followers": {}}}},
                 "properties": {"id": {}, "favourites_total": {}}}
    assert count_like(property_names(synthetic)) == ["Followers", "favourites_total", "likeCount"]


def test_message_schema_has_no_engagement_counter() -> None:
    message = orjson.loads(documents()["message.schema.json"])
    names = property_names(message)
    assert {"id", "author", "text", "warning"} <= names  # the walk really sees the properties
    assert count_like(names) == []


@pytest.mark.parametrize("fname", sorted(documents()))
def test_no_schema_has_an_engagement_counter(fname: str) -> None:
    assert count_like(property_names(orjson.loads(documents()[fname]))) == []
