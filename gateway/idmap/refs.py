"""Typed references: what the id map hands out instead of bare strings.

A reference names a message, a person, a group or one copy of a message in
the gateway's terms (canonical ids, the same on every platform). ``Refs`` are
the references of one inbound event once the id map has resolved them
(``IdMap.inbound``); ``Outward`` are the same references in one target's
terms (``IdMap.outbound``), with the messages whose target id is not known yet
(``pending``) left for delivery to complete (``gateway.idmap.completion``).
Pure data: no I/O.
"""

from __future__ import annotations

from typing import NewType

from msgspec import Struct

from gateway.ids import CanonicalId, GroupRef, NativeId
from schemas.v1 import Actor

MessageRef = NewType("MessageRef", CanonicalId)
"""The gateway's id of a message (``cgm_...``)."""
PersonRef = NewType("PersonRef", CanonicalId)
"""The gateway's id of a person (``cga_...``)."""


class CopyRef(Struct, frozen=True, gc=False):
    """One copy of a message: its id in one group of one platform, and how the
    platform came by it (``ids.ORIGIN``, ``COPY`` or ``SENT``)."""

    group: GroupRef
    native: NativeId
    how: int


class Person(Struct, frozen=True, gc=False):
    """A person an event names: their canonical id, how the source platform came
    by their native id, and the person as they may be shown (someone the source
    knows only by an anonymous stand-in stays anonymous, whatever the event claims)."""

    ref: PersonRef
    how: int
    actor: Actor


class Refs(Struct, gc=False):
    """Every reference of one inbound event, in canonical terms.

    ``message`` is the message the event is about (an edit's target, a deletion's
    id, a reaction's, a report's or a moderation action's message; a new message
    once ``IdMap.new_message`` gave it an id); ``unknown`` names the reference
    fields whose native id the gateway never saw."""

    acting: Person | None = None
    """Who did it: the author, the moderator (``by``), the reporter, the profile's owner."""
    show_acting: bool = True
    """Whether the acting person appears on the targets (a reporter only when identified)."""
    message: MessageRef | None = None
    message_how: int = 0
    message_optional: bool = False
    """A report's message may be missing on a target; every other event needs it."""
    created: bool = False
    """``message`` is new: each target gets it under a stand-in id until it names its own."""
    reply_to: MessageRef | None = None
    thread: MessageRef | None = None
    mentions: tuple[Person, ...] = ()
    member: Person | None = None
    by: Person | None = None
    """A membership change's moderator (the acting person of a membership is ``by`` or ``member``)."""
    unknown: tuple[str, ...] = ()


class Outward(Struct, gc=False):
    """The references of one event in one target's terms (None where there are
    none). ``missing``: the message the event is about never reached the target.
    ``dropped``: optional references (reply, thread) the target never saw."""

    message: str | None = None
    reply_to: str | None = None
    thread: str | None = None
    acting: Actor | None = None
    member: Actor | None = None
    by: Actor | None = None
    mentions: tuple[Actor, ...] = ()
    missing: bool = False
    dropped: int = 0
    pending: tuple[MessageRef, ...] = ()
    """Messages the target has only under the gateway's stand-in id so far: the
    target may name its own before this is delivered."""


def encode_pending(pending: tuple[MessageRef, ...]) -> str | None:
    """The outbox row's ``pending`` column (space-separated canonical ids; None: none)."""
    return " ".join(pending) or None


def decode_pending(column: str | None) -> tuple[MessageRef, ...]:
    """``encode_pending`` read back (also rows an earlier version wrote: same form)."""
    return tuple(MessageRef(CanonicalId(c)) for c in column.split()) if column else ()


__all__ = ["MessageRef", "PersonRef", "GroupRef", "CopyRef", "Person", "Refs", "Outward",
           "encode_pending", "decode_pending"]
