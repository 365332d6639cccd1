"""Hostile fields and numbers in the core (issue 11): every text field of the
common schema is cleaned the same way on entry, whatever platform it came from
(``Pipeline.prepare`` -> ``gateway.sanitize.clean_payload``); a time no target
can write is bounded on entry; and an event that cannot be encoded for its
target anyway is a dead letter at once, never a retry loop.

Webhook sites are real (a gateway and sites on 127.0.0.1); ActivityPub and
Matrix events are decoded by their adapters' own decoders and go through the
same preparation and the webhook encoder a site receives."""

from __future__ import annotations

import re
import time
import unicodedata
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.activitypub import decode as AP
from adapters.matrix import decode as MX
from adapters.webhook import encode as WH
from gateway.adapter import Delivery, Inbound
from gateway.ids import EventId, GroupId, PlatformName
from gateway.pipeline import Pipeline
from gateway.router import Router
from gateway.sanitize import clean_line, clean_payload, clean_text
from schemas.cloudevents import LATEST_TIME, parse_time
from schemas.v1 import (
    AccountMove,
    AccountRef,
    Actor,
    Attachment,
    Membership,
    Message,
    MessageDeletion,
    ModerationAction,
    ProfileUpdate,
    Reaction,
    Report,
)
from tests.conftest import start_net, stop_net
from tests.sitekit import wait_for

NASTY = "\x00N\x1b[2J\x07U\r\nL\x85L\x9b\x7f\tX\u2028Y"
"""NUL, an ESC sequence, BEL, CRLF, NEL and CSI (C1), DEL, a tab, a line separator."""
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
BREAKS = re.compile(r"[\r\n\t\u2028\u2029]")


def pipeline(now: float = 1_700_000_000.0) -> Pipeline:
    return Pipeline(Router([]), {}, b"k" * 32, clock=lambda: now)


def inbound(payload: Any, etype: str = "civic.message.created", t: float = 1_700_000_000.0) -> Inbound:
    return Inbound(PlatformName("p"), GroupId("g"), EventId("e1"), etype, payload, t)


def single_line_fields(obj: Any) -> list[str]:
    """Every value of a one-line text field anywhere in a payload as a site gets it (JSON)."""
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and k in ("name", "title", "warning", "reason", "key", "until", "url", "language"):
                out.append(v)
            else:
                out.extend(single_line_fields(v))
    elif isinstance(obj, list):
        for v in obj:
            out.extend(single_line_fields(v))
    return out


ID_KEYS = frozenset({"id", "message", "reply_to", "thread"})


def strings(obj: Any) -> list[str]:
    """Every text value in a payload as JSON, ids left out (decoders refuse bad ids; nothing cleans them)."""
    if isinstance(obj, dict):
        return [s for k, v in obj.items() if k not in ID_KEYS for s in strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return [obj] if isinstance(obj, str) else []


def as_site_gets_it(ev: Inbound) -> dict[str, Any]:
    """The CloudEvent a webhook site receives for ``ev`` (ids as they are)."""
    d = Delivery(ev.event_id, ev.group, ev.type, ev.payload, ev.time, ev.platform)
    _, body = WH.request("https://gw.example", b"k" * 32, [d], int(time.time()))
    return orjson.loads(body)


def assert_clean(event: dict[str, Any]) -> None:
    for s in strings(event["data"]):
        assert not CONTROL.search(s), s
    for s in single_line_fields(event["data"]):
        assert not BREAKS.search(s), s


# -- the cleaning itself --------------------------------------------------------------------------------
def test_one_line_and_multi_line_cleaning() -> None:
    assert clean_line(NASTY) == "N[2JU LL X Y"
    assert clean_text(NASTY) == "N[2JU\nLL\tX\u2028Y"
    assert clean_text("a\rb\r\nc") == "a\nb\nc"
    plain = "Zoë 🎉 — ok"
    assert clean_line(plain) is plain and clean_text(plain) is plain


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_cleaned_text_holds_no_control_character_and_a_line_no_break(s: str) -> None:
    line, text = clean_line(s), clean_text(s)
    assert not CONTROL.search(line) and not BREAKS.search(line)
    assert not CONTROL.search(text) and "\r" not in text
    # nothing printable is lost
    keep = [c for c in s if unicodedata.category(c)[0] not in "CZ"]
    assert [c for c in line if unicodedata.category(c)[0] not in "CZ"] == keep


def test_every_text_field_of_every_payload_type_is_cleaned_and_ids_are_left_alone() -> None:
    who = Actor(id="native\x00id", name=NASTY)
    payloads = [
        Message(id="m\x00", author=who, text=NASTY, html=f"<p>{NASTY}</p>", title=NASTY, warning=NASTY,
                mentions=(who,), attachments=(Attachment(url="https://x.example/a\r\n.png", media_type="image/png",
                                                         alt=NASTY, name=NASTY),), language="nl\x00"),
        MessageDeletion(id="m", by=who, reason=NASTY),
        Reaction(message="m", author=who, key="\x1b+1\n"),
        Membership(member=who, state="kicked", by=who, reason=NASTY),
        ModerationAction(action="ban", member=who, by=who, reason=NASTY, until="2030\r\n"),
        Report(category="spam", member=who, text=NASTY, reporter=who),
        ProfileUpdate(actor=who, also_known_as=(AccountRef(platform="p", id="x", name=NASTY),)),
        AccountMove(actor=who, target=AccountRef(platform="p", id="x", name=NASTY)),
    ]
    for p in payloads:
        cleaned = msgspec.to_builtins(clean_payload(p))
        assert_clean({"data": cleaned})
        assert b"native\\u0000id" in orjson.dumps(cleaned)  # an id names something: not changed here
    m = clean_payload(payloads[0])
    assert m.text == "N[2JU\nLL\tX\u2028Y" and m.author.name == "N[2JU LL X Y" and m.title == m.author.name
    assert m.attachments[0].url == "https://x.example/a.png" and m.attachments[0].alt == m.text
    assert m.html == "<p>N[2JU\nLL\tX\u2028Y</p>"
    # a name of nothing but control characters is no name
    assert clean_payload(Actor(id="a", name="\x00\x1b")) == Actor(id="a")


def test_a_clean_payload_is_passed_through_untouched() -> None:
    p = Message(id="m", author=Actor(id="a", name="Ann"), text="line one\nline two", title="T",
                attachments=(Attachment(url="https://x.example/a.png", media_type="image/png", name="a.png"),))
    assert clean_payload(p) is p
    ev = inbound(p)
    assert pipeline().prepare(ev) is ev


@pytest.mark.parametrize("t", [2**64 / 1000, 1e305, -1.0, float("nan"), float("inf"), LATEST_TIME + 1])
def test_a_time_no_target_can_write_becomes_the_time_received(t: float) -> None:
    ev = pipeline(now=1_234.0).prepare(inbound(Message(id="m", author=Actor(id="a"), text="x"), t=t))
    assert ev.time == 1_234.0
    as_site_gets_it(ev)  # encodes


def test_rfc3339_times_outside_the_bounds_are_not_taken() -> None:
    assert parse_time("9999-12-31T23:59:59-23:59", 5.0) == 5.0  # past year 9999 in UTC
    assert parse_time("0001-01-01T00:00:00+23:59", 5.0) == 5.0
    assert parse_time("2024-05-01T12:00:00Z", 5.0) == 1714564800.0


# -- from every platform: what the site receives ---------------------------------------------------------
def test_an_activitypub_note_reaches_a_site_with_clean_fields() -> None:
    note = {"id": "https://social.example/notes/1", "type": "Note", "attributedTo": "https://social.example/u/a",
            "name": NASTY, "summary": NASTY, "sensitive": True,
            "content": "<p>hi\x1b[31m\x00</p>", "to": AP.PUBLIC,
            "attachment": [{"type": "Image", "mediaType": "image/png", "url": "https://social.example/a.png",
                            "name": NASTY}]}
    activity = {"id": note["id"] + "#create", "type": "Create", "actor": "https://social.example/u/a",
                "object": note, "to": [AP.PUBLIC], "cc": "https://gw.example/ap/groups/buurt"}
    r = AP.decode_activity(activity, platform="fedi")
    ev = pipeline().prepare(inbound(r.payload, r.type))
    got = as_site_gets_it(ev)
    assert_clean(got)
    assert got["data"]["warning"] == "N[2JU LL X Y"
    assert got["data"]["attachments"][0]["alt"] == "N[2JU\nLL\tX\u2028Y"


def test_a_matrix_message_and_member_event_reach_a_site_with_clean_fields() -> None:
    common = {"sender": "@eve:hub.example", "room_id": "!r", "origin_server_ts": 1_700_000_000_000}
    events = [
        {**common, "type": "m.room.member", "event_id": "$m", "state_key": "@eve:hub.example",
         "content": {"membership": "join", "displayname": NASTY, "reason": NASTY}},
        {**common, "type": "m.room.message", "event_id": "$t",
         "content": {"msgtype": "m.text", "body": NASTY, "format": "org.matrix.custom.html",
                     "formatted_body": f'<span data-mx-spoiler="{NASTY}">{NASTY}</span>'}},
        {**common, "type": "m.room.message", "event_id": "$f",
         "content": {"msgtype": "m.image", "body": NASTY, "filename": "pic\x1b.png", "url": "mxc://hub.example/a"}},
        {**common, "type": "m.room.redaction", "event_id": "$r", "redacts": "$t", "content": {"reason": NASTY}},
    ]
    for event in events:
        r = MX.decode_event(event, bot_user="@bot:hub.example", ghost_prefix="civic_", server_name="hub.example")
        assert isinstance(r, MX.Decoded)
        got = as_site_gets_it(pipeline().prepare(inbound(r.payload, r.type)))
        assert_clean(got)
        assert NASTY not in orjson.dumps(got).decode()


# -- a real gateway between two webhook sites ------------------------------------------------------------
async def test_a_site_receives_clean_fields_whatever_another_site_sent(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"])
    try:
        sa = net.senders["a"]
        who = {"id": "alice", "name": NASTY}
        message = {"id": "m-1", "author": who, "text": NASTY, "html": f"<b>{NASTY}</b>", "title": NASTY,
                   "warning": NASTY, "attachments": [{"url": "https://files.example/a.pdf",
                                                      "media_type": "application/pdf", "name": NASTY, "alt": NASTY}]}
        status, body = await sa.send([sa.event("civic.message.created", "g-a", message)])
        assert status == 202, body
        status, body = await sa.send([sa.event("civic.membership.changed", "g-a",
                                               {"member": {"id": "bob", "name": NASTY}, "state": "kicked",
                                                "by": who, "reason": NASTY})])
        assert status == 202, body
        b = net.sites["b"]
        await wait_for(lambda: b.of_type("civic.message.created") and b.of_type("civic.membership.changed"),
                       what="both events at site b")
        for got in (b.of_type("civic.message.created")[0], b.of_type("civic.membership.changed")[0]):
            assert_clean(got)
        data = b.of_type("civic.message.created")[0]["data"]
        assert data["author"]["name"] == data["title"] == data["warning"] == "N[2JU LL X Y"
        assert data["text"] == "N[2JU\nLL\tX\u2028Y"
        assert data["attachments"][0]["name"] == "N[2JU LL X Y"
        assert b.of_type("civic.membership.changed")[0]["data"]["reason"] == "N[2JU LL X Y"
    finally:
        await stop_net(net)


async def test_a_time_past_year_9999_from_a_site_blocks_nothing(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"], batch_max=1)
    try:
        sa = net.senders["a"]
        late = sa.event("civic.message.created", "g-a", {"id": "m-late", "author": {"id": "a"}, "text": "late"})
        late["time"] = "9999-12-31T23:59:59-23:59"  # 10000-01-01 in UTC: RFC 3339 cannot write it
        status, body = await sa.send([late])
        assert status == 202, body
        status, body = await sa.send([sa.event("civic.message.created", "g-a",
                                               {"id": "m-next", "author": {"id": "a"}, "text": "next"})])
        assert status == 202, body
        b = net.sites["b"]
        await wait_for(lambda: len(b.of_type("civic.message.created")) == 2, what="both messages at site b")
        late_got = b.of_type("civic.message.created")[0]
        assert late_got["data"]["text"] == "late" and late_got["time"].startswith(time.strftime("%Y-", time.gmtime()))
        assert net.gw.metrics.retries.labels("b")._value.get() == 0
    finally:
        await stop_net(net)


# -- an event that cannot be encoded for its target -------------------------------------------------------
async def test_an_event_that_cannot_be_encoded_is_a_dead_letter_at_once_and_the_queue_goes_on(tmp_path: Path) -> None:
    """A row stored with a time no encoder can write (as a gateway before the
    bounds stored it, or any encoder's ValueError/OverflowError): dead-lettered
    with a clear error on the first attempt, alone in its batch."""
    net = await start_net(tmp_path, ["a", "b"], batch_max=5)
    try:
        gw = net.gw
        assert gw.pipeline is not None
        bad = [Inbound(PlatformName("a"), GroupId("g-a"), EventId(f"old-{i}"), "civic.message.created",
                       Message(id=f"old-{i}", author=Actor(id="a"), text=text), t)
               for i, (text, t) in enumerate([("fine before", 1_700_000_000.0), ("timed 2**64", 2**64 / 1000),
                                              ("fine after", 1_700_000_001.0)])]
        outcomes = await gw.store.transact(lambda tx: [gw.pipeline.apply(tx, e) for e in bad])  # type: ignore[union-attr]
        gw.hand_over([item for o in outcomes for item in o.items])
        b = net.sites["b"]
        await wait_for(lambda: len(b.of_type("civic.message.created")) == 2, what="the two good events")
        assert [e["data"]["text"] for e in b.of_type("civic.message.created")] == ["fine before", "fine after"]

        async with aiohttp.ClientSession() as s:
            async with s.get(f"{net.url}/admin/v1/dead-letters",
                             headers={"Authorization": f"Bearer {net.admin_token}"}) as r:
                assert r.status == 200
                [dead] = (await r.json())["dead_letters"]
        assert dead["data"]["text"] == "timed 2**64" and dead["platform"] == "b"
        assert dead["error"].startswith("cannot be encoded for b/g-b: ") and "out of range" in dead["error"]
        assert dead["attempts"] == 1
        assert gw.metrics.retries.labels("b")._value.get() == 0
        assert gw.metrics.dead_lettered.labels("b")._value.get() == 1

        # the queue goes on
        sa = net.senders["a"]
        status, _ = await sa.send([sa.event("civic.message.created", "g-a",
                                            {"id": "m-new", "author": {"id": "a"}, "text": "new"})])
        assert status == 202
        await wait_for(lambda: len(b.of_type("civic.message.created")) == 3, what="a later event")
    finally:
        await stop_net(net)


@pytest.mark.parametrize("where", ["id", "subject", "data.id", "data.author.id", "data.reply_to"])
@pytest.mark.parametrize("char", ["\x00", "\x1b", "\n", "\x85", "\x9b"])
def test_an_id_with_a_control_character_from_a_site_is_refused_naming_its_field(where: str, char: str) -> None:
    """Ids are never cleaned (they must match what the site knows), so one with
    a control character is refused at the door, as a 400 naming the field,
    instead of reaching a store that refuses it (PostgreSQL and NUL) on every retry."""
    from adapters.webhook.decode import decode_body
    from gateway.errors import DecodeError

    event: dict[str, Any] = {"specversion": "1.0", "type": "civic.message.created", "id": "e1", "source": "site",
                             "subject": "general", "data": {"id": "m1", "author": {"id": "u1", "name": "U"},
                                                            "text": "hi", "reply_to": "m0"}}
    node, key = event, where
    if "." in where:
        *path, key = where.split(".")
        for part in path:
            node = node[part]
    node[key] = "a" + char + "b"
    with pytest.raises(DecodeError) as err:
        decode_body("application/cloudevents+json", orjson.dumps(event))
    assert err.value.status == 400 and err.value.field == "$." + where
    node[key] = "a\u00e9\u200bb"  # other characters, printable or not, are the site's business
    assert decode_body("application/cloudevents+json", orjson.dumps(event))
