"""Version 1 of the civic-gateway common schema.

Every platform's native events are translated into these types and back. The
same types are the ``data`` of the CloudEvents that webhook and MQTT sites
exchange with the gateway (see ``schemas.cloudevents``): a site sends its own
ids, the gateway swaps them for canonical ids inside and for the target's ids
on the way out.

Rules kept here on purpose:

* no engagement counters anywhere (no like, boost, view or follower counts);
* a content warning (``warning``) is a first-class field of every message;
* an actor carries the identity level its person chose, and the gateway shows
  no more of them than that level allows;
* wire types never forbid unknown fields, so a newer site can talk to an older
  gateway (schema evolution); config types do forbid them;
* the types are immutable and hold no cycles, so they opt out of the cyclic
  garbage collector (``gc=False``): hundreds of thousands of them in queues
  cost the collector nothing.

This module imports only the standard library and msgspec.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

SCHEMA_VERSION = 1

# Bounded strings: every field that crosses a link has a size limit, so a
# payload bomb is refused while decoding rather than later.
Id = Annotated[str, Meta(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$",
                         description="An id, native to the platform that sent it (no control characters).")]
Name = Annotated[str, Meta(max_length=256, description="A display name.")]
Text = Annotated[str, Meta(max_length=65536, description="Plain text.")]
Html = Annotated[str, Meta(max_length=131072, description="HTML; the gateway sanitises it on entry.")]
Short = Annotated[str, Meta(max_length=1024)]
Url = Annotated[str, Meta(min_length=1, max_length=4096, description="An absolute http(s) URL.")]
Lang = Annotated[str, Meta(min_length=2, max_length=35, description="A BCP 47 language tag, e.g. 'nl' or 'nl-BE'.")]

Identity = Literal["anonymous", "pseudonymous", "identified"]
"""How much of a person is shown on other platforms.

anonymous: neither name nor handle crosses a link; each linked group sees an
unlinkable stand-in. pseudonymous: a chosen name and a stable handle.
identified: name and handle, and that an organisation vouched for them."""

Role = Literal["member", "moderator", "admin"]
MembershipState = Literal["joined", "left", "invited", "kicked", "banned", "unbanned", "role_changed"]
ModerationKind = Literal["remove_message", "ban", "unban", "kick", "mute"]
Category = Literal[
    "spam",
    "harassment",
    "hate",
    "violence",
    "sexual",
    "child_safety",
    "self_harm",
    "privacy",
    "misinformation",
    "ip_rights",
    "illegal",
    "off_topic",
    "rule_violation",
    "other",
]
"""The canonical reason vocabulary for reports and moderation (see
shared/research/platforms.md section 3c); each adapter keeps a crosswalk."""


class Actor(Struct, frozen=True, omit_defaults=True, gc=False):
    """A person (or bot) as one platform knows them."""

    id: Id
    name: Name | None = None
    identity: Identity = "pseudonymous"


class Attachment(Struct, frozen=True, omit_defaults=True, gc=False):
    """A media reference: the gateway links media, it does not copy bytes."""

    url: Url
    media_type: Annotated[str, Meta(max_length=255, pattern=r"^[\w.+-]+/[\w.+-]+$")]
    alt: Text | None = None
    name: Name | None = None
    size: Annotated[int, Meta(ge=0, le=2**53 - 1)] | None = None


class Message(Struct, frozen=True, omit_defaults=True, gc=False):
    """A post in a group: payload of civic.message.created and civic.message.edited.

    For an edit, ``id`` names the message being edited and the other fields
    carry its full new content."""

    id: Id
    author: Actor
    text: Text
    html: Html | None = None
    title: Name | None = None
    reply_to: Id | None = None
    thread: Id | None = None
    warning: Short | None = None
    sensitive: bool = False
    mentions: tuple[Actor, ...] = ()
    attachments: Annotated[tuple[Attachment, ...], Meta(max_length=32)] = ()
    language: Lang | None = None


class MessageDeletion(Struct, frozen=True, omit_defaults=True, gc=False):
    """Payload of civic.message.deleted: the author (or ``by``) removed it."""

    id: Id
    by: Actor | None = None
    reason: Short | None = None


class Reaction(Struct, frozen=True, omit_defaults=True, gc=False):
    """Payload of civic.reaction.added and civic.reaction.removed. Per person;
    the gateway never turns reactions into counts."""

    message: Id
    author: Actor
    key: Annotated[str, Meta(min_length=1, max_length=64, description="An emoji or a short word.")]


class Membership(Struct, frozen=True, omit_defaults=True, gc=False):
    """Payload of civic.membership.changed."""

    member: Actor
    state: MembershipState
    role: Role | None = None
    by: Actor | None = None
    reason: Short | None = None


class ModerationAction(Struct, frozen=True, omit_defaults=True, gc=False):
    """Payload of civic.moderation.action: a moderator acted on a message or a member."""

    action: ModerationKind
    message: Id | None = None
    member: Actor | None = None
    by: Actor | None = None
    reason: Short | None = None
    category: Category | None = None
    until: Annotated[str, Meta(max_length=64, description="RFC 3339 end of a mute or ban.")] | None = None


class Report(Struct, frozen=True, omit_defaults=True, gc=False):
    """Payload of civic.report.filed: reaches the moderators of linked groups.
    ``reporter`` is never shown to other platforms unless they are identified."""

    category: Category
    message: Id | None = None
    member: Actor | None = None
    text: Text | None = None
    reporter: Actor | None = None


class AccountRef(Struct, frozen=True, omit_defaults=True, gc=False):
    """An account on a platform linked through the gateway (``platform`` is the
    gateway operator's name for it, as in the config)."""

    platform: Annotated[str, Meta(min_length=1, max_length=64)]
    id: Id
    name: Name | None = None


Consent = Literal["granted", "withdrawn"]
"""Whether a person agrees that what they post crosses links. A site asks its
members before it sends their events (so a person the site sends has agreed);
``withdrawn`` stops everything of them crossing and removes the copies of
their messages from the linked groups; ``granted`` lets them cross again."""


class ProfileUpdate(Struct, frozen=True, omit_defaults=True, gc=False):
    """Payload of civic.profile.updated: a person changed name, identity level or consent.

    ``also_known_as`` names the person's older accounts on other platforms: it
    is the new account's half of a move (like ActivityPub's ``alsoKnownAs``),
    and a civic.account.moved takes effect only after it."""

    actor: Actor
    also_known_as: Annotated[tuple[AccountRef, ...], Meta(max_length=16)] = ()
    consent: Consent | None = None


class AccountMove(Struct, frozen=True, omit_defaults=True, gc=False):
    """Payload of civic.account.moved: ``actor`` now lives at ``target``.

    Takes effect only if the target account first declared the actor's account
    in its ``also_known_as`` (civic.profile.updated), so that no site can claim
    another platform's account for one of its own people."""

    actor: Actor
    target: AccountRef


Payload = Message | MessageDeletion | Reaction | Membership | ModerationAction | Report | ProfileUpdate | AccountMove

EVENT_TYPES: dict[str, type[Struct]] = {
    "civic.message.created": Message,
    "civic.message.edited": Message,
    "civic.message.deleted": MessageDeletion,
    "civic.reaction.added": Reaction,
    "civic.reaction.removed": Reaction,
    "civic.membership.changed": Membership,
    "civic.moderation.action": ModerationAction,
    "civic.report.filed": Report,
    "civic.profile.updated": ProfileUpdate,
    "civic.account.moved": AccountMove,
}
"""Every event type name and the type of its payload."""

EventType = Literal[
    "civic.message.created",
    "civic.message.edited",
    "civic.message.deleted",
    "civic.reaction.added",
    "civic.reaction.removed",
    "civic.membership.changed",
    "civic.moderation.action",
    "civic.report.filed",
    "civic.profile.updated",
    "civic.account.moved",
]

assert set(EVENT_TYPES) == set(EventType.__args__)  # type: ignore[attr-defined]


def payload_type(event_type: str) -> type[Struct]:
    """The payload struct for an event type name; KeyError if unknown."""
    return EVENT_TYPES[event_type]


__all__ = [
    "SCHEMA_VERSION",
    "Identity",
    "Consent",
    "Role",
    "MembershipState",
    "ModerationKind",
    "Category",
    "Actor",
    "Attachment",
    "Message",
    "MessageDeletion",
    "Reaction",
    "Membership",
    "ModerationAction",
    "Report",
    "ProfileUpdate",
    "AccountRef",
    "AccountMove",
    "Payload",
    "EVENT_TYPES",
    "EventType",
    "payload_type",
]
