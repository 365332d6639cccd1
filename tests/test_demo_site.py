"""The demo community site (gateway.demo.site) is a real webhook client: it
checks signatures, applies and de-duplicates what the gateway sends, answers
with its own ids, and sends correctly signed CloudEvents with its own ids."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from adapters.webhook.signing import SignatureError, secret_key, sign, verify
from gateway.demo.site import make_site_app
from schemas.cloudevents import BATCH_CONTENT_TYPE, CONTENT_TYPE, batch_decoder, event_type, single_decoder

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
KEY = secret_key(SECRET)


def created(event_id: str, message_id: str, text: str, **data: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id, "source": "urn:civic-gateway", "type": "civic.message.created",
            "subject": "oost", "civicorigin": "pubhubs",
            "data": {"id": message_id, "author": {"id": "cga_1", "name": "Dr. Meijer", "identity": "identified"},
                     "text": text, **data}}


def signed(body: bytes, *, key: bytes = KEY, ts: int | None = None, msg_id: str = "msg_1",
           content_type: str = CONTENT_TYPE) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {"content-type": content_type, "webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(key, msg_id, ts, body)}


async def timeline(client: TestClient) -> list[dict[str, Any]]:
    resp = await client.get("/api/messages")
    assert resp.status == 200
    return (await resp.json())["timeline"]


async def messages(client: TestClient) -> list[dict[str, Any]]:
    return [e for e in await timeline(client) if e["kind"] == "message"]


@pytest.fixture
async def site() -> AsyncIterator[TestClient]:
    # Nothing listens at the gateway address: these tests only look at the inbox.
    app = make_site_app(title="Buurtnet Oost", platform="buurt", group="oost", gateway_url="http://127.0.0.1:9",
                        secret=SECRET, theme="neighbourhood")
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def test_page_renders_with_title_and_theme(site: TestClient) -> None:
    resp = await site.get("/")
    page = await resp.text()
    assert resp.status == 200 and "<title>Buurtnet Oost</title>" in page and 'class="neighbourhood"' in page
    assert "/api/messages" in page and "http" + "s://" not in page  # polls its own API, loads nothing external


@pytest.mark.parametrize("case", ["wrong key", "stale timestamp", "tampered body", "no signature"])
async def test_badly_signed_inbox_post_is_refused_and_nothing_stored(site: TestClient, case: str) -> None:
    body = json.dumps(created("cge_1", "cgm_1", "hello")).encode()
    headers = signed(body)
    if case == "wrong key":
        headers = signed(body, key=os.urandom(24))
    elif case == "stale timestamp":
        headers = signed(body, ts=int(time.time()) - 600)
    elif case == "tampered body":
        body = body.replace(b"hello", b"HELLO")
    else:
        del headers["webhook-signature"]
    resp = await site.post("/civic/inbox", data=body, headers=headers)
    assert resp.status == 401
    assert await timeline(site) == []
    # The same event signed properly is then applied: the refusal did not mark it as seen.
    good = json.dumps(created("cge_1", "cgm_1", "hello")).encode()
    assert (await site.post("/civic/inbox", data=good, headers=signed(good))).status == 200
    assert [m["text"] for m in await messages(site)] == ["hello"]


async def test_signed_created_event_is_applied_and_answered_with_own_id(site: TestClient) -> None:
    body = json.dumps(created("cge_1", "cgm_1", "Welcome, neighbours!", warning="long post")).encode()
    resp = await site.post("/civic/inbox", data=body, headers=signed(body))
    assert resp.status == 200
    ids = (await resp.json())["ids"]
    assert list(ids) == ["cgm_1"] and ids["cgm_1"].startswith("buurt-")
    [msg] = await messages(site)
    assert msg["id"] == ids["cgm_1"]
    assert (msg["text"], msg["warning"], msg["origin"]) == ("Welcome, neighbours!", "long post", "pubhubs")
    assert msg["author"] == {"id": "cga_1", "name": "Dr. Meijer", "identity": "identified"}


async def test_batch_uses_own_ids_for_later_references(site: TestClient) -> None:
    events = [created("cge_1", "cgm_1", "first"),
              created("cge_2", "cgm_2", "a reply", reply_to="cgm_1"),
              {"specversion": "1.0", "id": "cge_3", "source": "urn:civic-gateway", "type": "civic.reaction.added",
               "subject": "oost", "data": {"message": "cgm_1", "author": {"id": "anon_x", "identity": "anonymous"},
                                           "key": "👍"}}]
    body = json.dumps(events).encode()
    resp = await site.post("/civic/inbox", data=body, headers=signed(body, content_type=BATCH_CONTENT_TYPE))
    ids = (await resp.json())["ids"]
    assert resp.status == 200 and set(ids) == {"cgm_1", "cgm_2"} and ids["cgm_1"] != ids["cgm_2"]
    first, reply = await messages(site)
    assert reply["reply_to"] == first["id"] == ids["cgm_1"]
    assert first["reactions"] == ["👍"]  # a list of emoji, never a count


async def test_repeated_cloudevent_id_is_ignored(site: TestClient) -> None:
    first = json.dumps(created("cge_1", "cgm_1", "hello")).encode()
    r1 = await site.post("/civic/inbox", data=first, headers=signed(first, msg_id="msg_1"))
    # A redelivery after a crash carries the same event id; even different content must not apply.
    again = json.dumps(created("cge_1", "cgm_1", "hello")).encode()
    other = json.dumps(created("cge_1", "cgm_9", "something else")).encode()
    r2 = await site.post("/civic/inbox", data=again, headers=signed(again, msg_id="msg_2"))
    r3 = await site.post("/civic/inbox", data=other, headers=signed(other, msg_id="msg_3"))
    assert r1.status == r2.status == r3.status == 200
    ids = (await r1.json())["ids"]
    assert (await r2.json())["ids"] == ids  # the same answer, so the gateway can still record the mapping
    assert (await r3.json())["ids"] == ids
    assert [m["text"] for m in await messages(site)] == ["hello"]
    edit = {**created("cge_1", "cgm_1", "edited?"), "type": "civic.message.edited"}
    body = json.dumps(edit).encode()
    assert (await site.post("/civic/inbox", data=body, headers=signed(body))).status == 200
    assert [m["text"] for m in await messages(site)] == ["hello"]


async def test_posting_through_the_page_sends_a_signed_cloudevent_with_own_ids() -> None:
    received: list[tuple[str, dict[str, Any]]] = []
    arrived = asyncio.Event()

    async def capture(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(KEY, request.headers.get("webhook-id"), request.headers.get("webhook-timestamp"),
                   request.headers.get("webhook-signature"), body, time.time())
        except SignatureError:
            return web.json_response({"error": "bad signature"}, status=401)
        # The body must be valid against the schema, single or batch.
        decoded = ([single_decoder.decode(body)] if request.content_type == CONTENT_TYPE
                   else batch_decoder.decode(body))
        assert request.content_type in (CONTENT_TYPE, BATCH_CONTENT_TYPE)
        raw = json.loads(body)
        for ev, obj in zip(raw if isinstance(raw, list) else [raw], decoded, strict=True):
            received.append((request.match_info["platform"], ev))
            assert ev["type"] == event_type(obj)
        arrived.set()
        return web.json_response({"accepted": len(decoded), "duplicates": 0}, status=202)

    gateway = web.Application()
    gateway.router.add_post("/v1/platforms/{platform}/events", capture)
    async with TestServer(gateway, host="127.0.0.1") as gw:
        app = make_site_app(title="Lotgenoten", platform="patients", group="lounge",
                            gateway_url=str(gw.make_url("/")), secret=SECRET, theme="patients")
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            body = json.dumps(created("cge_1", "cgm_77", "How was everyone's week?")).encode()
            ids = (await (await client.post("/civic/inbox", data=body, headers=signed(body))).json())["ids"]
            resp = await client.post("/api/messages", json={
                "name": "Piet", "identity": "anonymous", "text": "Better, thanks.",
                "warning": "hospital stay", "reply_to": ids["cgm_77"]})
            assert resp.status == 201
            own_id = (await resp.json())["id"]

            async def until_message() -> None:
                while not any(ev["type"] == "civic.message.created" for _, ev in received):
                    arrived.clear()
                    await arrived.wait()

            await asyncio.wait_for(until_message(), 5)

    assert {p for p, _ in received} == {"patients"}
    [msg] = [ev for _, ev in received if ev["type"] == "civic.message.created"]
    assert msg["subject"] == "lounge" and msg["specversion"] == "1.0" and msg["source"].startswith("urn:")
    data = msg["data"]
    assert data["id"] == own_id and own_id.startswith("patients-")
    assert data["reply_to"] == ids["cgm_77"]  # the site's own id, not the gateway's
    assert data["author"] == {"id": "user:Piet", "identity": "anonymous"}  # an anonymous name is not sent
    assert (data["text"], data["warning"], data["sensitive"]) == ("Better, thanks.", "hospital stay", True)
    assert len({ev["id"] for _, ev in received}) == len(received)  # every event has its own id


async def test_edit_delete_and_reaction_are_sent_and_only_own_posts_change() -> None:
    received: list[dict[str, Any]] = []

    async def capture(request: web.Request) -> web.Response:
        body = await request.read()
        verify(KEY, request.headers.get("webhook-id"), request.headers.get("webhook-timestamp"),
               request.headers.get("webhook-signature"), body, time.time())
        raw = json.loads(body)
        received.extend(raw if isinstance(raw, list) else [raw])
        return web.json_response({"accepted": 1, "duplicates": 0}, status=202)

    gateway = web.Application()
    gateway.router.add_post("/v1/platforms/{platform}/events", capture)
    async with TestServer(gateway, host="127.0.0.1") as gw:
        app = make_site_app(title="Buurt", platform="buurt", group="oost", gateway_url=str(gw.make_url("/")),
                            secret=SECRET, theme="neighbourhood")
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            anja = {"name": "Anja", "identity": "pseudonymous"}
            mid = (await (await client.post("/api/messages", json={**anja, "text": "v1"})).json())["id"]
            other = await client.put(f"/api/messages/{mid}", json={"name": "Bram", "identity": "pseudonymous",
                                                                   "text": "hijack"})
            assert other.status == 403
            assert (await client.put(f"/api/messages/{mid}", json={**anja, "text": "v2"})).status == 200
            assert (await (await client.post(f"/api/messages/{mid}/reactions", json=anja)).json())["added"] is True
            assert (await client.delete(f"/api/messages/{mid}", json=anja)).status == 200
            assert await messages(client) == []
            for _ in range(100):
                if len(received) >= 5:
                    break
                await asyncio.sleep(0.05)
    assert [e["type"] for e in received] == ["civic.membership.changed", "civic.message.created",
                                             "civic.message.edited", "civic.reaction.added",
                                             "civic.message.deleted"]
    for e in received:
        single_decoder.decode(json.dumps(e))
    assert received[2]["data"]["text"] == "v2" and received[2]["data"]["id"] == mid
    assert received[3]["data"] == {"message": mid, "author": {"id": "user:Anja", "identity": "pseudonymous",
                                                              "name": "Anja"}, "key": "👍"}
    assert received[4]["data"]["id"] == mid
