"""What each event type does once the policy chain let it through.

One method per event type (``Handlers.handle`` picks it by ``EVENT_TYPES``),
each inside the event's transaction: the event's own bookkeeping (a new
message's id, memberships, the moderation log, consent, an account move) and
a ``build`` that makes each target's payload from the event's references in
that target's terms (``gateway.idmap``), handed to ``fan_out``. What an event
changes in the policy state is returned as effects, never applied here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from msgspec.structs import replace

from gateway import ids, transparency
from gateway.adapter import Capabilities
from gateway.idmap import IdMap, Outward, Person
from gateway.ids import LinkName, PlatformName
from gateway.pipeline.echo import Echoes
from gateway.pipeline.fanout import Outcome, Skip, enqueue, fan_out
from gateway.policy.chain import EventContext
from gateway.policy.state import Ban, Consent, Effect, PolicyState
from gateway.router import Route, Router
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

Handler = Callable[[EventContext, PolicyState, frozenset[LinkName]], Outcome]


class Handlers:
    def __init__(self, router: Router, capabilities: Mapping[PlatformName, Capabilities], idmap: IdMap,
                 echoes: Echoes) -> None:
        self.router = router
        self.capabilities = capabilities
        self.idmap = idmap
        self.echoes = echoes
        self._by_type: dict[str, Handler] = {
            t: getattr(self, "_in_" + t.removeprefix("civic.").replace(".", "_")) for t in EVENT_TYPES}

    def handle(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        return self._by_type[ctx.ev.type](ctx, state, skip)

    def _fan_out(self, ctx: EventContext, build: Callable[[Route, Outward], Any], **kw: Any) -> Outcome:
        return fan_out(ctx.tx, self.idmap, self.echoes, ctx.ev, ctx.routes, ctx.refs, ctx.now, build, **kw)

    # -- messages -----------------------------------------------------------------------
    def _in_message_created(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        if not self.idmap.new_message(ctx.tx, ctx.source, ctx.ev.payload.id, ctx.refs):
            return Outcome("dropped", "echo")  # the gateway knows this id: it made the message there
        return self._message_out(ctx, state, skip)

    def _in_message_edited(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        if ctx.refs.message is None:
            return Outcome("dropped", "unknown_message")
        return self._message_out(ctx, state, skip)

    def _message_out(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        """Fan a created or edited message out, each copy in its target's terms."""
        p: Message = ctx.ev.payload
        refs = ctx.refs
        degraded = [u for u in refs.unknown if u != "edit_unknown"]
        if any(m.ref in state.withdrawn for m in refs.mentions):
            refs.mentions = tuple(m for m in refs.mentions if m.ref not in state.withdrawn)
            degraded.append("mention_without_consent")

        def build(route: Route, o: Outward) -> Message:
            return _degrade(replace(p, id=o.message, author=o.acting, reply_to=o.reply_to, thread=o.thread,
                                    mentions=o.mentions), self.capabilities.get(route.target.platform), degraded)

        return self._fan_out(ctx, build, skip=skip, degraded=degraded)

    def _in_message_deleted(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        p: MessageDeletion = ctx.ev.payload
        if ctx.refs.message is None:
            return Outcome("dropped", "unknown_message")
        if ctx.refs.message_how != ids.ORIGIN and ctx.refs.acting is None:
            # A copy the gateway made was deleted without a named moderator:
            # the site is echoing the deletion the gateway asked for.
            return Outcome("dropped", "echo")
        return self._fan_out(ctx, lambda route, o: replace(p, id=o.message, by=o.acting))

    def _reaction(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        p: Reaction = ctx.ev.payload
        if ctx.refs.message is None:
            return Outcome("dropped", "unknown_message")

        def gate(route: Route) -> str | None:
            if not route.link.reactions:
                return "reactions_off"
            caps = self.capabilities.get(route.target.platform)
            return "reaction_unsupported" if caps is not None and not caps.reactions else None

        return self._fan_out(ctx, lambda route, o: replace(p, message=o.message, author=o.acting),
                             skip=skip, gate=gate)

    _in_reaction_added = _reaction
    _in_reaction_removed = _reaction

    # -- moderation ---------------------------------------------------------------------
    def _in_membership_changed(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        p: Membership = ctx.ev.payload
        member, by = ctx.refs.member, ctx.refs.by
        assert member is not None
        ctx.tx.set_membership(ctx.source.platform, ctx.source.group, member.ref, p.state, p.role, ctx.now)
        effects: list[Effect] = []
        if p.state in ("kicked", "banned", "unbanned"):
            effects = self._moderate(ctx, p.state, member.ref, member, _as_shown(p.member, member),
                                     _as_shown(p.by, by), p.reason, None)
        return self._fan_out(ctx, lambda route, o: replace(p, member=o.member, by=o.by), effects=effects)

    def _in_moderation_action(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        p: ModerationAction = ctx.ev.payload
        refs = ctx.refs
        if p.message is not None and refs.message is None:
            return Outcome("dropped", "unknown_message")
        member = refs.member
        subject = refs.message or (member.ref if member else "")
        effects = self._moderate(ctx, p.action, subject, member, _as_shown(p.member, member),
                                 _as_shown(p.by, refs.acting), p.reason, p.category)

        def build(route: Route, o: Outward) -> ModerationAction | Report:
            out = replace(p, message=o.message, member=o.member, by=o.acting)
            if route.link.moderation == "advise":
                return Report(category=p.category or "other", message=out.message, member=out.member,
                              text=f"Advice from the moderators of a linked group: {p.action}"
                                   + (f" ({p.reason})" if p.reason else ""))
            return out

        return self._fan_out(ctx, build, effects=effects)

    def _in_report_filed(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        p: Report = ctx.ev.payload

        def build(route: Route, o: Outward) -> Report:
            if o.message is None and o.member is None and (p.message or p.member):
                raise Skip("report_target_unknown")  # (naming neither, a report is about the group itself)
            return replace(p, message=o.message, member=o.member, reporter=o.acting)

        return self._fan_out(ctx, build)

    def _moderate(self, ctx: EventContext, action: str, subject: str, member: Person | None,
                  shown_member: Actor | None, by: Actor | None, reason: str | None,
                  category: str | None) -> list[Effect]:
        """Write the public log entry (``gateway.transparency``: people only as
        their identity level allows) and the bans of every link of the group;
        the bans that change are returned as effects."""
        effects: list[Effect] = []
        for link in self.router.links_of(ctx.source):
            ctx.tx.log_moderation(transparency.entry(
                time=ctx.now, link=link.link_name, source=ctx.source, action=action, event_id=ctx.ev.event_id,
                subject=subject, member=shown_member, moderator=by, reason=reason, category=category))
            if link.moderation == "mirror" and member is not None and action in ("ban", "banned", "unban", "unbanned"):
                banned = action in ("ban", "banned")
                ctx.tx.set_ban(link.link_name, member.ref, banned, ctx.now)
                effects.append(Ban(link.link_name, member.ref, banned))
        return effects

    # -- people -------------------------------------------------------------------------
    def _in_profile_updated(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        p: ProfileUpdate = ctx.ev.payload
        actor = ctx.refs.acting
        assert actor is not None
        self.idmap.declare_aliases(ctx.tx, ctx.source, p.actor.id, p.also_known_as, ctx.now)
        if p.consent == "withdrawn":
            return self._withdraw(ctx, actor)
        effects: list[Effect] = []
        if p.consent == "granted":
            ctx.tx.set_consent(actor.ref, "granted", ctx.now)
            effects.append(Consent(actor.ref, False))
        if p.actor.identity == "anonymous":
            return Outcome("dropped", "anonymous", effects=effects)  # nothing of them crosses a link
        return self._fan_out(ctx, lambda route, o: ProfileUpdate(actor=o.acting), skip=skip, effects=effects)

    def _in_account_moved(self, ctx: EventContext, state: PolicyState, skip: frozenset[LinkName]) -> Outcome:
        p: AccountMove = ctx.ev.payload
        actor = ctx.refs.acting
        assert actor is not None
        if (PlatformName(p.target.platform) not in self.capabilities
                or not self.idmap.move(ctx.tx, ctx.source, p.actor.id, p.target, actor.ref)):
            return Outcome("dropped", "move_unconfirmed")
        if p.actor.identity == "anonymous":
            return Outcome("accepted")
        return self._fan_out(ctx, lambda route, o: replace(p, actor=o.acting), skip=skip)

    def _withdraw(self, ctx: EventContext, actor: Person) -> Outcome:
        """Consent withdrawn: nothing of the person crosses a link any more, and
        every copy of their messages on other platforms is deleted."""
        ctx.tx.set_consent(actor.ref, "withdrawn", ctx.now)
        out = Outcome("accepted", effects=[Consent(actor.ref, True)])
        deletion = MessageDeletion(id="", reason="the author withdrew their consent to share it")
        for message, copy in self.idmap.copies_by(ctx.tx, actor.ref):
            if copy.group.platform not in self.capabilities:
                continue
            pending = (message,) if copy.how == ids.SENT else ()  # the site may name its own id first
            out.items.append(enqueue(ctx.tx, copy.group, "civic.message.deleted", ctx.ev, ctx.now,
                                     replace(deletion, id=copy.native), pending))
        return out


def _as_shown(given: Actor | None, resolved: Person | None) -> Actor | None:
    """The person as the event gives them, at the level they may be shown at
    (``People.resolve`` makes an anonymous stand-in anonymous, whatever the event claims)."""
    if given is None or resolved is None or resolved.actor.identity == given.identity:
        return given
    return replace(given, identity=resolved.actor.identity)


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


__all__ = ["Handlers"]
