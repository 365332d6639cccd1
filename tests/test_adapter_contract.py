"""The contract every adapter keeps (docs/contributing.md, "The contract suite"),
run over webhook, MQTT (structured and binary), Matrix, ActivityPub and the fake:

* round trip: every event type the adapter says it carries (``CARRIES`` in its
  ``encode``) is encoded from a ``Delivery`` and decoded back to the same
  payload, ids as the platform names them; what changes on the way is exactly
  what its ``DEGRADATIONS`` declares (a declared loss that does not happen
  fails, and so does one not declared);
* capabilities honoured: what ``Capabilities`` says false is never emitted,
  and a content warning is never dropped;
* redelivery idempotent: the same delivery twice gives the same native ids
  and the same transaction/event id; the same native event decoded twice
  gives the same ``event_id``;
* no engagement counters in anything an adapter emits.

Each adapter has a small harness (``HARNESSES``, the only place that knows an
adapter): how to build it on an ``AdapterContext`` in memory, how to capture
what it sends (a fake of its peer where it needs one: a homeserver that takes
sends, a fediverse follower's inbox), and how to decode a native event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec
import orjson
import pytest

from gateway.adapter import Adapter, AdapterContext, Capabilities, Delivery, DeliveryResult, Inbound, IngestResult
from gateway.errors import PermanentDeliveryError, TransientDeliveryError
from gateway.ids import EventId, GroupId, PlatformName
from gateway.metrics import Metrics
from schemas.v1 import (
    EVENT_TYPES,
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

NOW = 1_700_000_000.25


async def _no_ingest(batch: Sequence[Inbound]) -> IngestResult:
    return IngestResult(accepted=len(batch), duplicates=0)


def context(name: str, config: Any, groups: tuple[str, ...] = ()) -> AdapterContext:
    return AdapterContext(name=PlatformName(name), config=config, ingest=_no_ingest, metrics=Metrics(),
                          gateway_source="https://gw.example", groups=groups)


class Sent(msgspec.Struct):
    """What one ``deliver`` emitted: the native events (as the peer got them) and its result."""

    natives: list[Any]
    result: DeliveryResult


# -- the harnesses: the only code here that knows an adapter ---------------------------------------

class Harness:
    """How the contract reaches one adapter. ``group`` is a group of the
    platform; ``known`` a message the target already has (its native id: the
    core translates ids before ``deliver``); ``person(n)`` an id of a person
    as the core hands them to this platform."""

    name: str
    group = "g-1"
    known = "known-1"
    encode: Any  # the adapter's encode module: CARRIES, DEGRADATIONS

    def person(self, n: int) -> str:
        return f"cga_{n:04x}"

    async def build(self) -> Adapter:
        raise NotImplementedError

    async def send(self, adapter: Adapter, d: Delivery) -> Sent:
        raise NotImplementedError

    def decode(self, adapter: Adapter, native: Any) -> list[Inbound]:
        raise NotImplementedError

    def actor(self, a: Actor) -> Actor:
        """``a`` as the platform's native events name them."""
        return a

    def ids_of(self, native: Any) -> list[str]:
        """The ids a peer can recognise a repeat by (transaction id, CloudEvent id ...)."""
        raise NotImplementedError

    def expected(self, d: Delivery, sent: Sent) -> Any:
        """``d.payload`` with its ids as the platform names them."""
        p = d.payload
        changes: dict[str, Any] = {}
        for f in p.__struct_fields__:
            v = getattr(p, f)
            if isinstance(v, Actor):
                changes[f] = self.actor(v)
            elif f == "mentions":
                changes[f] = tuple(self.actor(m) for m in v)
        if d.type == "civic.message.created":
            changes["id"] = sent.result.ids.get(p.id, p.id)
        return msgspec.structs.replace(p, **changes)


class WebhookHarness(Harness):
    """Signed CloudEvents over HTTP: the request ``encode.request`` builds (what
    ``outbound`` POSTs), read back by the site's side: signature and body."""

    name = "webhook"

    def __init__(self) -> None:
        from adapters.webhook import decode, encode, signing
        self.encode, self._decode, self._signing = encode, decode, signing

    async def build(self) -> Adapter:
        from adapters.webhook.adapter import WebhookAdapter
        from adapters.webhook.config import WebhookConfig
        cfg = WebhookConfig(secret="whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY", url="http://127.0.0.1:9/in")
        return WebhookAdapter(context("site", cfg))

    async def send(self, adapter: Adapter, d: Delivery) -> Sent:
        cfg = adapter.config  # type: ignore[attr-defined]
        headers, body = self.encode.request(adapter.ctx.gateway_source, cfg.key, [d], int(NOW))
        return Sent([(headers, body)], self.encode.result(202, {}, b"", NOW))

    def decode(self, adapter: Adapter, native: Any) -> list[Inbound]:
        headers, body = native
        self._signing.verify(adapter.config.key, headers["webhook-id"], headers["webhook-timestamp"],  # type: ignore[attr-defined]
                             headers["webhook-signature"], body, NOW)
        return [self._decode.to_inbound(adapter.name, e, NOW)
                for e in self._decode.decode_body(headers["content-type"], body)]

    def ids_of(self, native: Any) -> list[str]:
        headers, body = native
        return [headers["webhook-id"], orjson.loads(body)["id"]]


class MqttHarness(Harness):
    """CloudEvents on MQTT 5: the messages ``encode.messages`` makes (what
    ``deliver`` publishes), read back as a site's subscription gets them."""

    def __init__(self, mode: str) -> None:
        from adapters.mqtt import decode, encode
        self.encode, self._decode, self.mode, self.name = encode, decode, mode, f"mqtt-{mode}"

    async def build(self) -> Adapter:
        from adapters.mqtt.adapter import MqttAdapter
        from adapters.mqtt.config import MqttConfig
        return MqttAdapter(context("m", MqttConfig(broker="mqtt://127.0.0.1:1", content_mode=self.mode)))

    async def send(self, adapter: Adapter, d: Delivery) -> Sent:
        cfg = adapter.config  # type: ignore[attr-defined]
        out = self.encode.messages(adapter.ctx.gateway_source, cfg.topic_prefix, adapter.name, [d], cfg.content_mode)
        return Sent(list(out), DeliveryResult())  # sites cannot answer with ids

    def decode(self, adapter: Adapter, native: Any) -> list[Inbound]:
        msg = self._decode.Received(native.payload, native.content_type, native.user_properties)
        return self._decode.decode(adapter.name, msg, 1 << 20, NOW)

    def ids_of(self, native: Any) -> list[str]:
        props = dict(native.user_properties)
        return [props["id"]] if "id" in props else [orjson.loads(native.payload)["id"]]


class FakeHarness(Harness):
    """The fake adapter: its platform in memory records what it got."""

    name = "fake"

    def __init__(self, **config: Any) -> None:
        from adapters.fake import decode, encode
        self.encode, self._decode, self.config = encode, decode, config

    async def build(self) -> Adapter:
        from adapters.fake.adapter import FakeAdapter
        from adapters.fake.config import FakeConfig
        return FakeAdapter(context("fk", FakeConfig(**self.config)))

    async def send(self, adapter: Adapter, d: Delivery) -> Sent:
        platform = adapter.platform  # type: ignore[attr-defined]
        before = len(platform.sent)
        result = await adapter.deliver([d])
        return Sent(platform.sent[before:], result)

    def decode(self, adapter: Adapter, native: Any) -> list[Inbound]:
        return [self._decode.decode(adapter.name, native, NOW)]

    def ids_of(self, native: Any) -> list[str]:
        return [native["id"], native["key"]]


class FakeHomeserver:
    """Takes the Matrix adapter's client calls as a homeserver would and keeps
    the room events they make (a transaction id sent again by the same user is
    the same event, as the spec says). Replaces ``MatrixClient``."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.events: list[dict[str, Any]] = []
        self.by_id: dict[str, dict[str, Any]] = {}
        self.txns: dict[tuple[str | None, str, str], str] = {}
        self.members: dict[tuple[str, str], str] = {}
        self.reports: list[tuple[str, str | None, str]] = []
        self.log: list[dict[str, Any]] = []
        """Every event a call answered with, repeats included (``events`` is the room's timeline)."""
        self.calls = 0

    def _event(self, room: str, type_: str, sender: str, content: dict[str, Any], txn: tuple[Any, ...] | None = None,
               state_key: str | None = None, ts: float = NOW) -> str:
        if txn is not None and txn in self.txns:
            self.log.append(self.by_id[self.txns[txn]])
            return self.txns[txn]
        event_id = "$" + hashlib.sha256(repr((len(self.events), txn, type_, sender)).encode()).hexdigest()[:20]
        ev = {"type": type_, "sender": sender, "room_id": room, "event_id": event_id, "content": content,
              "origin_server_ts": int(ts * 1000), "unsigned": {}}
        if state_key is not None:
            ev["state_key"] = state_key
            prev = self.members.get((room, state_key)) if type_ == "m.room.member" else None
            if prev:
                ev["unsigned"]["prev_content"] = {"membership": prev}
            if type_ == "m.room.member":
                self.members[(room, state_key)] = content["membership"]
        if txn is not None:
            self.txns[txn] = event_id  # type: ignore[index]
        self.events.append(ev)
        self.log.append(ev)
        self.by_id[event_id] = ev
        return event_id

    async def register(self, localpart: str) -> None: ...
    async def set_display_name(self, user: str, name: str) -> None: ...

    async def join(self, room: str, user: str | None = None) -> None:
        if user and self.members.get((room, user)) != "join":
            self._event(room, "m.room.member", user, {"membership": "join"}, state_key=user)

    async def invite(self, room: str, target: str, *, by: str | None = None) -> None: ...

    async def leave(self, room: str, user: str, reason: str | None = None) -> None:
        self._event(room, "m.room.member", user, {"membership": "leave", **({"reason": reason} if reason else {})},
                    state_key=user)

    async def membership_action(self, action: str, room: str, target: str, reason: str | None = None, *,
                                by: str | None = None) -> None:
        state = {"kick": "leave", "ban": "ban", "unban": "leave"}[action]
        self._event(room, "m.room.member", by or f"@civic:{self.server}",
                    {"membership": state, **({"reason": reason} if reason else {})}, state_key=target)

    async def send(self, room: str, event_type: str, content: dict[str, Any], txn_id: str, *,
                   user: str | None = None, ts: float | None = None) -> str:
        return self._event(room, event_type, user or f"@civic:{self.server}", content, (user, "send", txn_id),
                           ts=ts or NOW)

    async def redact(self, room: str, event_id: str, txn_id: str, reason: str | None = None, *,
                     user: str | None = None) -> str:
        return self._event(room, "m.room.redaction", user or f"@civic:{self.server}",
                           {"redacts": event_id, **({"reason": reason} if reason else {})}, (user, "redact", txn_id))

    async def put_state(self, room: str, event_type: str, state_key: str, content: dict[str, Any], *,
                        user: str | None = None) -> str:
        return self._event(room, event_type, user or f"@civic:{self.server}", content, state_key=state_key)

    async def state(self, room: str, event_type: str, state_key: str = "") -> dict[str, Any] | None:
        for ev in reversed(self.events):
            if ev["type"] == event_type and ev.get("state_key") == state_key:
                return ev["content"]
        return None

    async def event(self, room: str, event_id: str) -> dict[str, Any] | None:
        return self.by_id.get(event_id)

    async def relations(self, room: str, event_id: str, rel_type: str, event_type: str, **kw: Any) -> list[dict]:
        return [e for e in reversed(self.events) if e["type"] == event_type
                and (e["content"].get("m.relates_to") or {}).get("event_id") == event_id]

    async def report(self, room: str, event_id: str | None, reason: str, *, member: str | None = None) -> None:
        self.reports.append((room, event_id or member, reason))


class MatrixHarness(Harness):
    """The Matrix adapter sending into a room of a fake homeserver; its room
    events read back as a homeserver pushes them. Ghosts stand for people of
    other platforms (their user ids are how the room names them); the events
    are decoded as another gateway on the room would (this gateway's own
    echo suppression is tested in test_matrix_codec.py)."""

    name = "matrix"
    server = "hub.example"
    group = "!room:hub.example"

    def __init__(self) -> None:
        from adapters.matrix import decode, encode
        self.encode, self._decode = encode, decode

    @property
    def known(self) -> str:  # type: ignore[override]
        return self._known

    def person(self, n: int) -> str:
        return f"cga_{n:04x}" if n != 2 else f"@bob:{self.server}"  # person 2 lives on the homeserver

    async def build(self) -> Adapter:
        from adapters.matrix.adapter import MatrixAdapter
        from adapters.matrix.config import MatrixConfig
        cfg = MatrixConfig(homeserver="http://127.0.0.1:1", server_name=self.server, as_token="a" * 32,
                           hs_token="h" * 32, appservice_url="http://127.0.0.1:2")
        adapter = MatrixAdapter(context("hub", cfg, (self.group,)))
        hs = FakeHomeserver(self.server)
        adapter.client = adapter.outbound.client = adapter.outbound.ghosts.client = hs  # type: ignore[assignment]
        ghost = adapter.outbound.ghosts.speaker(Actor(self.person(1)))
        self._known = hs._event(self.group, "m.room.message", ghost, {"msgtype": "m.text", "body": "earlier"})
        return adapter

    async def send(self, adapter: Adapter, d: Delivery) -> Sent:
        hs = adapter.client  # type: ignore[attr-defined]
        before = len(hs.log)
        result = await adapter.deliver([d])
        return Sent(hs.log[before:], result)

    def decode(self, adapter: Adapter, native: Any) -> list[Inbound]:
        redacted = adapter.client.by_id.get(native["content"].get("redacts", ""))  # type: ignore[attr-defined]
        got = self._decode.decode_event(native, bot_user="@other_bot:elsewhere", ghost_prefix="other_",
                                        server_name="elsewhere", redacted=redacted)
        return got.to_inbound(adapter.name, now=NOW) if isinstance(got, self._decode.Decoded) else []

    def actor(self, a: Actor) -> Actor:
        if a.id.startswith("@"):
            return Actor(a.id)
        return Actor(f"@{self.encode.ghost_localpart('civic_', a.id)}:{self.server}")

    def ids_of(self, native: Any) -> list[str]:
        if "state_key" in native:  # a state event sent again changes no state
            return [native["type"], native["state_key"], orjson.dumps(native["content"]).decode()]
        return [native["event_id"]]


class ActivityPubHarness(Harness):
    """The ActivityPub adapter's hosted group with one follower on another
    server: what the group announces to it (the deliveries it queues), the
    shared activity read back as that server would."""

    name = "activitypub"
    base = "https://gw.example"
    group = "lobby"
    follower = "https://social.example/users/f"

    def __init__(self) -> None:
        from adapters.activitypub import decode, encode
        self.encode, self._decode = encode, decode
        self.urls = encode.Urls(self.base)

    @property
    def known(self) -> str:  # type: ignore[override]
        return self.urls.note("known-1")

    def person(self, n: int) -> str:
        return f"cga_{n:04x}" if n != 2 else "https://social.example/users/bob"  # person 2 lives on the fediverse

    async def build(self) -> Adapter:
        from adapters.activitypub import signatures
        from adapters.activitypub.adapter import ActivityPubAdapter
        from adapters.activitypub.config import ActivityPubConfig
        adapter = ActivityPubAdapter(context("ap", ActivityPubConfig(base_url=self.base), (self.group,)))
        adapter._key = _ap_key(signatures)  # type: ignore[attr-defined]
        await adapter.ctx.state.put({
            f"follower:{self.group}:{self.follower}": orjson.dumps({"inbox": self.follower + "/inbox"}),
            "note:known-1": orjson.dumps({"group": self.group, "doc": {"attributedTo": self.urls.person("cga_0001")}}),
        })
        queued: list[Any] = []

        async def send_own(followups: Sequence[Any]) -> None:  # AdapterContext.send: the gateway's outbox
            queued.extend(followups)

        async def actor(url: str) -> dict[str, Any]:  # every fediverse person is on social.example
            return {"id": url, "type": "Person", "inbox": url + "/inbox"}

        adapter.ctx.send = send_own
        adapter.remote.actor = actor  # type: ignore[method-assign]
        adapter._queued = queued  # type: ignore[attr-defined]
        return adapter

    async def send(self, adapter: Adapter, d: Delivery) -> Sent:
        """What reaches the follower's server: the deliveries the adapter hands
        the gateway's outbox (its result's follow-ups and ``ctx.send``), one
        signed POST each."""
        from adapters.activitypub import outbound
        queued = adapter._queued  # type: ignore[attr-defined]
        before = len(queued)
        result = await adapter.deliver([d])
        posts = [*queued[before:], *result.followups]
        return Sent([orjson.loads(outbound.decode_post(f.body).body) for f in posts], result)

    def decode(self, adapter: Adapter, native: Any) -> list[Inbound]:
        inner = native["object"] if native.get("type") == "Announce" else native
        author_of = None
        if inner.get("type") == "Delete":  # the adapter looks up who wrote what is deleted
            author_of = self.urls.person("cga_0001") if inner["object"]["id"] == self.known else None
        got = self._decode.decode_activity({**inner, "object": _ap_object(inner)}, platform=adapter.name,
                                           author_of=author_of)
        if not isinstance(got, self._decode.Decoded):
            return []
        return [Inbound(platform=adapter.name, group=GroupId(self.group), event_id=EventId(i.event_id), type=i.type,
                        payload=i.payload, time=NOW) for i in got.items]

    def actor(self, a: Actor) -> Actor:
        return Actor(self.encode.person_url(self.urls, a))

    def ids_of(self, native: Any) -> list[str]:
        inner = native["object"]
        return [native["id"], inner["id"] if isinstance(inner, dict) else ""]


def _ap_object(activity: dict[str, Any]) -> Any:
    """A Delete's tombstone as the id it names (as servers send it)."""
    obj = activity.get("object")
    return obj["id"] if activity.get("type") == "Delete" and isinstance(obj, dict) else obj


_AP_KEY: list[Any] = []


def _ap_key(signatures: Any) -> Any:
    if not _AP_KEY:  # RSA key generation is slow: one for the module
        _AP_KEY.append(signatures.generate_rsa_key())
    return _AP_KEY[0]


HARNESSES = [WebhookHarness(), MqttHarness("structured"), MqttHarness("binary"), FakeHarness(), MatrixHarness(),
             ActivityPubHarness()]


# -- one delivery of every event type ------------------------------------------------------------

def samples(h: Harness) -> dict[str, Delivery]:
    """A delivery of each event type, with every field an adapter could drop set."""
    ann = Actor(h.person(1), name="Ann")  # the author of ``h.known``
    mod = Actor(h.person(3), name="Mo")
    payloads: dict[str, Any] = {
        "civic.message.created": Message(id="gw-new-1", author=ann, text="Hello, neighbours",
                                         html="<p>Hello, <em>neighbours</em></p>", warning="moving house",
                                         reply_to=h.known),
        "civic.message.edited": Message(id=h.known, author=ann, text="Hello again", warning="moving house"),
        "civic.message.deleted": MessageDeletion(id=h.known),
        "civic.reaction.added": Reaction(message=h.known, author=ann, key="🎉"),
        "civic.reaction.removed": Reaction(message=h.known, author=ann, key="🎉"),
        "civic.membership.changed": Membership(member=Actor(h.person(2)), state="banned", by=mod, reason="spam"),
        "civic.moderation.action": ModerationAction(action="remove_message", message=h.known, member=ann, by=mod,
                                                    reason="off topic"),
        "civic.report.filed": Report(category="spam", message=h.known, member=Actor(h.person(2)),
                                     text="selling things"),
        "civic.profile.updated": ProfileUpdate(actor=Actor(h.person(1), name="Ann B.")),
        "civic.account.moved": AccountMove(actor=ann, target=AccountRef(platform="other", id="ann@other")),
    }
    assert set(payloads) == set(EVENT_TYPES)
    return {t: Delivery(event_id=EventId(f"ev-{i}"), group=GroupId(h.group), type=t, payload=p, time=NOW,
                        origin=PlatformName("elsewhere")) for i, (t, p) in enumerate(payloads.items())}


SETUP = {"civic.reaction.removed": "civic.reaction.added"}
"""An event that needs another first (a reaction can be removed once it was added)."""


async def deliver(h: Harness, adapter: Adapter, type_: str) -> tuple[Delivery, Sent]:
    ds = samples(h)
    if type_ in SETUP:
        await h.send(adapter, ds[SETUP[type_]])
    return ds[type_], await h.send(adapter, ds[type_])


def by_name(hs: Sequence[Harness]) -> Any:
    return pytest.mark.parametrize("h", hs, ids=[h.name for h in hs])


ROUND_TRIPS = [(h, t) for h in HARNESSES for t in EVENT_TYPES]


# -- the declarations are well-formed ------------------------------------------------------------

@by_name(HARNESSES)
def test_declarations_name_only_schema_types_and_fields(h: Harness) -> None:
    carries, degradations = h.encode.CARRIES, h.encode.DEGRADATIONS
    assert set(carries) <= set(EVENT_TYPES)
    for type_, fields in degradations.items():
        assert type_ in carries, f"{h.name}: a degradation of {type_}, which it does not carry"
        assert set(fields) <= set(EVENT_TYPES[type_].__struct_fields__), fields
        assert all(isinstance(why, str) and why for why in fields.values()), "say why each field changes"


# -- round trip ------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,type_", ROUND_TRIPS, ids=[f"{h.name}-{t.removeprefix('civic.')}" for h, t in ROUND_TRIPS])
async def test_round_trip(h: Harness, type_: str) -> None:
    adapter = await h.build()
    d, sent = await deliver(h, adapter, type_)
    back = [i for n in sent.natives for i in h.decode(adapter, n) if i.type == type_]
    if type_ not in h.encode.CARRIES:
        assert not back, f"{h.name} carries {type_} but CARRIES leaves it out: declare it"
        return
    assert back, f"{h.name} says it carries {type_}, but nothing it emitted decodes as one"
    assert back[0].group == d.group
    expected = h.expected(d, sent)
    changed = {f for f in expected.__struct_fields__ if getattr(expected, f) != getattr(back[0].payload, f)}
    declared = set(h.encode.DEGRADATIONS.get(type_, {}))
    assert changed - declared == set(), (f"{h.name} {type_}: undeclared loss in {sorted(changed - declared)}: "
                                         f"sent {expected}, got {back[0].payload}")
    assert declared - changed == set(), f"{h.name} {type_}: declared {sorted(declared - changed)}, which round-trip"


# -- capabilities ----------------------------------------------------------------------------------

def _text(sent: Sent) -> str:
    out = []
    for n in sent.natives:
        if isinstance(n, tuple):
            out.append(n[1].decode())
        elif hasattr(n, "payload"):
            out.append(n.payload.decode() + repr(n.user_properties))
        else:
            out.append(orjson.dumps(n).decode())
    return "\n".join(out)


LACKING = [FakeHarness(html=False, content_warning="first_line", reactions=False, edits=False, threads=False)]


@by_name(HARNESSES + LACKING)
async def test_a_content_warning_is_never_dropped(h: Harness) -> None:
    adapter = await h.build()
    for type_ in ("civic.message.created", "civic.message.edited"):
        d, sent = await deliver(h, adapter, type_)
        assert sent.natives and "moving house" in _text(sent), f"{h.name} dropped the warning of {type_}"
        back = [i.payload for n in sent.natives for i in h.decode(adapter, n) if isinstance(i.payload, Message)]
        if adapter.capabilities.content_warning == "native":
            assert back and back[0].warning == "moving house"
        else:
            assert back and back[0].text.startswith("CW: moving house\n") and back[0].warning is None


@by_name(HARNESSES + LACKING)
async def test_what_capabilities_lack_is_never_emitted(h: Harness) -> None:
    adapter = await h.build()
    caps: Capabilities = adapter.capabilities
    assert 1 <= caps.batch_max
    _, sent = await deliver(h, adapter, "civic.message.created")
    assert ("<em>" in _text(sent)) == caps.html, f"{h.name}: html={caps.html}, but HTML was {'not ' * caps.html}sent"
    _, sent = await deliver(h, adapter, "civic.reaction.added")
    assert ("🎉" in _text(sent) or "\\ud83c\\udf89" in _text(sent)) == caps.reactions
    d, sent = await deliver(h, adapter, "civic.message.edited")
    edits = [i for n in sent.natives for i in h.decode(adapter, n) if i.type == "civic.message.edited"]
    assert bool(edits) == caps.edits
    if not caps.edits:  # a correction instead, never nothing
        posts = [i.payload for n in sent.natives for i in h.decode(adapter, n) if i.type == "civic.message.created"]
        assert posts and "Hello again" in posts[0].text
    threaded = msgspec.structs.replace(samples(h)["civic.message.created"], event_id=EventId("ev-thread"))
    threaded = msgspec.structs.replace(threaded, payload=msgspec.structs.replace(threaded.payload, reply_to=None,
                                                                                thread=h.known))
    sent = await h.send(adapter, threaded)
    back = [i.payload for n in sent.natives for i in h.decode(adapter, n) if i.type == "civic.message.created"]
    assert back and (back[0].thread == h.known) == caps.threads
    if not caps.threads:
        assert back[0].reply_to == h.known  # kept as what it replies to


# -- redelivery ------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,type_", ROUND_TRIPS, ids=[f"{h.name}-{t.removeprefix('civic.')}" for h, t in ROUND_TRIPS])
async def test_redelivery_is_recognisable_and_decoding_is_stable(h: Harness, type_: str) -> None:
    adapter = await h.build()
    d, first = await deliver(h, adapter, type_)
    again = await h.send(adapter, d)
    assert again.result == first.result, "the same delivery made other native ids"
    if type_ not in h.encode.CARRIES:
        return
    assert bool(again.natives) == bool(first.natives)
    seen = {tuple(h.ids_of(n)) for n in first.natives}
    assert all(tuple(h.ids_of(n)) in seen for n in again.natives), \
        f"{h.name}: a repeat of {d.event_id} cannot be recognised as one"
    for n in first.natives:
        assert [i.event_id for i in h.decode(adapter, n)] == [i.event_id for i in h.decode(adapter, n)]


# -- no engagement counters --------------------------------------------------------------------------

COUNTERS = ("likes", "like_count", "likesCount", "favourites_count", "reblogs_count", "shares", "sharesCount",
            "followers_count", "followersCount", "following_count", "replies_count", "repliesCount", "views",
            "totalItems")


@by_name(HARNESSES)
async def test_no_engagement_counters_in_anything_emitted(h: Harness) -> None:
    adapter = await h.build()
    for type_ in EVENT_TYPES:
        _, sent = await deliver(h, adapter, type_)
        text = _text(sent)
        for word in COUNTERS:
            assert f'"{word}"' not in text, f"{h.name} emitted {word} with {type_}"


# -- the fake's own promises: failures on demand, ids of its own, events posted in -----------------------

async def test_the_fake_fails_as_told_then_delivers() -> None:
    h = FakeHarness()
    adapter = await h.build()
    d = samples(h)["civic.message.created"]
    adapter.platform.fail_next(2, retry_after=3)  # type: ignore[attr-defined]
    adapter.platform.fail_next(1, permanent=True)  # type: ignore[attr-defined]
    for error in (TransientDeliveryError, TransientDeliveryError, PermanentDeliveryError):
        with pytest.raises(error):
            await adapter.deliver([d])
    assert adapter.platform.sent == []  # type: ignore[attr-defined]
    result = await adapter.deliver([d])
    assert result.ids == {"gw-new-1": "fk:1"}


async def test_native_events_posted_to_the_fake_reach_ingest() -> None:
    got: list[Inbound] = []

    async def ingest(batch: Sequence[Inbound]) -> IngestResult:
        got.extend(batch)
        return IngestResult(accepted=len(batch), duplicates=0)

    from adapters.fake.adapter import FakeAdapter
    from adapters.fake.config import FakeConfig
    from gateway.errors import DecodeError
    adapter = FakeAdapter(msgspec.structs.replace(context("fk", FakeConfig()), ingest=ingest))
    await adapter.receive({"op": "post", "id": "fk:9", "room": "lobby", "at": 5.0,
                           "data": {"msg": "fk:9", "by": {"id": "ann"}, "text": "hi", "cw": "w"}})
    assert [(i.event_id, i.group, i.type, i.payload.warning, i.time) for i in got] == [
        ("fk:9", "lobby", "civic.message.created", "w", 5.0)]
    with pytest.raises(DecodeError) as caught:
        await adapter.receive({"op": "post", "id": "fk:10", "room": "lobby", "data": {"likes": 3}})
    assert caught.value.field == "$.data" and len(got) == 1  # nothing of a bad batch is stored
