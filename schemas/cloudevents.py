"""The common schema on the wire: CloudEvents 1.0, JSON structured mode.

Webhook and MQTT sites exchange these. ``type`` selects the payload type of
``data`` (a tagged union, so decoding validates ``data`` in the same pass),
``id`` is the event's unique id (the idempotency key), ``subject`` the group.
Extension attributes a site adds are ignored, never refused.
"""

from __future__ import annotations

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
