"""The fediverse as groups (docs/activitypub.md): the gateway hosts ActivityPub
``Group`` actors (FEP-1b12) that fediverse people follow to join and address
to post, and shows the people of other platforms as ``Person`` actors.

Pieces: ``inbound`` (the inbox: checks, routing, decoding, storing),
``documents`` (the actor, WebFinger and NodeInfo documents served),
``signatures`` (HTTP signatures), ``remote`` (fetching documents with origin
checks), ``decode``/``encode`` (pure translation), ``outbound`` (the
per-host follow-up deliveries it hands the gateway's outbox). This module
wires them and sends: ``deliver`` (the core's
events into hosted and joined groups), a group's ``Announce`` of what it
relayed, and the answer to a ``Follow``.

All the gateway's actors share one RSA key, made at first start and kept in
the store: they are all the gateway speaking.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

import msgspec
import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily

from adapters.activitypub import decode as dec
from adapters.activitypub import encode as enc
from adapters.activitypub import signatures as sig
from adapters.activitypub import outbound
from adapters.activitypub.config import ActivityPubConfig
from adapters.activitypub.documents import AP_JSON, VERSION, Documents
from adapters.activitypub.inbound import Inbox, Refused
from adapters.activitypub.remote import Remote, RemoteError, inbox_of
from gateway.kit import (
    Adapter,
    AdapterContext,
    Capabilities,
    Delivery,
    DeliveryResult,
    FetchError,
    Followup,
    GuardedSession,
    MASTODON,
    PermanentDeliveryError,
    RetrySchedule,
    TaskGroup,
    TransientDeliveryError,
    register_collector,
)
from schemas.v1 import Actor, Membership, Message, MessageDeletion, ModerationAction, ProfileUpdate, Reaction, Report

log = logging.getLogger("civic.activitypub")

KEY = "key:rsa"
FOLLOWERS_MAX = 100_000
"""Followers of one hosted group an announcement reaches (a civic group is far smaller)."""


def now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        # No threads: ActivityPub has only ``inReplyTo``; the core turns a thread
        # into what a message replies to (and this adapter does the same).
        self._caps = Capabilities(batch_max=20, threads=False)
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
        self.documents = Documents(self.config, self.urls, ctx.state, self.hosted, lambda: self._key_pem)
        self.inbox = Inbox(ctx, self.config, self.urls, self.remote, hosted=self.hosted,
                           remote_groups=self.remote_groups, follow=self._follow, announce=self._announce_now)
        register_collector(ctx, "activitypub", _Collector).adapters.add(self)

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

    async def _post(self, post: outbound.Post) -> tuple[int, float | None]:
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
        post = outbound.decode_post(d.payload)
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
        return [*self.documents.routes(), *self.inbox.routes()]

    async def _note_record(self, note_id: str) -> dict[str, Any] | None:
        return await self.inbox.note_record(note_id)

    # -- what the inbox calls for: followers, and a group's shares ----------------------------------------
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
        await self._send(outbound.posts_for(accept_doc["id"], [inbox or shared or actor], group,
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

    async def _announce_now(self, name: str, inner: Mapping[str, Any], *, exclude: str | None = None) -> None:
        """What the inbox calls when a hosted group shares what it relayed: queued at once."""
        await self._send(await self._announce(name, inner, exclude=exclude))

    async def _announce(self, name: str, inner: Mapping[str, Any], *, exclude: str | None = None,
                        also: Sequence[str] = ()) -> list[Followup]:
        """The group shares ``inner`` with every follower (FEP-1b12): one
        delivery per follower inbox, for the gateway's outbox."""
        announce_id = self.urls.activity(hashlib.sha256(f"{name}|{inner['id']}".encode()).hexdigest()[:32],
                                         "#announce")
        body = orjson.dumps(enc.announce(self.urls, name, inner, announce_id))
        inboxes = await self._follower_inboxes(name, exclude)
        inboxes += [i for i in also if i not in inboxes]
        return outbound.posts_for(announce_id, inboxes, self.urls.group(name), body)

    # -- deliver (the core's events into hosted groups) -------------------------------------------------------
    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        """A group's events become deliveries to inboxes, one queue per server
        (``outbound``), that the core queues with the group's completion; a
        server's queue (``inbox:<host>``) comes back here to be posted."""
        ids: dict[str, str] = {}
        followups: list[Followup] = []
        for d in batch:
            if d.type == outbound.POST:
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
            parent = p.reply_to or p.thread
            reply = parent if parent and parent.startswith(("http://", "https://")) else None
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
        await self._send(outbound.posts_for(follow_id, [str(group["inbox"])], self.urls.instance, orjson.dumps(follow)))

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
        return outbound.posts_for(follow_id, [await self._remote_inbox(group_url)], person, orjson.dumps(follow))

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
            parent = p.reply_to or p.thread
            reply = parent if parent and parent.startswith(("http://", "https://")) else None
            note = enc.note(self.urls, _with_id(p, note_key), group_id=group_url, published=now_iso(d.time),
                            reply_to=reply, updated=now_iso() if edited else None)
            act = enc.activity("Update" if edited else "Create", self.urls.activity(d.event_id), author, note,
                               to=note["to"], cc=note["cc"], audience=group_url)
            await self.ctx.state.put({f"note:{note_key}": orjson.dumps({"group": group_url, "doc": note}),
                                      f"act:{d.event_id}": orjson.dumps(act)})
            posts += outbound.posts_for(d.event_id, [inbox], author, orjson.dumps(act))
            if not edited:
                result[p.id] = note["id"]
        elif isinstance(p, MessageDeletion) and self.urls.owns(p.id):
            rec = await self._note_record(p.id)
            author = rec["author"] if rec else self.urls.instance
            act = enc.activity("Delete", self.urls.activity(d.event_id), author, enc.tombstone(p.id),
                               to=[enc.PUBLIC, group_url], audience=group_url)
            posts += outbound.posts_for(d.event_id, [inbox], author, orjson.dumps(act))
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
            posts += outbound.posts_for(d.event_id, [inbox], author, orjson.dumps(act))
        elif isinstance(p, Report):
            posts += await self._flag(d, p)
        else:  # moderation in a group the gateway only belongs to is the group's own moderators' business
            self.ctx.metrics.degraded.labels(f"activitypub_remote_{d.type.removeprefix('civic.')}_not_carried").inc()
        return result, posts

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
        return outbound.posts_for(d.event_id, inboxes, self.urls.instance, orjson.dumps(act))

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
            received.add_metric([a.name], a.inbox.received)
            for reason, n in sorted(a.inbox.refused.items()):
                refused.add_metric([a.name, reason], n)
            c = a.counts
            for outcome in ("delivered", "retried", "dropped"):
                out.add_metric([a.name, outcome], getattr(c, outcome))
        yield from (refused, received, out)
