"""The fan-out: one event, in each target's terms, appended to each target's outbox.

Runs inside the event's transaction (``Handlers`` call it). For each route it
asks the id map once for the event's references in the target's terms
(``IdMap.outbound``), lets the handler build the target's payload from them,
and enqueues it: the body encoded for the store, the payload object kept on
the ``OutboxItem`` so that delivery in this process never decodes what was
just encoded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec
from msgspec import Struct

from gateway import ids
from gateway.adapter import Inbound
from gateway.idmap import IdMap, MessageRef, Outward, Refs, encode_pending
from gateway.ids import EventId, GroupRef, LinkName
from gateway.pipeline.echo import FINGERPRINTED, Echoes
from gateway.policy.state import Effect
from gateway.router import Route
from gateway.store.base import OutboxItem, Tx, encode_payload
from schemas.v1 import Report


class Outcome(Struct):
    status: Literal["accepted", "duplicate", "dropped"]
    reason: str | None = None
    items: list[OutboxItem] = msgspec.field(default_factory=list)
    degraded: list[str] = msgspec.field(default_factory=list)
    effects: list[Effect] = msgspec.field(default_factory=list)
    """What the event changes in the policy state, applied once its transaction committed."""


class Skip(Exception):
    """This target cannot take the event (e.g. its link has reactions off); the reason is counted."""


Build = Callable[[Route, Outward], Any]
Gate = Callable[[Route], "str | None"]


def enqueue(tx: Tx, target: GroupRef, etype: str, ev: Inbound, now: float, payload: Any,
            pending: tuple[MessageRef, ...], occurred: float | None = None, echoes: Echoes | None = None) -> OutboxItem:
    """Append ``payload`` to ``target``'s outbox; the item for delivery in this process."""
    event_id = EventId(ids.new_id("cge_"))
    body = encode_payload(payload)
    if echoes is not None and etype in FINGERPRINTED:
        echoes.remember(tx, target.platform, target.group, etype, body, now)
    pend = encode_pending(pending)
    seq = tx.enqueue(target, event_id, etype, ev.platform, now, pend, body, occurred)
    return OutboxItem(seq, target, event_id, etype, ev.platform, now, pend, body, occurred, payload)


def fan_out(tx: Tx, idmap: IdMap, echoes: Echoes, ev: Inbound, routes: Sequence[Route], refs: Refs, now: float,
            build: Build, *, skip: frozenset[LinkName] = frozenset(), gate: Gate | None = None,
            degraded: list[str] | None = None, effects: Sequence[Effect] = ()) -> Outcome:
    """Send the event over every route but those through ``skip`` links (the
    policy chain's link bans) and those ``gate`` refuses (returning why)."""
    degraded = [] if degraded is None else degraded
    out = Outcome("accepted", degraded=degraded, effects=list(effects))
    skipped: list[str] = []
    for route in routes:
        if route.link.link_name in skip:
            skipped.append("banned")
            continue
        if gate is not None and (why := gate(route)) is not None:
            skipped.append(why)
            continue
        o = idmap.outbound(tx, refs, route.target)
        if o.missing:
            skipped.append("not_on_target")
            continue
        degraded.extend(["reference_not_on_target"] * o.dropped)
        try:
            payload = build(route, o)
        except Skip as why_not:
            skipped.append(str(why_not))
            continue
        etype = ev.type if not isinstance(payload, Report) or ev.type == "civic.report.filed" else "civic.report.filed"
        out.items.append(enqueue(tx, route.target, etype, ev, now, payload, o.pending, ev.time, echoes))
    if not out.items and skipped:
        return Outcome("dropped", skipped[0], degraded=degraded, effects=out.effects)
    degraded.extend(skipped)
    return out


__all__ = ["Outcome", "Skip", "fan_out", "enqueue"]
