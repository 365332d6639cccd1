"""Fediverse -> gateway: the inbox (``POST /ap/inbox``, ``/ap/actor/inbox``,
``/ap/groups/{name}/inbox``, ``/ap/people/{id}/inbox``).

In this order, before anything is stored or sent (each refusal is ``4xx``
with the reason, counted in ``civic_activitypub_refused_total{reason}``):
from the headers alone, before any of the body is read, a signature present
(draft-cavage or RFC 9421), its ``Date`` / ``created`` in the window, the
declared size, the key fetched from its owner's actor document; then the
whole body through the gateway's shared reader (the kit's ``BodyReader``:
413 too large, 408 too slow, 503 with ``Retry-After`` when too many bodies
arrive at once) and its JSON depth; the signature (and ``Digest`` /
``Content-Digest`` over the raw body) verified; the same signature not seen
before (a replay); the key's owner is the activity's ``actor``; the
activity's id, and a created or updated object's id and author, on the
actor's host. Then the activity is routed to the hosted (or joined remote)
groups it concerns, decoded (``decode``, pure) and stored (the core
deduplicates by activity id), and the answer is ``202``.

What an inbound activity makes the gateway send (the ``Accept`` of a
``Follow``, a hosted group's ``Announce`` of what it relayed) is the
adapter's: ``Inbox`` calls the ``follow`` and ``announce`` it is given.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Set
from typing import Any
from urllib.parse import urlsplit

import msgspec
import orjson
from aiohttp import web

from adapters.activitypub import decode as dec
from adapters.activitypub import encode as enc
from adapters.activitypub import signatures as sig
from adapters.activitypub.config import ActivityPubConfig
from adapters.activitypub.remote import Remote, RemoteError, parse_json
from gateway.kit import AdapterContext, BodyError, Inbound, Overloaded
from schemas.v1 import Actor

log = logging.getLogger("civic.activitypub")

SEEN_SIGNATURES = 100_000
BODY_REASONS = {408: "body_timeout", 413: "too_large", 503: "busy"}
"""The refusal reason (metrics label) of each ``BodyError`` status."""

Follow = Callable[..., Awaitable[None]]
"""``follow(name, actor, follow_activity, *, accept)``: record (or not) the
follower of hosted group ``name`` and answer ``Accept`` or ``Reject``."""
Announce = Callable[..., Awaitable[None]]
"""``announce(name, activity, *, exclude)``: hosted group ``name`` shares
``activity`` with its followers but ``exclude`` (FEP-1b12)."""


def host(url: str) -> str:
    """The host (and port) of ``url``, lower case; ``""`` when it has none or does not parse."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return ""


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers


class Inbox:
    """The inbox of one ActivityPub platform: checks, routes, decodes and
    stores what the fediverse sends. ``hosted`` are the names of the groups
    the gateway hosts, ``remote_groups`` the URLs of the remote groups it
    joined; ``follow`` and ``announce`` send what an activity calls for."""

    def __init__(self, ctx: AdapterContext, config: ActivityPubConfig, urls: enc.Urls, remote: Remote, *,
                 hosted: Set[str], remote_groups: Set[str], follow: Follow, announce: Announce) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.config = config
        self.urls = urls
        self.remote = remote
        self.hosted = hosted
        self.remote_groups = remote_groups
        self._follow = follow
        self._announce = announce
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self.refused: dict[str, int] = {}
        """Requests refused, by reason (for metrics)."""
        self.received = 0
        """Requests that passed every check."""

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/ap/inbox", self.handle),
            web.post("/ap/actor/inbox", self.handle),
            web.post("/ap/groups/{name}/inbox", self.handle),
            web.post("/ap/people/{id}/inbox", self.handle),
        ]

    async def handle(self, request: web.Request) -> web.Response:
        try:
            activity, actor, signature = await self._verified(request)
        except Refused as exc:
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            log.info("refused an activity at %s: %s", request.path, exc)
            return web.json_response({"error": str(exc), "reason": exc.reason}, status=exc.status,
                                     headers=exc.headers)
        self.received += 1
        try:
            await self._take(activity, actor)
        except Refused as exc:
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            return web.json_response({"error": str(exc), "reason": exc.reason}, status=exc.status)
        except Overloaded as exc:
            return web.json_response({"error": str(exc)}, status=exc.status,
                                     headers={"Retry-After": str(exc.retry_after)})
        except dec.APDecodeError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self._remember_signature(signature)
        return web.json_response({}, status=202)

    async def _verified(self, request: web.Request) -> tuple[dict[str, Any], str, bytes]:
        """The activity and its actor, once every check passed (``Refused`` otherwise).

        What the headers alone can tell comes first, before any of the body is
        read (a stalled body from anyone must not hold memory): a signature
        present, its time in the window, the declared size, the key fetched
        from its owner. Then the whole body, through the gateway's shared
        reader (bounded in size, time and memory), and the rest."""
        headers = {k: v for k, v in request.headers.items()}
        try:
            key_id = sig.key_id_of(headers)
            if key_id is not None:
                sig.check_fresh(headers, time.time(), self.config.signature_window)
        except sig.SignatureError as exc:
            raise Refused(401, "bad_signature" if exc.reason == "malformed" else exc.reason,
                          f"signature refused: {exc}") from None
        if key_id is None:
            raise Refused(401, "unsigned", "the request carries no HTTP signature")
        if request.content_length is not None and request.content_length > self.config.max_body:
            raise Refused(413, "too_large", f"body larger than {self.config.max_body} bytes")
        if host(key_id) == host(self.urls.base):
            # Only the gateway holds its key: it never sends itself an activity.
            raise Refused(401, "own_key", "signed with a key of the gateway's own actors")
        try:
            owner, public_key = await self.remote.key(key_id)
        except RemoteError as exc:
            raise Refused(401, "no_key", f"the signing key could not be had: {exc}") from None
        try:
            body = await self.ctx.read_body(request, self.config.max_body)
        except BodyError as exc:
            raise Refused(exc.status, BODY_REASONS[exc.status], str(exc), headers=exc.headers) from None
        try:
            activity = parse_json(body, self.config.max_depth)
        except RemoteError as exc:
            raise Refused(400, "bad_json", str(exc)) from None
        if not isinstance(activity, dict) or not isinstance(dec.id_of(activity.get("actor")), str) \
                or not isinstance(activity.get("id"), str):
            raise Refused(400, "bad_activity", "an activity needs an id and an actor")
        problem = dec.id_problem(activity)
        if problem is not None:
            raise Refused(400, "bad_id", f"an id that is not a well-formed http(s) URL: {problem}")
        now = time.time()
        url = f"{self.urls.base}{request.path_qs}"
        try:
            if "signature-input" in {k.lower() for k in headers}:
                verified = sig.verify_rfc9421(request.method, url, headers, body, public_key, now,
                                              self.config.signature_window)
                signature = verified.signature
            else:
                verified_c = sig.verify_cavage(request.method, request.path_qs, headers, body, public_key, now,
                                               self.config.signature_window)
                signature = verified_c.signature
        except sig.SignatureError as exc:
            raise Refused(401, exc.reason, f"signature refused: {exc}") from None
        digest = hashlib.sha256(signature).digest()
        if digest in self._seen:
            raise Refused(401, "replayed", "this signed request was already received")
        actor = dec.id_of(activity.get("actor"))
        assert actor is not None
        if owner != actor:
            raise Refused(401, "signer_not_actor", f"signed by {owner}, but the actor is {actor}")
        self._check_origin(activity, actor)
        return activity, actor, digest

    def _remember_signature(self, digest: bytes) -> None:
        """Only once the request was taken: a sender that retries the very same
        signed request after a 503 is not mistaken for a replay."""
        now = time.time()
        self._seen[digest] = now
        while len(self._seen) > SEEN_SIGNATURES or (self._seen and next(iter(self._seen.values())) <
                                                   now - 2 * self.config.signature_window):
            self._seen.popitem(last=False)

    @staticmethod
    def _check_origin(activity: Mapping[str, Any], actor: str) -> None:
        """Ids on the actor's host (Bridgy Fed GHSA-37r7-jqmr-3472): an actor
        cannot speak for objects of another server."""
        if host(activity["id"]) != host(actor):
            raise Refused(403, "foreign_id", f"activity id {activity['id']} is not on the actor's host")
        obj = activity.get("object")
        if dec.type_of(activity) in ("Create", "Update") and isinstance(obj, Mapping):
            oid = dec.id_of(obj)
            author = dec.id_of(obj.get("attributedTo")) or actor
            if oid is None or host(oid) != host(actor) or author != actor:
                raise Refused(403, "foreign_object", "a created or updated object must be the actor's own")

    async def _take(self, activity: dict[str, Any], actor: str) -> None:
        kind = dec.type_of(activity)
        if kind in ("Accept", "Reject") and actor in self.remote_groups:
            state = "accepted" if kind == "Accept" else "rejected"
            raw = await self.ctx.state.get_one(f"joined:{actor}")
            rec = orjson.loads(raw) if raw else {}
            follow = dec.id_of(activity.get("object"))
            if follow == rec.get("follow"):
                await self.ctx.state.put({f"joined:{actor}": orjson.dumps({**rec, "state": state})})
                (log.info if state == "accepted" else log.warning)("the remote group %s %s the gateway", actor,
                                                                  state)
            return
        if kind == "Announce" and actor in self.remote_groups:
            inner, inner_actor = await self._from_remote_group(actor, activity)
            if self.urls.owns(inner_actor):
                return  # the group sharing what the gateway posted: an echo
            await self._take_in(inner, inner_actor, [actor], dec.type_of(inner))
            return
        await self._route(activity, actor, kind)

    async def _route(self, activity: dict[str, Any], actor: str, kind: str | None) -> None:
        obj = activity.get("object")
        obj_id = dec.id_of(obj)
        groups: list[str] = []
        extra: dict[str, Any] = {}
        if kind == "Follow" or (kind == "Undo" and dec.type_of(obj) == "Follow"):
            target = dec.id_of(obj.get("object")) if kind == "Undo" and isinstance(obj, Mapping) else obj_id
            name = self.hosted_name(target)
            if name is None:
                return
            groups = [name]
            if kind == "Undo":
                await self.ctx.state.put({f"follower:{name}:{actor}": None})
        elif kind in ("Create", "Update"):
            groups = [n for n in (self.hosted_name(i) for i in dec.audience(activity, obj if isinstance(
                obj, Mapping) else None)) if n]
        elif kind == "Flag":
            groups = await self._flag_groups(activity)
        elif kind in ("Like", "EmojiReact", "Delete", "Remove", "Undo"):
            refs = [obj_id]
            if kind == "Undo":
                inner = obj if isinstance(obj, Mapping) else None
                if inner is None and obj_id:
                    raw = await self.ctx.state.get_one(f"react:{obj_id}")
                    inner = orjson.loads(raw) if raw else None
                extra["undone"] = inner
                refs = [dec.id_of(inner.get("object"))] if inner else []
            for ref in refs:
                if ref is None:
                    continue
                rec = await self.note_record(ref)
                if rec is not None:
                    groups = [rec["group"]]
                    if kind in ("Delete", "Remove"):
                        extra["author_of"] = rec.get("author")
                    break
        elif kind == "Move":
            groups = [g for g in self.hosted if await self.ctx.state.get_one(f"follower:{g}:{actor}")]
            target = dec.id_of(activity.get("target"))
            if target and host(target) == host(self.urls.base):
                raise Refused(403, "own_actor", "a Move into one of the gateway's own actors")
            if target:
                try:
                    new = await self.remote.actor(target)
                    extra["moved_to_alias"] = actor in [dec.id_of(a) for a in dec.as_list(new.get("alsoKnownAs"))]
                except RemoteError as exc:
                    log.info("Move to %s: %s", target, exc)
                    extra["moved_to_alias"] = False
        if not groups:
            log.info("%s %s concerns no hosted group; ignored", kind, activity.get("id"))
            return
        await self._take_in(activity, actor, groups, kind, **extra)

    async def _flag_groups(self, flag: Mapping[str, Any]) -> list[str]:
        """The groups whose moderators a report concerns: the group of a reported
        post; else a hosted group the Flag names (reported itself) or is
        addressed to (Lemmy, FEP-1b12); else the groups a reported person of
        the gateway's was shown in (Mastodon sends the Flag to their inbox)."""
        refs = [r for r in (dec.id_of(o) for o in dec.as_list(flag.get("object"))) if r]
        for ref in refs:
            rec = await self.note_record(ref)
            if rec is not None:
                return [rec["group"]]
        named = [n for n in (self.hosted_name(r) for r in [*refs, *sorted(dec.audience(flag))]) if n]
        if named:
            return list(dict.fromkeys(named))
        linked = self.hosted | self.remote_groups
        for ref in refs:
            person = await self.own_person(ref)
            if person is not None:
                return [g for g in person[1] if g in linked]
        return []

    async def _take_in(self, activity: dict[str, Any], actor: str, groups: list[str], kind: str | None,
                       **extra: Any) -> None:
        obj_id = dec.id_of(activity.get("object"))
        if kind in ("Delete", "Remove") and "author_of" not in extra and obj_id:
            rec = await self.note_record(obj_id)
            if rec is not None:
                extra["author_of"] = rec.get("author")
        if kind == "Undo" and not isinstance(activity.get("object"), Mapping) and obj_id:
            raw = await self.ctx.state.get_one(f"react:{obj_id}")
            extra["undone"] = orjson.loads(raw) if raw else None
        decoded = dec.decode_activity(activity, platform=self.name, require_public=groups[0] in self.hosted
                                      or not groups[0].startswith("http"), **extra)
        if isinstance(decoded, dec.Ignored):
            log.info("%s %s not carried: %s", kind, activity.get("id"), decoded.reason)
            return
        items = []
        for it in decoded.items:
            payload = await self._own_actors(it.payload)
            if payload is None:
                log.info("%s %s not carried: it names one of the gateway's own actors as a person", kind,
                         activity.get("id"))
                continue
            items.append(msgspec.structs.replace(it, payload=await self._with_names(payload)))
        if not items:
            return
        inbound = [Inbound(platform=self.name, group=g, event_id=it.event_id if len(groups) == 1 else
                           f"{it.event_id}|{g}", type=it.type, payload=it.payload, time=time.time())
                   for g in groups for it in items]
        remember: dict[str, bytes | None] = {}
        for it in items:
            if it.type == "civic.message.created":
                remember[f"rnote:{it.payload.id}"] = orjson.dumps({"group": groups[0], "author": actor})
            if kind in ("Like", "EmojiReact"):
                remember[f"react:{activity['id']}"] = orjson.dumps(
                    {"type": kind, "actor": actor, "object": obj_id, "content": activity.get("content")})
        if remember:
            await self.ctx.state.put(remember)
        result = await self.ctx.ingest(inbound)
        if kind == "Follow" and groups[0] in self.hosted:
            outcome = result.outcomes[0] if result.outcomes else "accepted"
            # A person the gateway may not carry (banned, on a ban list, without consent) is refused.
            await self._follow(groups[0], actor, activity, accept=outcome in ("accepted", "duplicate"))
        shared = kind in ("Create", "Update", "Delete", "Like", "EmojiReact") or (
            kind == "Undo" and any(i.type == "civic.reaction.removed" for i in items))
        if shared:  # the group shares what it relayed with its members (FEP-1b12); not follows and the like
            for g, (item, outcome) in zip([g for g in groups for _ in items],
                                          zip(inbound, result.outcomes or ("accepted",) * len(inbound))):
                if outcome == "accepted" and g in self.hosted:
                    await self._announce(g, activity, exclude=actor)

    async def _with_names(self, payload: Any) -> Any:
        """Fediverse people in ``payload`` with their display name (activities
        name only actor ids): from their actor document (cached)."""
        changes = {}
        for field in ("author", "by", "member", "actor"):
            actor = getattr(payload, field, None)
            if isinstance(actor, Actor) and actor.name is None and actor.id.startswith(("https://", "http://")) \
                    and actor.identity != "anonymous" and not self.urls.owns(actor.id):
                try:
                    doc = await self.remote.actor(actor.id)
                except RemoteError:
                    continue
                name = doc.get("name") or doc.get("preferredUsername")
                if isinstance(name, str) and name.strip():
                    changes[field] = Actor(actor.id, name=name.strip()[:256], identity=actor.identity)
        return msgspec.structs.replace(payload, **changes) if changes else payload

    def hosted_name(self, url: str | None) -> str | None:
        own = self.urls.own(url) if url else None
        return own[1] if own is not None and own[0] == "group" and own[1] in self.hosted else None

    async def note_record(self, note_id: str) -> dict[str, Any] | None:
        own = self.urls.own(note_id)
        if own is not None and own[0] == "note":
            raw = await self.ctx.state.get_one(f"note:{own[1]}")
            if raw:
                rec = orjson.loads(raw)
                return {"group": rec["group"], "author": rec["doc"].get("attributedTo")}
            return None
        if self.urls.owns(note_id):
            return None  # a URL of ours that is no note
        raw = await self.ctx.state.get_one(f"rnote:{note_id}")
        return orjson.loads(raw) if raw else None

    async def own_person(self, url: str) -> tuple[Actor, list[str]] | None:
        """The person one of the gateway's own ``Person`` URLs stands for (the
        stand-in id the core gave them, as their identity level allows) and
        the groups they were shown in; ``None`` for any other URL, and for a
        stand-in the gateway never published."""
        own = self.urls.own(url)
        if own is None or own[0] != "person":
            return None
        raw = await self.ctx.state.get_one(f"person:{own[1]}")
        if raw is None:
            return None
        rec = orjson.loads(raw)
        identity = "anonymous" if own[1].startswith("anon_") else rec.get("identity", "pseudonymous")
        return Actor(own[1], identity=identity), list(rec.get("groups", ()))

    async def _own_actors(self, payload: Any) -> Any | None:
        """``payload`` with every URL of the gateway's own actors resolved back to
        what it stands for (``dec.with_actors``): a ``Person`` URL to the person
        of the other platform (so the core finds its own user, not a new stand-in
        for a URL), a group or the instance actor to nobody (they are no person).
        ``None`` when the item then names nobody where it must name someone."""
        found: dict[str, Actor | None] = {}
        for url in dec.actor_ids(payload):
            if host(url) == host(self.urls.base):  # any URL of ours: never a new person
                person = await self.own_person(url)
                found[url] = person[0] if person else None
        return dec.with_actors(payload, found, self.name) if found else payload

    async def _from_remote_group(self, group_url: str, announce: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """The activity a joined group announces, checked: its id on its actor's
        host; a created or updated object fetched again from its origin (the
        embedded copy is only the group's word for it)."""
        inner = announce.get("object")
        if isinstance(inner, str):
            try:
                inner = await self.remote.get(inner)
            except RemoteError as exc:
                raise Refused(403, "unverifiable", f"the announced activity could not be fetched: {exc}") from None
        if not isinstance(inner, dict) or not isinstance(inner.get("id"), str):
            raise Refused(400, "bad_activity", "an Announce of nothing")
        problem = dec.id_problem(inner)
        if problem is not None:
            raise Refused(400, "bad_id", f"the announced activity names an id that is not a well-formed URL: {problem}")
        actor = dec.id_of(inner.get("actor"))
        if actor is None:
            raise Refused(400, "bad_activity", "the announced activity has no actor")
        self._check_origin(inner, actor)
        obj = inner.get("object")
        if dec.type_of(inner) in ("Create", "Update") and isinstance(obj, Mapping):
            try:
                fetched = await self.remote.get(str(dec.id_of(obj)))
            except RemoteError as exc:
                raise Refused(403, "unverifiable", f"the announced object could not be fetched: {exc}") from None
            if dec.id_of(fetched.get("attributedTo")) != actor:
                raise Refused(403, "foreign_object", "the announced object is not its actor's")
            inner = {**inner, "object": fetched}
        return inner, actor
