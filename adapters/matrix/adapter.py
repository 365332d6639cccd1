"""Matrix rooms (any Synapse, PubHubs hubs) as groups, through a Matrix
Application Service (docs/matrix.md). A group is a room id.

The pieces: ``inbound`` takes the homeserver's transactions (checked,
stored before ``200``), ``decode``/``encode`` translate, ``outbound`` sends as
ghosts, ``homeserver`` is the client-server API (HTTP to the homeserver),
``media`` makes attachment links (fetching a site's attachment goes through
the kit's SSRF-guarded ``GuardedSession``). This module joins them and adds
what needs I/O around decoding, handed to ``inbound`` as its ``context``,
``prepare`` and ``on_gap`` callbacks:

* the event a redaction removes is looked up (a reaction the gateway saw is
  remembered in the adapter's state, because a redacted reaction loses its
  content; anything else is fetched from the homeserver), so that a redaction
  by its author is a deletion, by someone else a moderation removal, and a
  reaction's redaction a reaction removed;
* the previous power levels, when the homeserver did not include them;
* attachments leaving Matrix get a signed gateway link (``media``), which this
  adapter serves under ``<appservice path>/media/...``;
* the bot accepts invites, and reads the policy room the operator named: its
  ``m.ban`` user and server rules become the gateway's ban rules;
* at start-up (and while it fails) the homeserver is pinged, which also makes
  it send at once what it held back while the gateway was away.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import msgspec
import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from adapters.matrix import media
from adapters.matrix.config import MatrixConfig
from adapters.matrix.decode import MatrixDecodeError, PolicyRule, decode_policy_rule, is_ghost
from adapters.matrix.encode import stand_in_of
from adapters.matrix.homeserver import MatrixClient, MatrixError, PingError, ping_homeserver
from adapters.matrix.inbound import AppserviceInbound
from adapters.matrix.outbound import Outbound
from gateway.kit import (
    Adapter,
    AdapterContext,
    BanRule,
    Capabilities,
    Delivery,
    DeliveryResult,
    GuardedSession,
    Inbound,
    TaskGroup,
    count_degraded,
    register_collector,
)
from schemas.v1 import Actor, Message

log = logging.getLogger("civic.matrix")

BAN_RECOMMENDATIONS = frozenset({"m.ban", "org.matrix.mjolnir.ban"})
POLICY_REFRESH = 60.0
"""Seconds between reads of the policy room's state (rules also apply at once
when the homeserver pushes them to this node)."""
PING_RETRY = (1.0, 2.0, 5.0, 10.0, 30.0)
REACTION_KEY = "reaction:"
REACTION_MEMORY = 30 * 86400.0
"""Seconds a reaction is remembered (so that its redaction can be read): older
reactions, when redacted, arrive as a deletion that matches nothing."""
NAMES_MAX = 100_000


class MatrixAdapter(Adapter):
    kind = "matrix"
    Config = MatrixConfig

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        self.config: MatrixConfig = ctx.config
        self._caps = Capabilities(batch_max=self.config.batch_max)
        self.client = MatrixClient(self.config)
        self.client.on_reach = ctx.set_up  # up while the homeserver answers (calls and pings)
        self.fetcher = GuardedSession(allow_private=self.config.media_fetch_private, timeout=30.0)
        self.media_key = media.media_key(self.config.hs_token)
        self.media_base = self.config.media_url or self.config.appservice_url
        self.outbound = Outbound(self.client, self.config, self.fetcher, self.media_key, self.media_base,
                                 on_degrade=lambda reason: count_degraded(ctx, f"matrix_{reason}"))
        self.inbound = AppserviceInbound(ctx.ingest, self.config, ctx.name, context=self._context,
                                         prepare=self._prepare, on_gap=self._ping_after_gap,
                                         read_body=ctx.read_body)
        self.bot = self.inbound.bot_user
        self._rules: dict[tuple[str, str], PolicyRule] = {}
        self._names: dict[tuple[str, str], str | None] = {}
        self._gap_ping_due = False
        self._tasks = TaskGroup()
        self.last_ping: float | None = None
        self.media_served = 0
        register_collector(ctx, "matrix", _Collector).adapters.add(self)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def routes(self) -> list[web.RouteDef]:
        return [*self.inbound.routes(),
                web.get(self.inbound.prefix + "/media/{server}/{media_id}", self.handle_media)]

    async def start(self) -> None:
        await self.client.start()
        await self.fetcher.start()
        self._tasks.spawn(self._ping_until_answered(), f"matrix-{self.name}-ping")
        self._tasks.spawn(self._prune_now_and_then(), f"matrix-{self.name}-prune")
        if self.config.policy_room:
            self._tasks.spawn(self._policy_loop(), f"matrix-{self.name}-policy")

    async def stop(self) -> None:
        await self._tasks.close()
        await self.fetcher.close()
        await self.client.close()

    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        ids: dict[str, str] = {}
        for d in batch:  # one after another: the room shows them in this order
            ids.update(await self.outbound.deliver(d))
        return DeliveryResult(ids=ids)  # type: ignore[arg-type]

    # -- start-up ---------------------------------------------------------------------------------
    async def _ping_until_answered(self) -> None:
        """Ping the homeserver (which calls our ``/ping`` back): it proves both
        directions work and makes the homeserver retry at once what it holds for
        us. The gateway's HTTP server may start a moment after the adapters, so
        a failure is retried, then logged loudly, and retried now and then."""
        assert self.client.session is not None
        for attempt in range(1_000_000):
            try:
                self.last_ping = await ping_homeserver(self.client.session, self.config)
                log.info("%s: homeserver %s reaches the gateway (ping %.0f ms)", self.name, self.config.homeserver,
                         self.last_ping * 1000)
                self.ctx.set_up(True, "")
                await self._join_linked_rooms()
                return
            except PingError as exc:
                if exc.status == 0 or attempt > 0:  # the first may only race the gateway's own HTTP server
                    self.ctx.set_up(False, str(exc))
                delay = PING_RETRY[min(attempt, len(PING_RETRY) - 1)]
                (log.info if attempt < 2 else log.warning)("%s: %s; trying again in %.0f s", self.name, exc, delay)
                await asyncio.sleep(delay)

    async def _join_linked_rooms(self) -> None:
        """The bot joins the rooms the config links (it can when it was invited,
        or the room is public), and says which it cannot enter."""
        for room in self.ctx.groups:
            try:
                await self.client.join(room)
            except MatrixError as exc:
                log.warning("%s: the bot %s is not in the linked room %s (invite it): %s", self.name, self.bot,
                            room, exc)

    async def _prune_now_and_then(self) -> None:
        while True:
            try:
                n = await self.ctx.state.prune(REACTION_KEY, time.time() - REACTION_MEMORY)
                if n:
                    log.info("%s: forgot %d reactions older than %d days", self.name, n, REACTION_MEMORY // 86400)
            except Exception:  # the store may be busy; next time
                log.exception("%s: pruning remembered reactions failed", self.name)
            await asyncio.sleep(3600)

    async def _policy_loop(self) -> None:
        while True:
            try:
                await self.load_policy()
            except MatrixError as exc:
                log.warning("%s: cannot read policy room %s (invite the bot %s to it): %s", self.name,
                            self.config.policy_room, self.bot, exc)
            await asyncio.sleep(POLICY_REFRESH)

    async def load_policy(self) -> None:
        """Read every rule of the policy room and make them the gateway's ban rules."""
        assert self.config.policy_room is not None
        try:
            await self.client.join(self.config.policy_room)
        except MatrixError as exc:
            log.debug("%s: join of the policy room: %s", self.name, exc)
        rules: dict[tuple[str, str], PolicyRule] = {}
        for event in await self.client.room_state(self.config.policy_room):
            rule = self._policy_rule(event)
            if rule is not None and not rule.removed:
                rules[(rule.kind, rule.state_key)] = rule
        self._rules = rules
        self._publish_rules()

    def _policy_rule(self, event: Mapping[str, Any]) -> PolicyRule | None:
        try:
            return decode_policy_rule(event)
        except MatrixDecodeError as exc:
            log.warning("%s: unreadable policy rule %s: %s", self.name, event.get("event_id"), exc)
            return None

    def _publish_rules(self) -> None:
        rules = [BanRule(kind=r.kind, glob=r.entity_glob, reason=r.reason, source=self.config.policy_room or "")
                 for r in self._rules.values() if r.recommendation in BAN_RECOMMENDATIONS and r.entity_glob]
        self.ctx.set_ban_rules(rules)

    @property
    def policy_rules(self) -> int:
        return len(self._rules)

    # -- around decoding (``inbound``'s callbacks) --------------------------------------------------
    async def _context(self, events: Sequence[Any]) -> Mapping[str, Mapping[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        redactions = [e for e in events if isinstance(e, dict) and e.get("type") == "m.room.redaction"
                      and isinstance(e.get("event_id"), str)]
        if redactions:
            targets = {e["event_id"]: _redacts(e) for e in redactions}
            known = await self.ctx.state.get([REACTION_KEY + t for t in targets.values() if t])
            for e in redactions:
                target = targets[e["event_id"]]
                if not target:
                    continue
                record = known.get(REACTION_KEY + target)
                if record is not None:
                    out[e["event_id"]] = {"redacted": orjson.loads(record)}
                    continue
                try:
                    redacted = await self.client.event(e.get("room_id", ""), target)
                except MatrixError as exc:  # decoded without: a deletion by whoever redacted
                    log.warning("%s: could not look up redacted event %s: %s", self.name, target, exc)
                    continue
                if redacted is not None:
                    out[e["event_id"]] = {"redacted": redacted}
        for e in events:
            if (isinstance(e, dict) and e.get("type") == "m.room.power_levels" and "state_key" in e
                    and not (e.get("unsigned") or {}).get("prev_content")):
                prev_id = (e.get("unsigned") or {}).get("replaces_state")
                if isinstance(prev_id, str):
                    try:
                        prev = await self.client.event(e.get("room_id", ""), prev_id)
                    except MatrixError:
                        prev = None
                    if prev is not None:
                        out.setdefault(e["event_id"], {})["prev_power_levels"] = prev.get("content") or {}
        return out

    async def _prepare(self, events: Sequence[Any], inbound: list[Inbound]) -> list[Inbound]:
        remember: dict[str, bytes | None] = {}
        rules_changed = False
        for e in events:
            if not isinstance(e, dict):
                continue
            etype, room = e.get("type"), e.get("room_id")
            if etype == "m.reaction" and isinstance(e.get("event_id"), str) and not self._ours(e.get("sender")):
                rel = (e.get("content") or {}).get("m.relates_to")
                remember[REACTION_KEY + e["event_id"]] = orjson.dumps(
                    {"type": "m.reaction", "sender": e.get("sender"), "content": {"m.relates_to": rel}})
            elif etype == "m.room.member" and isinstance(e.get("state_key"), str) and e.get("state_key") != self.bot:
                name = (e.get("content") or {}).get("displayname")
                self._remember_name(str(room), e["state_key"], name[:256] if isinstance(name, str) and name.strip()
                                    else None)
            elif etype == "m.room.member" and e.get("state_key") == self.bot \
                    and (e.get("content") or {}).get("membership") == "invite":
                self._tasks.spawn(self._accept_invite(str(room)), f"matrix-{self.name}-join")
            elif room == self.config.policy_room and "state_key" in e:
                rule = self._policy_rule(e)
                if rule is not None:
                    key = (rule.kind, rule.state_key)
                    if rule.removed:
                        self._rules.pop(key, None)
                    else:
                        self._rules[key] = rule
                    rules_changed = True
        if rules_changed:
            self._publish_rules()
        if remember:  # before the 200: a redaction may follow in the next transaction
            await self.ctx.state.put(remember)
        out = []
        linked = set(self.ctx.groups)
        for item in inbound:
            if item.group in linked:  # the core drops the rest ("unlinked"): no need to look anyone up
                item = await self._with_names(item)
            out.append(_public_media(item, self.media_base, self.media_key))
        return out

    # -- display names ------------------------------------------------------------------------------
    async def _with_names(self, item: Inbound) -> Inbound:
        """The people in ``item`` as the core knows them: a ghost becomes the
        stand-in id it stands for (so a kick of a ghost reaches the site as a
        kick of its own member), and a Matrix user gets their display name in
        the room (events name only user ids): from the member events seen, else
        asked of the homeserver once, then remembered."""
        p, changes = item.payload, {}
        for field in ("author", "by", "member"):
            actor = getattr(p, field, None)
            if not isinstance(actor, Actor):
                continue
            stand_in = self._stand_in(actor.id)
            if stand_in is not None:
                changes[field] = Actor(stand_in)
            elif actor.name is None and actor.id.startswith("@"):
                name = await self._display_name(item.group, actor.id)
                if name:
                    changes[field] = Actor(actor.id, name=name, identity=actor.identity)
            elif actor.name and field == "member":
                self._remember_name(item.group, actor.id, actor.name)
        mentions = getattr(p, "mentions", ())
        if any(self._stand_in(m.id) for m in mentions):
            changes["mentions"] = tuple(Actor(s) if (s := self._stand_in(m.id)) else m for m in mentions)
        if not changes:
            return item
        return msgspec.structs.replace(item, payload=msgspec.structs.replace(p, **changes))

    def _stand_in(self, user_id: str) -> str | None:
        return stand_in_of(self.config.ghost_prefix, user_id, self.config.server_name)

    async def _display_name(self, room: str, user: str) -> str | None:
        key = (room, user)
        if key in self._names:
            return self._names[key]
        try:
            member = await self.client.state(room, "m.room.member", user)
        except MatrixError as exc:
            log.info("%s: no display name for %s in %s: %s", self.name, user, room, exc)
            self._remember_name(room, user, None)  # not asked again for every message; a member event updates it
            return None
        name = member.get("displayname") if member else None
        name = name[:256] if isinstance(name, str) and name.strip() else None
        self._remember_name(room, user, name)
        return name

    def _remember_name(self, room: str, user: str, name: str | None) -> None:
        if len(self._names) > NAMES_MAX:
            self._names.clear()
        self._names[(room, user)] = name

    def _ping_after_gap(self) -> None:
        if not self._gap_ping_due:
            self._gap_ping_due = True
            self._tasks.spawn(self._ping_soon(), f"matrix-{self.name}-gap")

    async def _ping_soon(self) -> None:
        """After refusing a transaction that skipped one: the homeserver is now
        in recovery; a ping makes it send the older transaction at once instead
        of after its back-off."""
        await asyncio.sleep(0.1)
        self._gap_ping_due = False
        assert self.client.session is not None
        try:
            await ping_homeserver(self.client.session, self.config)
        except PingError as exc:
            log.info("%s: ping after a transaction gap: %s", self.name, exc)

    def _ours(self, sender: Any) -> bool:
        return sender == self.bot or (isinstance(sender, str) and is_ghost(
            sender, ghost_prefix=self.config.ghost_prefix, server_name=self.config.server_name))

    async def _accept_invite(self, room: str) -> None:
        """Join a linked room or the policy room; decline any other invite (a
        bot that joined every room it is invited to would be a way to flood the
        gateway)."""
        if room not in self.ctx.groups and room != self.config.policy_room:
            log.info("%s: declined the invite to %s: no link names that room", self.name, room)
            try:
                await self.client.leave(room, self.bot)
            except MatrixError as exc:
                log.info("%s: declining the invite to %s: %s", self.name, room, exc)
            return
        try:
            await self.client.join(room)
            log.info("%s: the bot joined %s", self.name, room)
        except MatrixError as exc:
            log.warning("%s: could not accept the invite to %s: %s", self.name, room, exc)
            return
        if room == self.config.policy_room:
            await self.load_policy()

    # -- media links ------------------------------------------------------------------------------
    async def handle_media(self, request: web.Request) -> web.StreamResponse:
        server, media_id = request.match_info["server"], request.match_info["media_id"]
        if not media.verify(self.media_key, server, media_id, request.query.get("sig", "")):
            return web.json_response({"error": "not a media link this gateway made"}, status=403)
        try:
            data, content_type, name = await self.client.download(server, media_id,
                                                                  max_bytes=self.config.media_max_bytes)
        except MatrixError as exc:
            status = exc.status if exc.status in (404, 413) else 502
            return web.json_response({"error": str(exc)}, status=status)
        self.media_served += 1
        headers = {"Cache-Control": "public, max-age=86400, immutable", "X-Content-Type-Options": "nosniff",
                   "Content-Security-Policy": "sandbox"}
        if name:
            headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(name, safe='')}"
        return web.Response(body=data, content_type=content_type, headers=headers)


def _redacts(event: Mapping[str, Any]) -> str | None:
    content = event.get("content") or {}
    target = content.get("redacts", event.get("redacts")) if isinstance(content, Mapping) else event.get("redacts")
    return target if isinstance(target, str) and target else None


def _public_media(item: Inbound, base: str, key: bytes) -> Inbound:
    p = item.payload
    if not isinstance(p, Message) or not p.attachments:
        return item
    atts = tuple(media.outgoing(a, base, key) for a in p.attachments)
    return msgspec.structs.replace(item, payload=msgspec.structs.replace(p, attachments=atts))


# -- metrics ------------------------------------------------------------------------------------------
class _Collector:
    """The Matrix adapters' counters, read when Prometheus scrapes (one collector per registry)."""

    def __init__(self) -> None:
        self.adapters: weakref.WeakSet[MatrixAdapter] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        txns = CounterMetricFamily("civic_matrix_transactions", "Appservice transactions stored.", labels=["platform"])
        gaps = CounterMetricFamily("civic_matrix_transaction_gaps",
                                   "Transactions refused once because an older one had not come.", labels=["platform"])
        replays = CounterMetricFamily("civic_matrix_transaction_replays",
                                      "Transactions the homeserver sent again, answered without storing.",
                                      labels=["platform"])
        ignored = CounterMetricFamily("civic_matrix_ignored_events", "Matrix events not carried, by reason.",
                                      labels=["platform", "reason"])
        errors = CounterMetricFamily("civic_matrix_decode_errors", "Malformed Matrix events skipped.",
                                     labels=["platform"])
        refused = CounterMetricFamily("civic_matrix_events_refused",
                                      "Malformed Matrix events skipped (the rest of their transaction is taken), "
                                      "by reason.", labels=["platform", "reason"])
        calls = CounterMetricFamily("civic_matrix_api_calls", "Calls to the homeserver.", labels=["platform"])
        failures = CounterMetricFamily("civic_matrix_api_failures", "Calls to the homeserver that failed.",
                                       labels=["platform"])
        ghosts = CounterMetricFamily("civic_matrix_ghost_registrations", "Ghost users registered.",
                                     labels=["platform"])
        ping = GaugeMetricFamily("civic_matrix_ping_seconds", "Last appservice ping round trip.", labels=["platform"])
        rules = GaugeMetricFamily("civic_matrix_policy_rules", "Rules read from the policy room.",
                                  labels=["platform"])
        for a in list(self.adapters):
            n = [a.name]
            txns.add_metric(n, a.inbound.transactions)
            replays.add_metric(n, a.inbound.replays)
            gaps.add_metric(n, a.inbound.gaps)
            errors.add_metric(n, a.inbound.decode_errors)
            for reason, count in sorted(a.inbound.refused.items()):
                refused.add_metric([a.name, reason], count)
            for reason, count in sorted(a.inbound.ignored.items()):
                ignored.add_metric([a.name, reason], count)
            calls.add_metric(n, a.client.calls)
            failures.add_metric(n, a.client.failures)
            ghosts.add_metric(n, a.outbound.ghosts.registrations)
            if a.last_ping is not None:
                ping.add_metric(n, a.last_ping)
            rules.add_metric(n, a.policy_rules)
        yield from (txns, replays, gaps, ignored, errors, refused, calls, failures, ghosts, ping, rules)
