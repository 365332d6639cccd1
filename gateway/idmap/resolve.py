"""The id map's event-time half: every reference of an event, native ids to
canonical ones once per event (``inbound``), and canonical ids to each
target's native ids once per target (``outbound``).

Both run inside the store transaction of the event, so that the id rows they
write (new people, new messages, stand-ins sent to a target) commit together
with the outbox rows of the fan-out or not at all. The pipeline calls them and
nothing else turns ids around (delivery completes what stayed ``pending``
through ``gateway.idmap.completion``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from gateway import ids
from gateway.idmap.people import People
from gateway.idmap.refs import CopyRef, MessageRef, Outward, Person, PersonRef, Refs
from gateway.ids import ACTOR, MESSAGE, CanonicalId, GroupId, GroupRef, PlatformName
from gateway.store.base import Tx
from schemas.v1 import (
    AccountMove,
    AccountRef,
    Actor,
    Membership,
    Message,
    MessageDeletion,
    ModerationAction,
    ProfileUpdate,
    Reaction,
    Report,
)


def acting_actor(p: Any) -> Actor | None:
    """The person who did what the event reports, as the event names them
    (loop guard, ban rules and consent look at them)."""
    if isinstance(p, (Message, Reaction)):
        return p.author
    if isinstance(p, Membership):
        return p.by or p.member
    if isinstance(p, (ModerationAction, MessageDeletion)):
        return p.by
    if isinstance(p, Report):
        return p.reporter
    if isinstance(p, (ProfileUpdate, AccountMove)):
        return p.actor
    return None


class IdMap:
    """One per pipeline. Holds the people caches (``People``); ``clear`` them
    after a failed commit or an account move."""

    def __init__(self, ghost_key: bytes) -> None:
        self.people = People(ghost_key)

    def clear(self) -> None:
        self.people.clear()

    # -- inbound: native -> canonical, once per event ------------------------------------
    def inbound(self, tx: Tx, source: GroupRef, etype: str, p: Any) -> Refs:
        """The references of an event from ``source``. The acting person comes
        first: when the source knows them only as a gateway stand-in (an echo)
        nothing else is resolved. A new message gets its id from ``new_message``."""
        refs = Refs()
        acting = acting_actor(p)
        if acting is not None:
            refs.acting = self.people.resolve(tx, source, acting)
            if refs.acting.how != ids.ORIGIN:
                return refs
        unknown: list[str] = []
        if isinstance(p, Message):
            if etype == "civic.message.edited":
                self._message(tx, source, p.id, refs, unknown, "edit_unknown")
            refs.reply_to = self._message_ref(tx, source, p.reply_to, unknown, "reply_unknown")
            refs.thread = self._message_ref(tx, source, p.thread, unknown, "thread_unknown")
            refs.mentions = tuple(self.people.resolve(tx, source, m) for m in p.mentions)
        elif isinstance(p, MessageDeletion):
            self._message(tx, source, p.id, refs, unknown, "message")
        elif isinstance(p, Reaction):
            self._message(tx, source, p.message, refs, unknown, "message")
        elif isinstance(p, Membership):
            refs.show_acting = False  # shown as member and by
            refs.member = refs.acting if p.by is None else self.people.resolve(tx, source, p.member)
            refs.by = refs.acting if p.by is not None else None
        elif isinstance(p, (ModerationAction, Report)):
            if p.message is not None:
                self._message(tx, source, p.message, refs, unknown, "message")
            if p.member is not None:
                refs.member = self.people.resolve(tx, source, p.member)
            if isinstance(p, Report):
                refs.message_optional = True
                # A reporter crosses only if they chose to be identified.
                refs.show_acting = p.reporter is not None and p.reporter.identity == "identified"
        refs.unknown = tuple(unknown)
        return refs

    def _message(self, tx: Tx, source: GroupRef, native: str, refs: Refs, unknown: list[str], why: str) -> None:
        hit = tx.lookup(source.platform, source.group, MESSAGE, native)
        if hit is None:
            unknown.append(why)
        else:
            refs.message, refs.message_how = MessageRef(hit[0]), hit[1]

    @staticmethod
    def _message_ref(tx: Tx, source: GroupRef, native: str | None, unknown: list[str], why: str) -> MessageRef | None:
        if native is None:
            return None
        hit = tx.lookup(source.platform, source.group, MESSAGE, native)
        if hit is None:
            unknown.append(why)
            return None
        return MessageRef(hit[0])

    def new_message(self, tx: Tx, source: GroupRef, native: str, refs: Refs) -> bool:
        """Give a message born on ``source`` its canonical id (in ``refs.message``);
        False if the source's id is known already: the gateway made that message there."""
        c = ids.new_message_id()
        if not tx.map(source.platform, source.group, MESSAGE, native, c, ids.ORIGIN):
            return False
        if refs.acting is not None:
            tx.record_author(c, refs.acting.ref)  # so that a withdrawal of consent can find every copy
        refs.message, refs.message_how, refs.created = MessageRef(c), ids.ORIGIN, True
        return True

    def declare_aliases(self, tx: Tx, source: GroupRef, native: str, akas: Iterable[AccountRef], now: float) -> None:
        """The new account's half of a move: it says it is also these accounts."""
        for aka in akas:
            tx.declare_alias(source.platform, native, aka.platform, aka.id, now)

    def move(self, tx: Tx, source: GroupRef, native: str, to: AccountRef, person: PersonRef) -> bool:
        """An account moved to ``to``: if that account confirmed it (``declare_aliases``),
        it is the same person from now on (their memberships, bans and messages
        follow them) and True is returned."""
        target = PlatformName(to.platform)
        if not tx.has_alias(target, to.id, source.platform, native):
            return False
        tx.remap(target, "", ACTOR, to.id, person)
        self.people.clear()
        return True

    @staticmethod
    def copies_by(tx: Tx, person: PersonRef) -> Iterator[tuple[MessageRef, CopyRef]]:
        """Every copy the gateway made of this person's messages: the best id
        of each group other than where the message was born."""
        for message in tx.messages_by(person):
            done: set[tuple[str, str]] = set()
            for platform, grp, native, how in tx.copies(message, MESSAGE):  # best id first per group
                if how != ids.ORIGIN and (platform, grp) not in done:
                    yield MessageRef(message), CopyRef(GroupRef(platform, GroupId(grp)), native, how)
                done.add((platform, grp))

    # -- outbound: canonical -> one target's ids, once per target ------------------------
    def outbound(self, tx: Tx, refs: Refs, target: GroupRef) -> Outward:
        """``refs`` in ``target``'s terms. A message the target never saw sets
        ``missing`` (the event cannot go there) unless optional; a reply or thread
        it never saw is left out (``dropped`` counts them)."""
        out = Outward()
        pending: list[MessageRef] = []
        if refs.message is not None:
            if refs.created:  # under the canonical id until the target names its own
                tx.map(target.platform, target.group, MESSAGE, refs.message, refs.message, ids.SENT)
                out.message = refs.message
            else:
                out.message = self._to(tx, refs.message, target, pending)
                if out.message is None and not refs.message_optional:
                    out.missing = True
                    return out
        if refs.reply_to is not None:
            out.reply_to = self._to(tx, refs.reply_to, target, pending)
            out.dropped += out.reply_to is None
        if refs.thread is not None:
            out.thread = self._to(tx, refs.thread, target, pending)
            out.dropped += out.thread is None
        show = self.people.show
        if refs.acting is not None and refs.show_acting:
            out.acting = show(tx, refs.acting.ref, refs.acting.actor, target)
        if refs.member is not None:
            out.member = show(tx, refs.member.ref, refs.member.actor, target)
        if refs.by is not None:
            out.by = show(tx, refs.by.ref, refs.by.actor, target)
        if refs.mentions:
            out.mentions = tuple(show(tx, m.ref, m.actor, target) for m in refs.mentions)
        out.pending = tuple(pending)
        return out

    @staticmethod
    def _to(tx: Tx, c: MessageRef, target: GroupRef, pending: list[MessageRef]) -> str | None:
        hit = tx.native_for(CanonicalId(c), target.platform, target.group, MESSAGE)
        if hit is None:
            return None
        if hit[1] == ids.SENT:
            pending.append(c)  # the target may name its own id before this is delivered
        return hit[0]


__all__ = ["IdMap", "acting_actor", "Person"]
