"""The common schema on the wire: CloudEvents 1.0, JSON structured mode.

Webhook and MQTT sites exchange these. ``type`` selects the payload type of
``data`` (a tagged union, so decoding validates ``data`` in the same pass),
``id`` is the event's unique id (the idempotency key), ``subject`` the group.
Extension attributes a site adds are ignored, never refused.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from schemas.v1 import (
    AccountMove,
    Id,
    Membership,
    Message,
    MessageDeletion,
    ModerationAction,
    ProfileUpdate,
    Reaction,
    Report,
)

CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
MAX_BATCH = 1000


class CloudEventBase(Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True, gc=False):
    """Context attributes shared by every event type."""

    specversion: Literal["1.0"]
    id: Id
    source: Annotated[str, Meta(min_length=1, max_length=1024)]
    subject: Id
    time: Annotated[str, Meta(max_length=64)] | None = None
    datacontenttype: Literal["application/json"] | None = None
    civicorigin: Annotated[str, Meta(max_length=64)] | None = None
    """Extension attribute set by the gateway: the platform an event came from."""


class MessageCreated(CloudEventBase, tag="civic.message.created"):
    data: Message


class MessageEdited(CloudEventBase, tag="civic.message.edited"):
    data: Message


class MessageDeleted(CloudEventBase, tag="civic.message.deleted"):
    data: MessageDeletion


class ReactionAdded(CloudEventBase, tag="civic.reaction.added"):
    data: Reaction


class ReactionRemoved(CloudEventBase, tag="civic.reaction.removed"):
    data: Reaction


class MembershipChanged(CloudEventBase, tag="civic.membership.changed"):
    data: Membership


class ModerationActionTaken(CloudEventBase, tag="civic.moderation.action"):
    data: ModerationAction


class ReportFiled(CloudEventBase, tag="civic.report.filed"):
    data: Report


class ProfileUpdated(CloudEventBase, tag="civic.profile.updated"):
    data: ProfileUpdate


class AccountMoved(CloudEventBase, tag="civic.account.moved"):
    data: AccountMove


CloudEvent = Union[
    MessageCreated,
    MessageEdited,
    MessageDeleted,
    ReactionAdded,
    ReactionRemoved,
    MembershipChanged,
    ModerationActionTaken,
    ReportFiled,
    ProfileUpdated,
    AccountMoved,
]
CloudEventBatch = Annotated[list[CloudEvent], Meta(max_length=MAX_BATCH)]

BY_TYPE: dict[str, type[CloudEventBase]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in CloudEvent.__args__  # type: ignore[attr-defined]
}
"""Event type name -> CloudEvent class, e.g. BY_TYPE["civic.message.created"]."""

single_decoder = msgspec.json.Decoder(CloudEvent)
batch_decoder = msgspec.json.Decoder(CloudEventBatch)
encoder = msgspec.json.Encoder()


_TYPE_OF: dict[type, str] = {cls: name for name, cls in BY_TYPE.items()}


def event_type(event: CloudEventBase) -> str:
    """The ``type`` attribute of an event object."""
    return _TYPE_OF[type(event)]


# -- Shared helpers for every binding (HTTP, MQTT): pure, no I/O ----------------------------

CONTEXT_ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time", "datacontenttype", "civicorigin")
"""The context attributes this schema knows, in the order a binary-mode binding writes them."""

_AT = re.compile(r"^(.*) - at `\$(\[(\d+)\])?(.*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`$")


def media_type(content_type: str | None) -> str:
    """``"Application/CloudEvents+JSON; charset=utf-8"`` -> ``"application/cloudevents+json"``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def problem_location(exc: msgspec.ValidationError, *, batch: bool) -> tuple[str, int | None, str | None]:
    """What a decoding error says, split into (message, index in a batch, field path).

    The path is JSONPath-like and relative to the event (``$.data.text``); the
    index is set for a batch only. ``(str(exc), None, None)`` when msgspec gave
    no location."""
    text = str(exc)
    m = _AT.match(text)
    message, head, index, rest = (m.group(1), m.group(2) or "", m.group(3), m.group(4)) if m else (text, "", None, "")
    missing = _MISSING.match(message)
    if missing:  # point at the missing field itself
        rest += "." + missing.group(1)
    if not m and not missing:
        return message, None, None
    if batch and index is not None:
        return message, int(index), "$" + rest
    return message, None, "$" + head + rest


EARLIEST_TIME = 0.0
"""The earliest time of an event the gateway takes (Unix seconds: 1970-01-01)."""
LATEST_TIME = 253402300799.0
"""The latest (9999-12-31T23:59:59Z): the last second RFC 3339, and so every
target, can write. An event claiming a time outside these bounds is taken
with the time it was received (``Pipeline.prepare``)."""


def parse_time(value: str | None, default: float) -> float:
    """Unix seconds of an RFC 3339 ``time`` attribute; ``default`` when absent,
    unreadable or outside ``EARLIEST_TIME`` .. ``LATEST_TIME``."""
    if not value:
        return default
    try:
        t = datetime.fromisoformat(value).timestamp()
    except (ValueError, OverflowError):
        return default
    return t if EARLIEST_TIME <= t <= LATEST_TIME else default


def format_time(seconds: float) -> str:
    """The ``time`` attribute for Unix seconds: RFC 3339 in UTC, milliseconds."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def make_event(type_: str, *, id: str, source: str, subject: str, time: float, data: object,
               origin: str | None = None) -> CloudEventBase:
    """A CloudEvent of ``type_`` (a key of ``BY_TYPE``) as the gateway sends it."""
    return BY_TYPE[type_](specversion="1.0", id=id, source=source, subject=subject,  # type: ignore[call-arg]
                          time=format_time(time), civicorigin=origin, data=data)
