"""The policy chain: whether an event goes on, as small stages, cheapest first.

Each stage is a callable ``stage(ctx, state) -> Decision``: it reads the event
context (``EventContext``: the event, its source group and routes, the open
transaction) and the immutable ``PolicyState``, and says continue or drop (with
the reason counted in ``civic_dropped_total``). A stage never changes the
state; what an event changes is an effect the pipeline's handlers return.
``run`` applies ``CHAIN`` in order and stops at the first drop:

  dedupe      the platform sent this event id before (a retry);
  unlinked    no link names the source group;
  echo        the event is one the gateway just sent to that group, coming back;
  ban_rules   the acting person falls under a ban rule an adapter imported;
  identify    the id map resolves the event's references (``IdMap.inbound``);
              an acting person who is a gateway stand-in there means an echo;
  consent     the acting person withdrew their consent;
  link_bans   the acting person is banned on some links: not over those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from msgspec import Struct

from gateway import ids
from gateway.adapter import Inbound
from gateway.idmap import IdMap, Refs, acting_actor
from gateway.ids import GroupRef, LinkName
from gateway.policy.state import PolicyState
from gateway.router import Route
from gateway.store.base import Tx
from schemas.v1 import Actor, ProfileUpdate


class Decision(Struct, frozen=True, gc=False):
    status: Literal["continue", "duplicate", "dropped"] = "continue"
    reason: str | None = None
    skip: frozenset[LinkName] = frozenset()
    """Go on, but not over these links."""


CONTINUE = Decision()
DUPLICATE = Decision("duplicate")


def drop(reason: str) -> Decision:
    return Decision("dropped", reason)


class EchoMemory(Protocol):
    def is_echo(self, tx: Tx, ev: Inbound, now: float) -> bool: ...


class EventContext:
    """One inbound event on its way through the chain (made by the pipeline)."""

    __slots__ = ("tx", "ev", "source", "routes", "now", "acting", "refs", "idmap", "echo")

    def __init__(self, tx: Tx, ev: Inbound, source: GroupRef, routes: list[Route], now: float,
                 idmap: IdMap, echo: EchoMemory) -> None:
        self.tx = tx
        self.ev = ev
        self.source = source
        self.routes = routes
        self.now = now
        self.acting: Actor | None = acting_actor(ev.payload)
        """The acting person as the event names them (native id)."""
        self.refs = Refs()
        """The event's references in canonical terms, once ``identify`` ran."""
        self.idmap = idmap
        self.echo = echo


Stage = Callable[[EventContext, PolicyState], Decision]

LINK_BANNED = frozenset({"civic.message.created", "civic.message.edited", "civic.reaction.added",
                         "civic.reaction.removed", "civic.profile.updated", "civic.account.moved"})
"""Event types a person banned on a link cannot send over it (what they do,
not what is done to them or by moderators)."""


def dedupe(ctx: EventContext, state: PolicyState) -> Decision:
    return CONTINUE if ctx.tx.first_seen(ctx.ev.platform, ctx.ev.event_id, ctx.now) else DUPLICATE


def unlinked(ctx: EventContext, state: PolicyState) -> Decision:
    return CONTINUE if ctx.routes else drop("unlinked")


def echo(ctx: EventContext, state: PolicyState) -> Decision:
    return drop("echo") if ctx.echo.is_echo(ctx.tx, ctx.ev, ctx.now) else CONTINUE


def ban_rules(ctx: EventContext, state: PolicyState) -> Decision:
    rules = state.ban_rules
    if rules is not None and ctx.acting is not None and rules.match(ctx.acting.id) is not None:
        return drop("policy_ban")  # before the person is given an id
    return CONTINUE


def identify(ctx: EventContext, state: PolicyState) -> Decision:
    ctx.refs = ctx.idmap.inbound(ctx.tx, ctx.source, ctx.ev.type, ctx.ev.payload)
    acting = ctx.refs.acting
    return drop("echo") if acting is not None and acting.how != ids.ORIGIN else CONTINUE


def consent(ctx: EventContext, state: PolicyState) -> Decision:
    acting = ctx.refs.acting
    if acting is None or acting.ref not in state.withdrawn:
        return CONTINUE
    p = ctx.ev.payload
    return CONTINUE if isinstance(p, ProfileUpdate) and p.consent == "granted" else drop("no_consent")


def link_bans(ctx: EventContext, state: PolicyState) -> Decision:
    acting = ctx.refs.acting
    if acting is None or not state.bans or ctx.ev.type not in LINK_BANNED:
        return CONTINUE
    skip = frozenset(r.link.link_name for r in ctx.routes
                     if r.link.moderation == "mirror" and (r.link.link_name, acting.ref) in state.bans)
    return Decision(skip=skip) if skip else CONTINUE


CHAIN: tuple[Stage, ...] = (dedupe, unlinked, echo, ban_rules, identify, consent, link_bans)


def run(chain: Sequence[Stage], ctx: EventContext, state: PolicyState) -> Decision:
    """The first drop of ``chain``, or continue (with every link a stage skipped)."""
    skip: frozenset[LinkName] = frozenset()
    for stage in chain:
        d = stage(ctx, state)
        if d.status != "continue":
            return d
        if d.skip:
            skip |= d.skip
    return Decision(skip=skip) if skip else CONTINUE


__all__ = ["CHAIN", "Decision", "EventContext", "Stage", "run", "dedupe", "unlinked", "echo", "ban_rules",
           "identify", "consent", "link_bans", "CONTINUE", "drop"]
