"""Fake platform -> gateway, pure: native events to ``Inbound`` records. No I/O.

The fake platform's native event is a JSON object::

    {"op": "post", "id": "fk:7", "room": "lobby", "at": 1700000000.5,
     "data": {"msg": "fk:7", "by": {"id": "ann"}, "text": "Hello", "cw": "spoilers"}}

``op`` is what happened (``OPS``: post, edit, delete, react, unreact, member,
moderate, report, profile, move); ``id`` is the platform's id of the event
(the gateway's idempotency key: the same native event decoded twice gives the
same ``event_id``); ``room`` the group; ``at`` Unix seconds. A post or edit
has fields of its own (``POST_FIELDS``: ``msg`` its message id, ``by`` its
author, ``cw`` its content warning, ``re`` what it replies to, ...); every
other op carries the common schema payload as it is in ``data``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.kit import DecodeError, EventId, GroupId, Inbound, PlatformName
from schemas.v1 import EVENT_TYPES

OPS: dict[str, str] = {
    "post": "civic.message.created",
    "edit": "civic.message.edited",
    "delete": "civic.message.deleted",
    "react": "civic.reaction.added",
    "unreact": "civic.reaction.removed",
    "member": "civic.membership.changed",
    "moderate": "civic.moderation.action",
    "report": "civic.report.filed",
    "profile": "civic.profile.updated",
    "move": "civic.account.moved",
}
"""Native op -> schema event type."""

POST_FIELDS = {"msg": "id", "by": "author", "text": "text", "html": "html", "title": "title", "re": "reply_to",
               "thread": "thread", "cw": "warning", "nsfw": "sensitive", "at_people": "mentions",
               "media": "attachments", "lang": "language"}
"""Native field of a post -> field of ``schemas.v1.Message``."""


def decode(platform: PlatformName, native: Any, now: float) -> Inbound:
    """One native event as the gateway's ``Inbound``; ``DecodeError`` naming the field."""
    if not isinstance(native, Mapping):
        raise DecodeError("a fake event is a JSON object", field="$")
    op = native.get("op")
    if op not in OPS:
        raise DecodeError(f"unknown op {op!r}: expected one of {', '.join(OPS)}", field="$.op")
    for key in ("id", "room"):
        if not isinstance(native.get(key), str) or not native[key]:
            raise DecodeError("must be a non-empty string", field=f"$.{key}")
    at = native.get("at")
    if at is not None and (not isinstance(at, (int, float)) or isinstance(at, bool)):
        raise DecodeError("must be Unix seconds", field="$.at")
    type_ = OPS[op]
    data = native.get("data")
    if not isinstance(data, Mapping):
        raise DecodeError("must be an object", field="$.data")
    if op in ("post", "edit"):
        unknown = set(data) - set(POST_FIELDS)
        if unknown:
            raise DecodeError(f"unknown field {sorted(unknown)[0]!r}", field="$.data")
        data = {POST_FIELDS[k]: v for k, v in data.items()}
    try:
        payload = msgspec.convert(data, EVENT_TYPES[type_])
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid {op}: {exc}", field="$.data") from None
    return Inbound(platform=platform, group=GroupId(native["room"]), event_id=EventId(native["id"]), type=type_,
                   payload=payload, time=float(at) if at is not None else now)


__all__ = ["OPS", "POST_FIELDS", "decode"]
