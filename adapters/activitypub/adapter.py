"""The fediverse as groups (docs/activitypub.md): the gateway hosts ActivityPub
``Group`` actors (FEP-1b12) that fediverse people follow to join and address
to post, and shows the people of other platforms as ``Person`` actors.

Pieces: ``signatures`` (HTTP signatures), ``remote`` (fetching documents with
origin checks), ``decode``/``encode`` (pure translation), ``delivery`` (the
per-host follow-up deliveries it hands the gateway's outbox). This module
serves the routes and joins them.

Inbox, in this order, before anything is stored or sent (each refusal is
``4xx`` with the reason, counted in
``civic_activitypub_refused_total{reason}``): from the headers alone, before
any of the body is read, a signature present (draft-cavage or RFC 9421), its
``Date`` / ``created`` in the window, the declared size, the key fetched from
its owner's actor document; then the whole body through the gateway's shared
reader (``gateway.intake``: 413 too large, 408 too slow, 503 with
``Retry-After`` when too many bodies arrive at once) and its JSON depth; the
signature (and ``Digest`` / ``Content-Digest`` over the raw body) verified; the same signature not
seen before (a replay); the key's owner is the activity's ``actor``; the
activity's id, and a created or updated object's id and author, on the
actor's host. Then the activity is decoded and stored (the core deduplicates
by activity id), and the answer is ``202``.

All the gateway's actors share one RSA key, made at first start and kept in
the store: they are all the gateway speaking.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec
import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily

from adapters.activitypub import decode as dec
from adapters.activitypub import encode as enc
from adapters.activitypub import signatures as sig
from adapters.activitypub.config import ActivityPubConfig
from adapters.activitypub import delivery
from adapters.activitypub.remote import Remote, RemoteError, inbox_of, parse_json
from gateway.adapter import (Adapter, AdapterContext, Capabilities, Delivery, DeliveryResult, Followup, Inbound,
                             Overloaded)
from gateway.errors import PermanentDeliveryError, TransientDeliveryError
from gateway.intake import BodyError
from gateway.netguard import FetchError, GuardedSession
from gateway.retry import MASTODON, RetrySchedule
from gateway.metrics import shared_collector
from gateway.tasks import TaskGroup
from schemas.v1 import Actor, Membership, Message, MessageDeletion, ModerationAction, ProfileUpdate, Reaction, Report

log = logging.getLogger("civic.activitypub")

AP_JSON = "application/activity+json"
VERSION = "0.1.0"
KEY = "key:rsa"
SEEN_SIGNATURES = 100_000
WEBFINGER_MAX = 1024
"""Longest WebFinger ``resource`` read (``acct:`` + a name of at most ``enc.NAME_MAX`` + ``@`` + a host)."""
BODY_REASONS = {408: "body_timeout", 413: "too_large", 503: "busy"}
"""The refusal reason (metrics label) of each ``BodyError`` status."""
FOLLOWERS_MAX = 100_000
"""Followers of one hosted group an announcement reaches (a civic group is far smaller)."""


def now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


class PostCounts(msgspec.Struct):
    """POSTs to inboxes, by outcome (``civic_activitypub_deliveries_total``)."""

    delivered: int = 0
    retried: int = 0
    """Failed, to be tried again on the retry schedule."""
    dropped: int = 0
    """Refused for good by the receiving server (unsalvageable 4xx), or refused
    before sending (a private address, too large): dead-lettered."""


class ActivityPubAdapter(Adapter):
    kind = "activitypub"
    Config = ActivityPubConfig
    only_one = True  # it serves /.well-known/webfinger and /ap/...
    RETRY = MASTODON
    """Mastodon's delivery schedule (``gateway.retry.MASTODON``), given up after
    the platform's ``retry_max_age``; 401, 408 and 429 retried, other 4xx not."""

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        self.config: ActivityPubConfig = ctx.config
        self.urls = enc.Urls(self.config.base_url)
        self._caps = Capabilities(batch_max=20)
        self.session = GuardedSession(allow_private=self.config.allow_private_addresses, timeout=self.config.timeout,
                                      user_agent=f"civic-gateway/{VERSION} (+{self.config.base_url})")
        self.remote = Remote(self.session, self._sign_get, max_body=self.config.max_body,
                             max_depth=self.config.max_depth)
        self.counts = PostCounts()
        self._retry = msgspec.structs.replace(self.RETRY, give_up_after=self.config.retry_max_age)
        self.hosted = {g for g in ctx.groups if not g.startswith(("http://", "https://"))}
        self.remote_groups = {g for g in ctx.groups if g.startswith(("http://", "https://"))}
        self._tasks = TaskGroup()
        self._key: sig.PrivateKey | None = None
        self._key_pem = ""
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self.refused: dict[str, int] = {}
        self.received = 0
        shared_collector(ctx.metrics.registry, "activitypub", _Collector).adapters.add(self)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def retry_schedule(self) -> RetrySchedule:
        return self._retry

    async def start(self) -> None:
        await self.session.start()
        raw = await self.ctx.state.get_one(KEY)
        if raw is None:  # first start: make the key; of nodes starting at once, one key wins for all
            raw = await self.ctx.state.setdefault(KEY, sig.private_key_pem(sig.generate_rsa_key()).encode())
        self._key = sig.load_private_key(raw.decode())
        self._key_pem = sig.public_key_pem(self._key)
        for url in sorted(self.remote_groups):
            self._tasks.spawn(self._join_remote(url), f"ap-join-{url}")

    async def stop(self) -> None:
        await self._tasks.close()
        await self.session.close()

    # -- signing ----------------------------------------------------------------------------------------
    def _sign_get(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> Mapping[str, str]:
        assert self._key is not None
        return sig.sign_cavage(method, url, headers, body, self.urls.key_id(self.urls.instance), self._key, time.time())

    async def _post(self, post: delivery.Post) -> tuple[int, float | None]:
        """POST one activity, signed by its actor: the status and ``Retry-After`` (seconds) if any."""
        assert self._key is not None
        key_id = self.urls.key_id(post.actor)
        key = self._key

        def sign(method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> Mapping[str, str]:
            return sig.sign_cavage(method, url, headers, body, key_id, key, time.time())

        got = await self.session.request("POST", post.inbox, max_bytes=64 * 1024, body=post.body,
                                         headers={"Content-Type": AP_JSON}, sign=sign, follow_redirects=False)
        after = next((v for k, v in got.headers.items() if k.lower() == "retry-after"), "")
        return got.status, float(after) if after.strip().isdigit() else None

    async def _send_post(self, d: Delivery) -> None:
        """Deliver one queued ``activitypub.post`` (a target ``inbox:<host>``);
        raise as the core's retry needs: permanent for an unsalvageable answer."""
        post = delivery.decode_post(d.payload)
        try:
            status, retry_after = await self._post(post)
        except FetchError as exc:
            if not exc.transient:  # refused before sending (address, size): not worth retrying
                self.counts.dropped += 1
                raise PermanentDeliveryError(f"{post.inbox}: {exc}") from None
            self.counts.retried += 1
            raise TransientDeliveryError(f"{post.inbox}: {exc}") from None
        if 200 <= status < 300:
            self.counts.delivered += 1
            return
        if self._retry.permanent(status):
            self.counts.dropped += 1
            raise PermanentDeliveryError(f"{post.inbox} refused the activity for good (HTTP {status})")
        self.counts.retried += 1
        raise TransientDeliveryError(f"{post.inbox} answered HTTP {status}", retry_after=retry_after)

    async def _send(self, followups: list[Followup]) -> None:
        """Queue deliveries made outside ``deliver`` (an ``Accept``, a ``Follow``) in the gateway's outbox."""
        if self.ctx.send is None:
            raise RuntimeError("this adapter runs without a gateway outbox (AdapterContext.send)")
        if followups:
            await self.ctx.send(followups)

    # -- routes -------------------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/.well-known/webfinger", self.webfinger),
            web.get("/.well-known/nodeinfo", self.nodeinfo_links),
            web.get("/nodeinfo/2.1", self.nodeinfo),
            web.get("/ap/actor", self.instance_actor),
            web.get("/ap/groups/{name}", self.group_actor),
            web.get("/ap/groups/{name}/followers", self.collection),
            web.get("/ap/groups/{name}/following", self.collection),
            web.get("/ap/groups/{name}/outbox", self.collection),
            web.get("/ap/people/{id}", self.person_actor),
            web.get("/ap/people/{id}/{what:followers|following|outbox}", self.collection),
            web.get("/ap/notes/{id}", self.note),
            web.get("/ap/activities/{id}", self.activity_doc),
            web.post("/ap/inbox", self.inbox),
            web.post("/ap/actor/inbox", self.inbox),
            web.post("/ap/groups/{name}/inbox", self.inbox),
            web.post("/ap/people/{id}/inbox", self.inbox),
        ]

    @staticmethod
    def _json(doc: Any, status: int = 200, content_type: str = AP_JSON) -> web.Response:
        return web.Response(body=orjson.dumps(doc), status=status, content_type=content_type)

    async def webfinger(self, request: web.Request) -> web.Response:
        resource = request.query.get("resource", "")
        if not resource:
            return web.json_response({"error": "`resource`: missing (acct:NAME@HOST)"}, status=400)
        if len(resource) > WEBFINGER_MAX:
            return web.json_response({"error": f"`resource`: longer than {WEBFINGER_MAX} characters"}, status=400)
        if "://" in resource and not resource.startswith("acct:"):
            return web.json_response({"error": "not a user of this server (ask by acct:NAME@HOST)"}, status=404)
        name, _, domain = resource.removeprefix("acct:").lstrip("@").rpartition("@")
        problem = enc.name_problem(name) or enc.name_problem(domain)
        if problem:
            return web.json_response({"error": f"`resource`: not acct:NAME@HOST ({problem})"}, status=400)
        if domain.lower() != self.urls.host.lower():
            return web.json_response({"error": "not a user of this server"}, status=404)
        if name in self.hosted:
            actor_id = self.urls.group(name)
        elif name == self.urls.host:
            actor_id = self.urls.instance
        elif await self.ctx.state.get_one(f"person:{name}") is not None:
            actor_id = self.urls.person(name)
        else:
            return web.json_response({"error": "no such account"}, status=404)
        return self._json(enc.webfinger(f"acct:{name}@{domain}", actor_id), content_type="application/jrd+json")

    async def nodeinfo_links(self, request: web.Request) -> web.Response:
        return web.json_response({"links": [{"rel": "http://nodeinfo.diaspora.software/ns/schema/2.1",
                                             "href": f"{self.urls.base}/nodeinfo/2.1"}]})

    async def nodeinfo(self, request: web.Request) -> web.Response:
        return web.json_response(enc.nodeinfo(VERSION))

    async def instance_actor(self, request: web.Request) -> web.Response:
        return self._json(enc.instance_actor(self.urls, self._key_pem))

    @staticmethod
    def _bad_name(value: str, what: str) -> web.Response | None:
        """``400`` for a name or id in a path that none can be (``enc.name_problem``)."""
        problem = enc.name_problem(value)
        return web.json_response({"error": f"not a {what}: {problem}"}, status=400) if problem else None

    async def group_actor(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if bad := self._bad_name(name, "group name"):
            return bad
        if name not in self.hosted:
            return web.json_response({"error": "no such group"}, status=404)
        settings = self.config.groups.get(name)
        return self._json(enc.group_actor(self.urls, name, self._key_pem, display=settings.name if settings else None,
                                          summary=settings.summary if settings else None))

    async def person_actor(self, request: web.Request) -> web.Response:
        stand_in = request.match_info["id"]
        if bad := self._bad_name(stand_in, "person id"):
            return bad
        raw = await self.ctx.state.get_one(f"person:{stand_in}")
        if raw is None:
            return web.json_response({"error": "no such person"}, status=404)
        p = orjson.loads(raw)
        return self._json(enc.person_actor(self.urls, Actor(stand_in, name=p.get("name"),
                                                            identity=p.get("identity", "pseudonymous")),
                                           self._key_pem))

    async def collection(self, request: web.Request) -> web.Response:
        # Members are not listed and nothing is counted (no engagement figures).
        if "name" in request.match_info:
            name = request.match_info["name"]
            if bad := self._bad_name(name, "group name"):
                return bad
            if name not in self.hosted:
                return web.json_response({"error": "no such group"}, status=404)
        else:
            stand_in = request.match_info["id"]
            if bad := self._bad_name(stand_in, "person id"):
                return bad
            if await self.ctx.state.get_one(f"person:{stand_in}") is None:
                return web.json_response({"error": "no such person"}, status=404)
        return self._json(enc.collection(self.urls.base + request.path))

    async def note(self, request: web.Request) -> web.Response:
        note_id = unquote(request.match_info["id"], errors="surrogateescape")
        if bad := self._bad_name(note_id, "note id"):
            return bad
        raw = await self.ctx.state.get_one(f"note:{note_id}")
        if raw is None:
            return web.json_response({"error": "no such note"}, status=404)
        rec = orjson.loads(raw)
        if rec.get("deleted"):
            return self._json({"@context": enc.AS_CONTEXT, **enc.tombstone(rec["doc"]["id"])}, status=410)
        return self._json({"@context": enc.CONTEXT, **rec["doc"]})

    async def activity_doc(self, request: web.Request) -> web.Response:
        event_id = unquote(request.match_info["id"], errors="surrogateescape")
        if bad := self._bad_name(event_id, "activity id"):
            return bad
        raw = await self.ctx.state.get_one(f"act:{event_id}")
        if raw is None:
            return web.json_response({"error": "no such activity"}, status=404)
        return web.Response(body=raw, content_type=AP_JSON)

    # -- inbox ----------------------------------------------------------------------------------------------
    async def inbox(self, request: web.Request) -> web.Response:
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
            name = self._hosted_name(target)
            if name is None:
                return
            groups = [name]
            if kind == "Undo":
                await self.ctx.state.put({f"follower:{name}:{actor}": None})
        elif kind in ("Create", "Update"):
            groups = [n for n in (self._hosted_name(i) for i in dec.audience(activity, obj if isinstance(
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
                rec = await self._note_record(ref)
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
            rec = await self._note_record(ref)
            if rec is not None:
                return [rec["group"]]
        named = [n for n in (self._hosted_name(r) for r in [*refs, *sorted(dec.audience(flag))]) if n]
        if named:
            return list(dict.fromkeys(named))
        linked = self.hosted | self.remote_groups
        for ref in refs:
            person = await self._own_person(ref)
            if person is not None:
                return [g for g in person[1] if g in linked]
        return []

    async def _take_in(self, activity: dict[str, Any], actor: str, groups: list[str], kind: str | None,
                       **extra: Any) -> None:
        obj_id = dec.id_of(activity.get("object"))
        if kind in ("Delete", "Remove") and "author_of" not in extra and obj_id:
            rec = await self._note_record(obj_id)
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
                    await self._send(await self._announce(g, activity, exclude=actor))

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

    def _hosted_name(self, url: str | None) -> str | None:
        own = self.urls.own(url) if url else None
        return own[1] if own is not None and own[0] == "group" and own[1] in self.hosted else None

    async def _note_record(self, note_id: str) -> dict[str, Any] | None:
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

    async def _own_person(self, url: str) -> tuple[Actor, list[str]] | None:
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
                person = await self._own_person(url)
                found[url] = person[0] if person else None
        return dec.with_actors(payload, found, self.name) if found else payload

    async def _follow(self, name: str, actor: str, follow: Mapping[str, Any], *, accept: bool = True) -> None:
        """Record the follower and answer ``Accept`` (open groups: everyone the
        gateway may carry joins), or answer ``Reject``."""
        try:
            doc = await self.remote.actor(actor)
        except RemoteError as exc:
            raise Refused(401, "no_actor", f"the follower's actor document could not be had: {exc}") from None
        inbox = dec.id_of(doc.get("inbox"))
        shared = inbox_of(doc)
        key = f"follower:{name}:{actor}"
        await self.ctx.state.put({key: orjson.dumps({"inbox": inbox, "shared": shared}) if accept else None})
        group = self.urls.group(name)
        kind = "Accept" if accept else "Reject"
        accept_doc = enc.activity(kind, self.urls.activity(hashlib.sha256(follow["id"].encode()).hexdigest()[:32],
                                                           "#" + kind.lower()), group,
                                  {"id": follow["id"], "type": "Follow", "actor": actor, "object": group}, to=[actor])
        await self._send(delivery.posts_for(accept_doc["id"], [inbox or shared or actor], group,
                                            orjson.dumps(accept_doc)))

    async def _follower_inboxes(self, name: str, exclude: str | None = None) -> list[str]:
        """The inboxes of a hosted group's followers (but ``exclude``), one per
        server where it has a shared inbox."""
        rows = await self.ctx.state.scan(f"follower:{name}:", limit=FOLLOWERS_MAX)
        if len(rows) >= FOLLOWERS_MAX:
            log.warning("group %s has more than %d followers: only the first are reached", name, FOLLOWERS_MAX)
        out: dict[str, None] = {}
        for key, raw in rows:
            if key.split(":", 2)[2] == exclude:
                continue
            rec = orjson.loads(raw)
            inbox = rec.get("shared") or rec.get("inbox")
            if inbox:
                out.setdefault(inbox)
        return list(out)

    async def _announce(self, name: str, inner: Mapping[str, Any], *, exclude: str | None = None,
                        also: Sequence[str] = ()) -> list[Followup]:
        """The group shares ``inner`` with every follower (FEP-1b12): one
        delivery per follower inbox, for the gateway's outbox."""
        announce_id = self.urls.activity(hashlib.sha256(f"{name}|{inner['id']}".encode()).hexdigest()[:32],
                                         "#announce")
        body = orjson.dumps(enc.announce(self.urls, name, inner, announce_id))
        inboxes = await self._follower_inboxes(name, exclude)
        inboxes += [i for i in also if i not in inboxes]
        return delivery.posts_for(announce_id, inboxes, self.urls.group(name), body)

    # -- deliver (the core's events into hosted groups) -------------------------------------------------------
    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        """A group's events become deliveries to inboxes, one queue per server
        (``delivery``), that the core queues with the group's completion; a
        server's queue (``inbox:<host>``) comes back here to be posted."""
        ids: dict[str, str] = {}
        followups: list[Followup] = []
        for d in batch:
            if d.type == delivery.POST:
                await self._send_post(d)
                continue
            got, more = await self._deliver(d)
            ids.update(got)
            followups += more
        return DeliveryResult(ids=ids, followups=tuple(followups))  # type: ignore[arg-type]

    async def _deliver(self, d: Delivery) -> tuple[dict[str, str], list[Followup]]:
        if d.group in self.remote_groups:
            return await self._deliver_remote(d)
        p, group = d.payload, self.urls.group(d.group)
        if isinstance(p, Message):
            await self._remember_person(p.author, d.group)
            author = enc.person_url(self.urls, p.author)
            reply = p.reply_to if p.reply_to and p.reply_to.startswith(("http://", "https://")) else None
            edited = d.type == "civic.message.edited"
            note_key = p.id
            if edited:
                if not self.urls.owns(p.id):
                    raise PermanentDeliveryError(f"edit of {p.id}, which the gateway did not post")
                note_key = unquote(p.id.rsplit("/", 1)[1])
            note = enc.note(self.urls, _with_id(p, note_key), group_id=group, published=now_iso(d.time),
                            reply_to=reply, followers=f"{group}/followers",
                            updated=now_iso() if edited else None)
            kind = "Update" if edited else "Create"
            act_id = self.urls.activity(d.event_id)
            act = enc.activity(kind, act_id, author, note, to=note["to"], cc=note["cc"])
            await self.ctx.state.put({f"note:{note_key}": orjson.dumps({"group": d.group, "doc": note}),
                                      f"act:{d.event_id}": orjson.dumps(act)})
            return {} if edited else {p.id: note["id"]}, await self._announce(d.group, act)
        if isinstance(p, MessageDeletion):
            rec = await self._note_record(p.id)
            if self.urls.owns(p.id):
                key = f"note:{unquote(p.id.rsplit('/', 1)[1])}"
                raw = await self.ctx.state.get_one(key)
                if raw:
                    saved = orjson.loads(raw)
                    saved["deleted"] = True
                    await self.ctx.state.put({key: orjson.dumps(saved)})
                actor = rec["author"] if rec else group
            else:
                actor = group  # a fediverse post removed elsewhere: the group takes it out
            act = enc.activity("Delete", self.urls.activity(d.event_id), actor, enc.tombstone(p.id), to=[enc.PUBLIC])
            return {}, await self._announce(d.group, act)
        if isinstance(p, Reaction):
            await self._remember_person(p.author, d.group)
            author = enc.person_url(self.urls, p.author)
            like_id = self.urls.activity(hashlib.sha256(f"{author}|{p.message}|{p.key}".encode()).hexdigest()[:32],
                                         "#react")
            kind = "Like" if p.key in (dec.LIKE_KEY, "❤️", "⭐") else "EmojiReact"
            like = enc.activity(kind, like_id, author, p.message, context=False,
                                **({"content": p.key} if kind == "EmojiReact" else {}))
            if d.type == "civic.reaction.removed":
                act = enc.activity("Undo", self.urls.activity(d.event_id), author, like)
            else:
                act = {"@context": enc.CONTEXT, **like}
            return {}, await self._announce(d.group, act)
        if isinstance(p, Membership) and p.state in ("kicked", "banned") and p.member.id.startswith("http"):
            await self.ctx.state.put({f"follower:{d.group}:{p.member.id}": None})
            if p.state == "banned":
                act = enc.activity("Block", self.urls.activity(d.event_id), group, p.member.id,
                                   summary=p.reason or None)
                return {}, await self._announce(d.group, act, also=await self._inboxes_of(p.member.id))
            return {}, []
        if isinstance(p, ModerationAction) and p.action == "remove_message" and p.message:
            act = enc.activity("Delete", self.urls.activity(d.event_id), group, enc.tombstone(p.message),
                               to=[enc.PUBLIC], summary=p.reason or None)
            return {}, await self._announce(d.group, act)
        if isinstance(p, Report):
            return {}, await self._flag(d, p)
        if isinstance(p, ProfileUpdate) and not p.actor.id.startswith(("http://", "https://")):
            # A new name or identity level: the Person document changes, and the
            # group's followers hear it (Mastodon refreshes the profile on Update).
            await self._remember_person(p.actor, d.group)
            doc = enc.person_actor(self.urls, p.actor, self._key_pem)
            doc.pop("@context", None)
            person = enc.person_url(self.urls, p.actor)
            act = enc.activity("Update", self.urls.activity(d.event_id), person, doc, to=[enc.PUBLIC])
            return {}, await self._announce(d.group, act)
        self.ctx.metrics.degraded.labels(f"activitypub_{d.type.removeprefix('civic.')}_not_carried").inc()
        return {}, []

    # -- joined remote groups ----------------------------------------------------------------------------
    async def _join_remote(self, url: str) -> None:
        """The instance actor follows a remote group (Lemmy, Mobilizon, a
        Fedify group ...), so the group sends it everything it announces.
        Retried until the group's actor can be had; the Follow itself goes
        through the durable queue."""
        raw = await self.ctx.state.get_one(f"joined:{url}")
        if raw is not None and orjson.loads(raw).get("state") == "accepted":
            return
        delay = 1.0
        while True:
            try:
                group = await self.remote.actor(url)
                break
            except RemoteError as exc:
                log.warning("cannot reach the remote group %s (%s); trying again in %.0f s", url, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 600.0)
        follow_id = self.urls.activity(hashlib.sha256(f"join|{url}".encode()).hexdigest()[:32], "#follow")
        follow = enc.activity("Follow", follow_id, self.urls.instance, url, to=[url])
        await self.ctx.state.put({f"joined:{url}": orjson.dumps({"follow": follow_id, "state": "pending"})})
        await self._send(delivery.posts_for(follow_id, [str(group["inbox"])], self.urls.instance, orjson.dumps(follow)))

    async def _remote_inbox(self, url: str) -> str:
        try:
            group = await self.remote.actor(url)
        except RemoteError as exc:
            raise TransientDeliveryError(f"the remote group {url}: {exc}") from None
        return str(group["inbox"])

    async def _as_member(self, group_url: str, person: str) -> list[Followup]:
        """A Follow of the remote group by ``person`` the first time they post
        there (groups take posts from their members)."""
        key = f"gfollow:{group_url}:{person}"
        if await self.ctx.state.get_one(key) is not None:
            return []
        follow_id = self.urls.activity(hashlib.sha256(f"{group_url}|{person}".encode()).hexdigest()[:32], "#follow")
        await self.ctx.state.put({key: b"pending"})
        follow = enc.activity("Follow", follow_id, person, group_url, to=[group_url])
        return delivery.posts_for(follow_id, [await self._remote_inbox(group_url)], person, orjson.dumps(follow))

    async def _deliver_remote(self, d: Delivery) -> tuple[dict[str, str], list[Followup]]:
        """Into a remote group: the person's own activity, for the group's
        inbox; the group shares it with its members (and back with us: an echo)."""
        p, group_url = d.payload, d.group
        inbox = await self._remote_inbox(group_url)
        posts: list[Followup] = []
        result: dict[str, str] = {}
        if isinstance(p, Message):
            await self._remember_person(p.author, group_url)
            author = enc.person_url(self.urls, p.author)
            posts += await self._as_member(group_url, author)
            edited = d.type == "civic.message.edited"
            note_key = unquote(p.id.rsplit("/", 1)[1]) if edited and self.urls.owns(p.id) else p.id
            if edited and not self.urls.owns(p.id):
                raise PermanentDeliveryError(f"edit of {p.id}, which the gateway did not post")
            reply = p.reply_to if p.reply_to and p.reply_to.startswith(("http://", "https://")) else None
            note = enc.note(self.urls, _with_id(p, note_key), group_id=group_url, published=now_iso(d.time),
                            reply_to=reply, updated=now_iso() if edited else None)
            act = enc.activity("Update" if edited else "Create", self.urls.activity(d.event_id), author, note,
                               to=note["to"], cc=note["cc"], audience=group_url)
            await self.ctx.state.put({f"note:{note_key}": orjson.dumps({"group": group_url, "doc": note}),
                                      f"act:{d.event_id}": orjson.dumps(act)})
            posts += delivery.posts_for(d.event_id, [inbox], author, orjson.dumps(act))
            if not edited:
                result[p.id] = note["id"]
        elif isinstance(p, MessageDeletion) and self.urls.owns(p.id):
            rec = await self._note_record(p.id)
            author = rec["author"] if rec else self.urls.instance
            act = enc.activity("Delete", self.urls.activity(d.event_id), author, enc.tombstone(p.id),
                               to=[enc.PUBLIC, group_url], audience=group_url)
            posts += delivery.posts_for(d.event_id, [inbox], author, orjson.dumps(act))
        elif isinstance(p, Reaction):
            await self._remember_person(p.author, group_url)
            author = enc.person_url(self.urls, p.author)
            posts += await self._as_member(group_url, author)
            like_id = self.urls.activity(hashlib.sha256(f"{author}|{p.message}|{p.key}".encode()).hexdigest()[:32],
                                         "#react")
            kind = "Like" if p.key in (dec.LIKE_KEY, "❤️", "⭐") else "EmojiReact"
            like = enc.activity(kind, like_id, author, p.message, context=False, to=[group_url], audience=group_url,
                                **({"content": p.key} if kind == "EmojiReact" else {}))
            act = (enc.activity("Undo", self.urls.activity(d.event_id), author, like, to=[group_url])
                   if d.type == "civic.reaction.removed" else {"@context": enc.CONTEXT, **like})
            posts += delivery.posts_for(d.event_id, [inbox], author, orjson.dumps(act))
        elif isinstance(p, Report):
            posts += await self._flag(d, p)
        else:  # moderation in a group the gateway only belongs to is the group's own moderators' business
            self.ctx.metrics.degraded.labels(f"activitypub_remote_{d.type.removeprefix('civic.')}_not_carried").inc()
        return result, posts

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

    async def _inboxes_of(self, actor: str) -> list[str]:
        try:
            doc = await self.remote.actor(actor)
        except RemoteError:
            return []
        inbox = inbox_of(doc, shared=False)
        return [inbox] if inbox else []

    async def _flag(self, d: Delivery, r: Report) -> list[Followup]:
        """A report goes from the instance actor (the reporter stays unnamed) to
        the server of the reported person or post."""
        objects = [o for o in (r.member.id if r.member else None, r.message) if o and o.startswith("http")]
        if not objects:
            return []
        inboxes = await self._inboxes_of(r.member.id) if r.member and r.member.id.startswith("http") else []
        if not inboxes and r.message:
            rec = await self._note_record(r.message)
            if rec and rec.get("author"):
                inboxes = await self._inboxes_of(rec["author"])
        act = enc.activity("Flag", self.urls.activity(d.event_id), self.urls.instance, objects,
                           content=(r.category.replace("_", " ") + (f": {r.text}" if r.text else "")))
        return delivery.posts_for(d.event_id, inboxes, self.urls.instance, orjson.dumps(act))

    async def _remember_person(self, actor: Actor, group: str | None = None) -> None:
        """Keep what the ``Person`` document of a person from elsewhere shows (their
        name as their identity level allows), so that it can be served, and the
        groups they were shown in (where a report about them goes)."""
        if actor.id.startswith(("http://", "https://")):
            return
        key = f"person:{actor.id}"
        raw = await self.ctx.state.get_one(key)
        groups = list(orjson.loads(raw).get("groups", ())) if raw else []
        if group is not None and group not in groups:
            groups.append(group)
        rec = orjson.dumps({"name": enc.display_name(actor), "identity": actor.identity, "groups": groups})
        if raw != rec:
            await self.ctx.state.put({key: rec})


def _with_id(msg: Message, note_key: str) -> Message:
    return msgspec.structs.replace(msg, id=note_key)


class _Collector:
    def __init__(self) -> None:
        self.adapters: weakref.WeakSet[ActivityPubAdapter] = weakref.WeakSet()

    def collect(self) -> Any:
        refused = CounterMetricFamily("civic_activitypub_refused", "Inbox requests refused, by reason.",
                                      labels=["platform", "reason"])
        received = CounterMetricFamily("civic_activitypub_received", "Inbox requests that passed every check.",
                                       labels=["platform"])
        out = CounterMetricFamily("civic_activitypub_deliveries", "Deliveries to inboxes, by outcome.",
                                  labels=["platform", "outcome"])
        for a in list(self.adapters):
            received.add_metric([a.name], a.received)
            for reason, n in sorted(a.refused.items()):
                refused.add_metric([a.name, reason], n)
            c = a.counts
            for outcome in ("delivered", "retried", "dropped"):
                out.add_metric([a.name, outcome], getattr(c, outcome))
        yield from (refused, received, out)
