"""JSON Schema of every common-schema type, for sites written in any language."""

from __future__ import annotations

from pathlib import Path

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
                  "$id": f"urn:civic-gateway:schema:v{v1.SCHEMA_VERSION}:{fname}", **schema}
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
