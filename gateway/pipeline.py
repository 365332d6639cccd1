"""The pipeline: what happens to one inbound event, as one template.

``prepare`` (pure, on the event loop): clean every text field and bound the
event's time. ``apply`` (inside a store transaction, so all of it commits or
none): deduplicate by the platform's event id, guard against loops, drop what
people named by the adapters' ban rules do (``gateway.policy``), translate
native ids to canonical ones, apply moderation enforcement, route over links,
translate for each target (ids, identity level, degradations) and append to
each target group's outbox, then update memberships, bans and the public
moderation log. The steps are small methods, cheapest first.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec
from msgspec import Struct
from msgspec.structs import replace

from gateway import ids, transparency
from gateway.adapter import Capabilities, Inbound
from gateway.ids import ACTOR, MESSAGE, CanonicalId, EventId, GroupRef, LinkName, PlatformName
from gateway.people import People
from gateway.policy import BanRules
from gateway.router import Route, Router
from gateway.sanitize import clean_payload
from gateway.store.base import OutboxItem, Tx, encode_payload
from schemas.cloudevents import EARLIEST_TIME, LATEST_TIME
from schemas.v1 import (
    EVENT_TYPES,
    AccountMove,
    Actor,
    Membership,
    Message,
    MessageDeletion,
    ModerationAction,
    ProfileUpdate,
    Reaction,
    Report,
)

ECHO_WINDOW = 600.0
"""Seconds during which an event sent to a group is recognised if it comes back."""
FINGERPRINTED = frozenset({"civic.message.deleted", "civic.membership.changed", "civic.moderation.action",
                           "civic.report.filed"})
"""Event types whose echo may carry no stand-in author (the others are caught by
their author, who is a gateway stand-in on the site that echoes them)."""
ECHO_MEMORY = 50_000
"""Most fingerprints of sent events kept (about 3 MB). Sites send echoes within
moments; at 10,000 events a second this still covers two and a half seconds."""


class Outcome(Struct):
    status: Literal["accepted", "duplicate", "dropped"]
    reason: str | None = None
    items: list[OutboxItem] = msgspec.field(default_factory=list)
    degraded: list[str] = msgspec.field(default_factory=list)


class _Skip(Exception):
    """This target cannot take the event (e.g. it never saw the message); the reason is counted."""


class Pipeline:
    """Built once per gateway from the router and each platform's capabilities.

    ``apply`` runs inside a store transaction (on the event loop or on the
    store's worker thread, as the store decides). It keeps two caches of
    id-map rows (cleared when an account move rewrites one) and the link bans
    (mirrored moderation).
    """

    def __init__(self, router: Router, capabilities: Mapping[PlatformName, Capabilities], ghost_key: bytes,
                 bans: set[tuple[LinkName, CanonicalId]], withdrawn: set[CanonicalId] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.router = router
        self.capabilities = dict(capabilities)
        self.bans = bans
        self.withdrawn = withdrawn if withdrawn is not None else set()
        self.clock = clock
        self.ban_rules: BanRules | None = None
        """Ban rules the adapters imported (``set_ban_rules``); None when there
        are none, so that ``apply`` pays one comparison for them."""
        self.people = People(ghost_key)
        # Fingerprints of what was just sent to each group, so that a site which
        # sends an event straight back (its hooks fire for what the gateway
        # posted) is recognised even where no stand-in author gives it away.
        # Kept here for speed and in the store (``Tx.remember_sent``) so that
        # another node of a cluster, or this one after a restart, knows them too.
        self._sent_now: set[bytes] = set()
        self._sent_before: set[bytes] = set()
        self._sent_since = clock()
        self._handlers: dict[str, Callable[..., Outcome]] = {
            t: getattr(self, "_in_" + t.removeprefix("civic.").replace(".", "_")) for t in EVENT_TYPES}

    def set_ban_rules(self, rules: BanRules | None) -> None:
        """Apply these ban rules to every event from now on (None or empty: none)."""
        self.ban_rules = rules if rules else None

    def invalidate(self) -> None:
        """Forget the caches (after a transaction failed to commit)."""
        self.people.clear()

    # -- before the store ------------------------------------------------------------
    def prepare(self, ev: Inbound) -> Inbound:
        """Clean every text field (``gateway.sanitize.clean_payload``: rich
        text sanitised, control characters dropped, one-line fields kept on one
        line), whatever platform the event came from, and bound its time: a
        time outside ``EARLIEST_TIME`` .. ``LATEST_TIME`` (which no target could
        write) becomes the time it was received."""
        p = clean_payload(ev.payload)
        t = ev.time if EARLIEST_TIME <= ev.time <= LATEST_TIME else self.clock()  # NaN fails both
        if p is ev.payload and t == ev.time:
            return ev
        return replace(ev, payload=p, time=t)

    # -- inside the transaction --------------------------------------------------------
    def apply(self, tx: Tx, ev: Inbound) -> Outcome:
        now = self.clock()
        if not tx.first_seen(ev.platform, ev.event_id, now):
            return Outcome("duplicate")
        source = GroupRef(ev.platform, ev.group)
        routes = self.router.routes(source)
        if not routes:
            return Outcome("dropped", "unlinked")
        p = ev.payload
        if ev.type in FINGERPRINTED and self._is_echo(tx, ev, now):
            return Outcome("dropped", "echo")
        acting = _acting_actor(p)
        acting_c: CanonicalId | None = None
        if acting is not None:
            rules = self.ban_rules  # read once: the gateway may swap it from another thread
            if rules is not None and rules.match(acting.id) is not None:
                return Outcome("dropped", "policy_ban")  # before the person is given an id
            acting_c, how, _ = self.people.resolve(tx, source, acting)
            if how != ids.ORIGIN:
                return Outcome("dropped", "echo")
            if acting_c in self.withdrawn and not (isinstance(p, ProfileUpdate) and p.consent == "granted"):
                return Outcome("dropped", "no_consent")
        return self._handlers[ev.type](tx, ev, source, routes, p, acting_c, now)

    # each _in_* returns the Outcome for one event type ---------------------------
    def _in_message_created(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route], p: Message,
                            author: CanonicalId, now: float) -> Outcome:
        c = ids.new_message_id()
        if not tx.map(source.platform, source.group, MESSAGE, p.id, c, ids.ORIGIN):
            return Outcome("dropped", "echo")  # the gateway knows this id: it made the message there

        tx.record_author(c, author)  # so that a withdrawal of consent can find every copy

        def new_copy(tx: Tx, t: GroupRef, pending: list[str]) -> str:
            tx.map(t.platform, t.group, MESSAGE, c, c, ids.SENT)  # until the target names its own id
            return c

        return self._message_out(tx, ev, source, routes, p, author, now, [], new_copy)

    def _in_message_edited(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route], p: Message,
                           author: CanonicalId, now: float) -> Outcome:
        degraded: list[str] = []
        c = self._message_from(tx, source, p.id, degraded, "edit_unknown")
        if c is None:
            return Outcome("dropped", "unknown_message")
        return self._message_out(tx, ev, source, routes, p, author, now, degraded,
                                 lambda tx, t, pending: self._message_to(tx, c, t, pending))

    def _message_out(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route], p: Message,
                     author: CanonicalId, now: float, degraded: list[str],
                     target_id: Callable[[Tx, GroupRef, list[str]], str]) -> Outcome:
        """Fan a created or edited message out, each copy in its target's terms."""
        reply = self._message_from(tx, source, p.reply_to, degraded, "reply_unknown")
        thread = self._message_from(tx, source, p.thread, degraded, "thread_unknown")
        mentions = [self._actor_ref(tx, source, m) for m in p.mentions]
        if any(mc in self.withdrawn for mc, _ in mentions):
            mentions = [(mc, m) for mc, m in mentions if mc not in self.withdrawn]
            degraded.append("mention_without_consent")

        def build(tx: Tx, route: Route, pending: list[str]) -> Message:
            t = route.target
            return _degrade(replace(
                p,
                id=target_id(tx, t, pending),
                author=self.people.show(tx, author, p.author, t),
                reply_to=self._message_to(tx, reply, t, pending, optional=True, degraded=degraded),
                thread=self._message_to(tx, thread, t, pending, optional=True, degraded=degraded),
                mentions=tuple(self.people.show(tx, mc, m, t) for mc, m in mentions),
            ), self.capabilities.get(t.platform), degraded)

        return self._fan_out(tx, ev, routes, build, now, author, degraded)

    def _in_message_deleted(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route],
                            p: MessageDeletion, by: CanonicalId | None, now: float) -> Outcome:
        hit = tx.lookup(source.platform, source.group, MESSAGE, p.id)
        if hit is None:
            return Outcome("dropped", "unknown_message")
        c, how = hit
        if how != ids.ORIGIN and by is None:
            # A copy the gateway made was deleted without a named moderator:
            # the site is echoing the deletion the gateway asked for.
            return Outcome("dropped", "echo")

        def build(tx: Tx, route: Route, pending: list[str]) -> MessageDeletion:
            t = route.target
            return replace(p, id=self._message_to(tx, c, t, pending),
                           by=self.people.show(tx, by, p.by, t) if p.by and by else None)

        return self._fan_out(tx, ev, routes, build, now, None, [])

    def _reaction(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route], p: Reaction,
                  author: CanonicalId, now: float) -> Outcome:
        c = self._message_from(tx, source, p.message, [], "")
        if c is None:
            return Outcome("dropped", "unknown_message")

        def build(tx: Tx, route: Route, pending: list[str]) -> Reaction:
            t = route.target
            if not route.link.reactions:
                raise _Skip("reactions_off")
            caps = self.capabilities.get(t.platform)
            if caps is not None and not caps.reactions:
                raise _Skip("reaction_unsupported")
            return replace(p, message=self._message_to(tx, c, t, pending),
                           author=self.people.show(tx, author, p.author, t))

        return self._fan_out(tx, ev, routes, build, now, author, [])

    _in_reaction_added = _reaction
    _in_reaction_removed = _reaction

    def _in_membership_changed(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route],
                               p: Membership, acting: CanonicalId, now: float) -> Outcome:
        member, member_actor = self._actor_ref(tx, source, p.member)
        by, by_actor = self._actor_ref(tx, source, p.by) if p.by else (None, None)
        tx.set_membership(source.platform, source.group, member, p.state, p.role, now)
        if p.state in ("kicked", "banned", "unbanned"):
            self._moderate(tx, ev, source, p.state, member, member, _as_shown(p.member, member_actor),
                           _as_shown(p.by, by_actor), p.reason, None, now)

        def build(tx: Tx, route: Route, pending: list[str]) -> Membership:
            t = route.target
            return replace(p, member=self.people.show(tx, member, member_actor, t),
                           by=self.people.show(tx, by, by_actor, t) if by and by_actor else None)

        return self._fan_out(tx, ev, routes, build, now, None, [])

    def _in_moderation_action(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route],
                              p: ModerationAction, by: CanonicalId | None, now: float) -> Outcome:
        msg = self._message_from(tx, source, p.message, [], "")
        if p.message is not None and msg is None:
            return Outcome("dropped", "unknown_message")
        member, member_actor = self._actor_ref(tx, source, p.member) if p.member else (None, None)
        by_actor = self._actor_ref(tx, source, p.by)[1] if p.by else None
        subject = msg or member or ""
        self._moderate(tx, ev, source, p.action, subject, member, _as_shown(p.member, member_actor),
                       _as_shown(p.by, by_actor), p.reason, p.category, now)

        def build(tx: Tx, route: Route, pending: list[str]) -> ModerationAction | Report:
            t = route.target
            out = replace(p, message=self._message_to(tx, msg, t, pending) if msg else None,
                          member=self.people.show(tx, member, member_actor, t) if member and member_actor else None,
                          by=self.people.show(tx, by, p.by, t) if by and p.by else None)
            if route.link.moderation == "advise":
                return Report(category=p.category or "other", message=out.message, member=out.member,
                              text=f"Advice from the moderators of a linked group: {p.action}"
                                   + (f" ({p.reason})" if p.reason else ""))
            return out

        return self._fan_out(tx, ev, routes, build, now, None, [])

    def _in_report_filed(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route], p: Report,
                         reporter: CanonicalId | None, now: float) -> Outcome:
        msg = self._message_from(tx, source, p.message, [], "")
        member, member_actor = self._actor_ref(tx, source, p.member) if p.member else (None, None)

        def build(tx: Tx, route: Route, pending: list[str]) -> Report:
            t = route.target
            out_msg = self._message_to(tx, msg, t, pending, optional=True, degraded=[]) if msg else None
            out_member = self.people.show(tx, member, member_actor, t) if member and member_actor else None
            if out_msg is None and out_member is None and (p.message or p.member):
                raise _Skip("report_target_unknown")  # (naming neither, a report is about the group itself)
            # A reporter crosses only if they chose to be identified.
            show = p.reporter is not None and reporter is not None and p.reporter.identity == "identified"
            return replace(p, message=out_msg, member=out_member,
                           reporter=self.people.show(tx, reporter, p.reporter, t) if show else None)  # type: ignore[arg-type]

        return self._fan_out(tx, ev, routes, build, now, None, [])

    def _in_profile_updated(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route],
                            p: ProfileUpdate, actor: CanonicalId, now: float) -> Outcome:
        for aka in p.also_known_as:  # the new account's half of a move
            tx.declare_alias(source.platform, p.actor.id, aka.platform, aka.id, now)
        if p.consent == "withdrawn":
            return self._withdraw(tx, ev, source, actor, now)
        if p.consent == "granted":
            tx.set_consent(actor, "granted", now)
            self.withdrawn.discard(actor)
        if p.actor.identity == "anonymous":
            return Outcome("dropped", "anonymous")  # nothing of them crosses a link

        def build(tx: Tx, route: Route, pending: list[str]) -> ProfileUpdate:
            return ProfileUpdate(actor=self.people.show(tx, actor, p.actor, route.target))

        return self._fan_out(tx, ev, routes, build, now, actor, [])

    def _in_account_moved(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route],
                          p: AccountMove, actor: CanonicalId, now: float) -> Outcome:
        target = PlatformName(p.target.platform)
        if target not in self.capabilities or not tx.has_alias(target, p.target.id, source.platform, p.actor.id):
            return Outcome("dropped", "move_unconfirmed")
        # The new account is the same person from now on: their memberships,
        # bans and messages follow them.
        tx.remap(target, "", ACTOR, p.target.id, actor)
        self.people.clear()
        if p.actor.identity == "anonymous":
            return Outcome("accepted")

        def build(tx: Tx, route: Route, pending: list[str]) -> AccountMove:
            return replace(p, actor=self.people.show(tx, actor, p.actor, route.target))

        return self._fan_out(tx, ev, routes, build, now, actor, [])

    def _withdraw(self, tx: Tx, ev: Inbound, source: GroupRef, actor: CanonicalId, now: float) -> Outcome:
        """Consent withdrawn: nothing of the person crosses a link any more, and
        every copy of their messages on other platforms is deleted."""
        tx.set_consent(actor, "withdrawn", now)
        self.withdrawn.add(actor)
        out = Outcome("accepted")
        deletion = MessageDeletion(id="", reason="the author withdrew their consent to share it")
        for message in tx.messages_by(actor):
            done: set[tuple[str, str]] = set()
            for platform, grp, native, how in tx.copies(message, MESSAGE):  # best id first per group
                if how == ids.ORIGIN or (platform, grp) in done or platform not in self.capabilities:
                    done.add((platform, grp))
                    continue
                done.add((platform, grp))
                pend = message if how == ids.SENT else None  # the site may name its own id first
                body = encode_payload(replace(deletion, id=native))
                event_id = EventId(ids.new_id("cge_"))
                target = GroupRef(platform, grp)  # type: ignore[arg-type]
                seq = tx.enqueue(target, event_id, "civic.message.deleted", ev.platform, now, pend, body)
                out.items.append(OutboxItem(seq, target, event_id, "civic.message.deleted", ev.platform, now,
                                            pend, body))
        return out

    # -- shared steps ------------------------------------------------------------------
    def _fan_out(self, tx: Tx, ev: Inbound, routes: list[Route], build: Callable[[Tx, Route, list[str]], Any],
                 now: float, acting: CanonicalId | None, degraded: list[str]) -> Outcome:
        out = Outcome("accepted", degraded=degraded)
        skipped: list[str] = []
        for route in routes:
            if acting is not None and route.link.moderation == "mirror" and (route.link.link_name, acting) in self.bans:
                skipped.append("banned")
                continue
            pending: list[str] = []
            try:
                payload = build(tx, route, pending)
            except _Skip as skip:
                skipped.append(str(skip))
                continue
            etype = ev.type if not isinstance(payload, Report) or ev.type == "civic.report.filed" else "civic.report.filed"
            event_id = EventId(ids.new_id("cge_"))
            body = encode_payload(payload)
            if etype in FINGERPRINTED:
                fingerprint = _fingerprint(route.target.platform, route.target.group, etype, body)
                self._remember_sent(fingerprint, now)
                tx.remember_sent(fingerprint, now)  # for the other nodes, and after a restart
            pend = " ".join(pending) or None
            seq = tx.enqueue(route.target, event_id, etype, ev.platform, now, pend, body, ev.time)
            out.items.append(OutboxItem(seq, route.target, event_id, etype, ev.platform, now, pend, body, ev.time))
        if not out.items and skipped:
            return Outcome("dropped", skipped[0], degraded=degraded)
        degraded.extend(skipped)
        return out

    def _remember_sent(self, key: bytes, now: float) -> None:
        # Two generations: what was sent in this half-window and in the one before.
        if len(self._sent_now) >= ECHO_MEMORY // 2 or now - self._sent_since > ECHO_WINDOW / 2:
            self._sent_before, self._sent_now, self._sent_since = self._sent_now, set(), now
        self._sent_now.add(key)

    def _is_echo(self, tx: Tx, ev: Inbound, now: float) -> bool:
        key = _fingerprint(ev.platform, ev.group, ev.type, encode_payload(ev.payload))
        if key in self._sent_now or key in self._sent_before:
            return True
        return tx.sent_since(key, now - ECHO_WINDOW)  # sent by another node, or before a restart

    def _moderate(self, tx: Tx, ev: Inbound, source: GroupRef, action: str, subject: str,
                  member_c: CanonicalId | None, member: Actor | None, by: Actor | None, reason: str | None,
                  category: str | None, now: float) -> None:
        """Write the public log entry (``gateway.transparency``: people only as
        their identity level allows) and update the bans of every link of the group."""
        for link in self.router.links_of(source):
            tx.log_moderation(transparency.entry(
                time=now, link=link.link_name, source=source, action=action, event_id=ev.event_id,
                subject=subject, member=member, moderator=by, reason=reason, category=category))
            if link.moderation == "mirror" and member_c is not None and action in ("ban", "banned", "unban", "unbanned"):
                banned = action in ("ban", "banned")
                tx.set_ban(link.link_name, member_c, banned, now)
                key = (link.link_name, member_c)
                if banned:
                    self.bans.add(key)
                else:
                    self.bans.discard(key)

    def _actor_ref(self, tx: Tx, source: GroupRef, actor: Actor) -> tuple[CanonicalId, Actor]:
        c, _how, actor = self.people.resolve(tx, source, actor)
        return c, actor

    @staticmethod
    def _message_from(tx: Tx, source: GroupRef, native: str | None, degraded: list[str], reason: str) -> CanonicalId | None:
        if native is None:
            return None
        hit = tx.lookup(source.platform, source.group, MESSAGE, native)
        if hit is None:
            if reason:
                degraded.append(reason)
            return None
        return hit[0]

    @staticmethod
    def _message_to(tx: Tx, c: CanonicalId | None, target: GroupRef, pending: list[str], *,
                    optional: bool = False, degraded: list[str] | None = None) -> Any:
        """The target's id for a message. Required references that the target
        never saw skip the target; optional ones (reply, thread) are dropped."""
        if c is None:
            return None
        hit = tx.native_for(c, target.platform, target.group, MESSAGE)
        if hit is None:
            if optional:
                if degraded is not None:
                    degraded.append("reference_not_on_target")
                return None
            raise _Skip("not_on_target")
        if hit[1] == ids.SENT:
            pending.append(c)  # the target may name its own id before this is delivered
        return hit[0]


def _fingerprint(platform: str, group: str, etype: str, body: bytes) -> bytes:
    """The same on every node and in every process (unlike ``hash``)."""
    return hashlib.blake2b(b"\0".join((platform.encode(), group.encode(), etype.encode(), body)),
                           digest_size=16).digest()


def _as_shown(given: Actor | None, resolved: Actor | None) -> Actor | None:
    """The person as the event gives them, at the level they may be shown at
    (``People.resolve`` makes an anonymous stand-in anonymous, whatever the event claims)."""
    if given is None or resolved is None or resolved.identity == given.identity:
        return given
    return replace(given, identity=resolved.identity)


def _acting_actor(p: Any) -> Actor | None:
    """The person who did what the event reports (loop guard and bans look at them)."""
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


def _degrade(m: Message, caps: Capabilities | None, degraded: list[str]) -> Message:
    """Fit a message to what the target can express, keeping its meaning."""
    if caps is None:
        return m
    if m.warning and caps.content_warning == "first_line":
        degraded.append("warning_first_line")
        m = replace(m, text=f"CW: {m.warning}\n\n{m.text}",
                    html=f"<p><strong>CW: {_escape(m.warning)}</strong></p>{m.html}" if m.html else None)
    if m.html is not None and not caps.html:
        degraded.append("html_dropped")
        m = replace(m, html=None)
    if m.thread is not None and not caps.threads:
        degraded.append("thread_dropped")
        m = replace(m, thread=None, reply_to=m.reply_to or m.thread)
    return m


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["Pipeline", "Outcome"]
