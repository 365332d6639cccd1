"""JSON Schema of every common-schema type, for sites written in any language."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import msgspec
import orjson

from schemas import v1
from schemas.cloudevents import CloudEvent, CloudEventBatch

ENTITIES = {
    "actor": v1.Actor,
    "attachment": v1.Attachment,
    "message": v1.Message,
    "message-deletion": v1.MessageDeletion,
    "reaction": v1.Reaction,
    "membership": v1.Membership,
    "moderation-action": v1.ModerationAction,
    "report": v1.Report,
    "profile-update": v1.ProfileUpdate,
    "account-move": v1.AccountMove,
}


def canonical(node: Any) -> Any:
    """The schema with what msgspec releases print differently made one way.

    Descriptions are docstrings, which some releases dedent and others do not
    (``inspect.cleandoc`` here); the members of an ``anyOf`` have no order in
    JSON Schema, and releases list them differently (sorted here). So the
    documents are the same bytes whichever msgspec is installed, and two
    documents mean the same thing exactly when their canonical forms are equal."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "description" and isinstance(v, str):
                out[k] = inspect.cleandoc(v)
            elif k in ("anyOf", "oneOf") and isinstance(v, list):
                out[k] = sorted((canonical(m) for m in v), key=lambda m: orjson.dumps(m, option=orjson.OPT_SORT_KEYS))
            else:
                out[k] = canonical(v)
        return out
    if isinstance(node, list):
        return [canonical(v) for v in node]
    return node


def documents() -> dict[str, bytes]:
    """File name -> JSON Schema document (deterministic bytes)."""
    docs: dict[str, object] = {}
    for name, typ in ENTITIES.items():
        docs[f"{name}.schema.json"] = msgspec.json.schema(typ)
    docs["cloudevent.schema.json"] = msgspec.json.schema(CloudEvent)
    docs["cloudevent-batch.schema.json"] = msgspec.json.schema(CloudEventBatch)
    out = {}
    for fname, schema in docs.items():
        assert isinstance(schema, dict)
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  "$id": f"urn:civic-gateway:schema:v{v1.SCHEMA_VERSION}:{fname}", **canonical(schema)}
        out[fname] = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    return out


def export(directory: str | Path) -> list[Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, data in documents().items():
        path = d / fname
        path.write_bytes(data)
        written.append(path)
    return written
