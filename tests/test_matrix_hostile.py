"""Hostile input on the Matrix path (issue 11): every refusal is a 4xx, and one
bad event never stops the others.

First the appservice endpoint alone, on 127.0.0.1, spoken to as an attacker
would (raw bytes where a client library would refuse to send them): a
transaction holding malformed events among good ones is answered 200, the
good events are taken, the bad ones counted by reason. Then the whole path
against the real Synapse harness (tests/synapse.py) with a real gateway and a
webhook site: the good events of such a transaction reach the site, an event
timed 2**64 blocks nothing, and a message whose attachment URL the address
guard refuses reaches the room at once without it, the degradation counted."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from adapters.matrix import decode as D
from adapters.matrix.config import MatrixConfig
from adapters.matrix.inbound import AppserviceInbound
from gateway.adapter import Inbound, IngestResult
from tests.services import free_port
from tests.test_matrix_e2e import Hub, by_type, hub, linked, site_msg, until  # noqa: F401 -- hub is a fixture

SERVER = "civic.test"
PREFIX = "/v1/platforms/hub"
TXN = PREFIX + "/_matrix/app/v1/transactions/"


def good(event_id: str, text: str, room: str = "!room", **extra: Any) -> dict[str, Any]:
    return {"type": "m.room.message", "sender": "@anna:civic.test", "room_id": room, "event_id": event_id,
            "origin_server_ts": 1_700_000_000_000, "content": {"msgtype": "m.text", "body": text}, **extra}


def hostile(room: str = "!room") -> dict[str, dict[str, Any]]:
    """One event of each kind that used to fail a whole transaction (500), by the reason it is refused for."""
    base = good("$x", "x", room)
    return {
        "content_list": {**base, "event_id": "$c1", "content": ["not", "an", "object"]},
        "unsigned_list": {**base, "event_id": "$c2", "unsigned": ["x"]},
        "room_number": {**base, "event_id": "$c3", "room_id": 42},
        "msgtype_list": {**base, "event_id": "$c4", "content": {"msgtype": ["m.text"], "body": "x"}},
        "msgtype_object": {**base, "event_id": "$c5", "content": {"msgtype": {"a": 1}, "body": "x"}},
        "event_id_list": {**base, "event_id": ["$c6"]},
        "event_id_object": {**base, "event_id": {"$c7": 1}},
        "nul_state_key": {**base, "event_id": "$c8", "type": "m.room.member", "state_key": "@a\x00:civic.test",
                          "content": {"membership": "join"}},
        "ts_2_64": {**base, "event_id": "$c9", "origin_server_ts": 2**64},
        "ts_1e308": {**base, "event_id": "$c10", "origin_server_ts": 1e308},
        "not_an_object": ["an", "event"],  # type: ignore[dict-item]
    }


EXPECTED_REASONS = {D.MALFORMED: 8, D.BAD_ID: 1, D.BAD_NUMBER: 2}


class Recorder:
    def __init__(self) -> None:
        self.events: list[Inbound] = []

    async def __call__(self, events: Any) -> IngestResult:
        self.events.extend(events)
        return IngestResult(accepted=len(events), duplicates=0)


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[AppserviceInbound, Recorder, int]]:
    port = free_port()
    config = msgspec.convert({"homeserver": "http://127.0.0.1:9", "server_name": SERVER,
                              "as_token": secrets.token_urlsafe(32), "hs_token": secrets.token_urlsafe(32),
                              "appservice_url": f"http://127.0.0.1:{port}{PREFIX}"}, MatrixConfig)
    recorder = Recorder()
    inbound = AppserviceInbound(recorder, config, "hub")
    app = web.Application()
    app.add_routes(inbound.routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield inbound, recorder, port
    finally:
        await runner.cleanup()


async def raw_request(port: int, head: bytes, body: bytes = b"") -> int:
    """The status of a request written byte by byte (a client library would refuse some of these headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\nHost: 127.0.0.1\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1])


async def put(port: int, txn: str, body: Any, token: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.put(f"http://127.0.0.1:{port}{TXN}{txn}", data=msgspec.json.encode(body),
                         headers={"Authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json(content_type=None)


# -- the endpoint alone -------------------------------------------------------------------------------------
async def test_bad_events_are_skipped_and_counted_by_reason_and_the_rest_taken(endpoint: Any) -> None:
    inbound, recorder, port = endpoint
    bad = hostile()
    events = [good("$first", "eerste"), *bad.values(), good("$last", "laatste")]
    status, body = await put(port, "t1", {"events": events}, inbound.config.hs_token)
    assert (status, body) == (200, {})
    assert [(e.event_id, e.payload.text) for e in recorder.events] == [("$first", "eerste"), ("$last", "laatste")]
    assert inbound.refused == EXPECTED_REASONS
    assert inbound.decode_errors == len(bad)
    assert inbound.transactions == 1


@pytest.mark.parametrize("name", sorted(hostile()))
async def test_a_transaction_of_one_bad_event_is_answered_200_and_stores_nothing(endpoint: Any, name: str) -> None:
    """Alone, too: a 4xx or 5xx would make the homeserver send it again for ever."""
    inbound, recorder, port = endpoint
    status, body = await put(port, "t-" + name, {"events": [hostile()[name]]}, inbound.config.hs_token)
    assert (status, body) == (200, {})
    assert recorder.events == [] and inbound.decode_errors == 1


@pytest.mark.parametrize("auth, expected", [
    (b"Bearer \xff\xfe\xfd", 403),  # not UTF-8
    (b"Bearer \xc3\x28", 403),      # an invalid UTF-8 sequence
    (b"Bearer tok\x80en", 403),
    (b"\xff\xfe \xff", 401),        # no Bearer scheme at all
])
async def test_an_authorization_header_that_is_not_utf8_is_refused_not_a_server_error(
        endpoint: Any, auth: bytes, expected: int) -> None:
    inbound, recorder, port = endpoint
    body = msgspec.json.encode({"events": [good("$forged", "forged")]})
    status = await raw_request(port, b"PUT " + TXN.encode() + b"t-auth HTTP/1.1\r\nAuthorization: " + auth, body)
    assert status == expected
    assert recorder.events == []
    # the right token, spelt in bytes the same way, gets in
    right = b"Bearer " + inbound.config.hs_token.encode()
    assert await raw_request(port, b"PUT " + TXN.encode() + b"t-auth HTTP/1.1\r\nAuthorization: " + right, body) == 200
    assert [e.event_id for e in recorder.events] == ["$forged"]


async def test_the_hooks_see_only_events_of_a_sane_shape(endpoint: Any) -> None:
    """The adapter's ``context`` and ``prepare`` callbacks read the events
    before decoding (redactions, power levels, member names): they get only
    the screened ones."""
    inbound, recorder, port = endpoint
    seen: list[Any] = []

    class Hooks:
        async def context(self, events: Any) -> dict[str, Any]:
            seen.extend(events)
            return {}

        async def prepare(self, events: Any, inbound: list[Inbound]) -> list[Inbound]:
            assert all(isinstance(e["content"], dict) for e in events)
            return inbound

    hooks = Hooks()
    inbound.context, inbound.prepare = hooks.context, hooks.prepare
    status, _ = await put(port, "t-hooks", {"events": [*hostile().values(), good("$ok", "ok")]},
                          inbound.config.hs_token)
    assert status == 200
    # a msgtype is the decoder's business: those two are refused there
    assert [e["event_id"] for e in seen] == ["$c4", "$c5", "$ok"]
    assert [e.event_id for e in recorder.events] == ["$ok"]



# -- the whole path: real Synapse, real gateway, a webhook site --------------------------------------------
def metric(net: Any, line: str) -> bool:
    return line in net.gw.metrics.render().decode()


async def put_to_gateway(hub: Hub, txn: str, events: list[Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.put(f"http://127.0.0.1:{hub.port}{TXN}{txn}", data=msgspec.json.encode({"events": events}),
                         headers={"Authorization": f"Bearer {hub.config.hs_token}"}) as r:
            return r.status, await r.json(content_type=None)


def site_texts(net: Any) -> list[str]:
    return [e["data"]["text"] for e in net.site_events("civic.message.created")]


async def test_a_transaction_with_bad_events_among_good_ones_is_taken_and_the_good_ones_reach_the_site(
        hub: Hub, tmp_path: Path) -> None:
    async with linked(hub, tmp_path) as net:
        room = net.room
        eve = {"sender": "@eve:civic.test", "room_id": room, "origin_server_ts": 1_700_000_000_000}
        events = [
            good("$good-1", "before the bad ones", room),
            *hostile(room).values(),
            {**eve, "type": "m.room.member", "event_id": "$eve-join", "state_key": "@eve:civic.test",
             "content": {"membership": "join", "displayname": "Eve\x1b[31m\r\nAdmin\x85"}},
            {**eve, "type": "m.room.message", "event_id": "$eve-says",
             "content": {"msgtype": "m.text", "body": "one\r\ntwo\x00\x1b[2J"}},
            good("$good-2", "after the bad ones", room),
        ]
        status, body = await put_to_gateway(hub, "hostile-" + secrets.token_hex(4), events)
        assert (status, body) == (200, {})
        await until(lambda: len(site_texts(net)) == 3, what="the three good messages at the site")
        assert site_texts(net) == ["before the bad ones", "one\ntwo[2J", "after the bad ones"]
        said = net.site_events("civic.message.created")[1]["data"]
        assert said["author"]["name"] == "Eve[31m Admin"
        for reason, n in EXPECTED_REASONS.items():
            assert metric(net, f'civic_matrix_events_refused_total{{platform="hub",reason="{reason}"}} {n}.0'), reason

        # and Synapse's own transactions go on as before
        await net.send(hub.alice, {"msgtype": "m.text", "body": "from the real room"})
        await until(lambda: site_texts(net)[-1:] == ["from the real room"], what="a later message from Synapse")
        assert [t for t in site_texts(net) if t in ("x",)] == []


async def test_an_event_timed_2_64_blocks_no_later_message(hub: Hub, tmp_path: Path) -> None:
    async with linked(hub, tmp_path) as net:
        doomed = good("$doomed", "timed 2**64", net.room, origin_server_ts=2**64)
        status, _ = await put_to_gateway(hub, "ts-" + secrets.token_hex(4), [doomed])
        assert status == 200  # refused, not answered with an error the homeserver would resend for ever
        for text in ("one", "two", "three"):
            await net.send(hub.alice, {"msgtype": "m.text", "body": text})
        await until(lambda: len(site_texts(net)) == 3, what="the later messages at the site")
        assert site_texts(net) == ["one", "two", "three"]
        assert metric(net, 'civic_matrix_events_refused_total{platform="hub",reason="bad_number"} 1.0')
        assert net.gw.metrics.retries.labels("site")._value.get() == 0


async def test_a_refused_attachment_url_leaves_the_message_at_once_without_it(hub: Hub, tmp_path: Path) -> None:
    """``127.1``, ``2130706433`` and ``0177.0.0.1`` are 127.0.0.1 (where a file
    server listens); the guard refuses each, so the message goes without them,
    naming them, and is not retried."""
    served: list[str] = []

    async def pic(request: web.Request) -> web.Response:
        served.append(request.path)
        return web.Response(body=b"\x89PNG\r\n\x1a\n", content_type="image/png")

    files = web.Application()
    files.router.add_get("/{name}", pic)
    runner = web.AppRunner(files, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with linked(hub, tmp_path) as net:
            s = net.sender
            atts = [{"url": f"http://{host}:{port}/{name}", "media_type": "image/png", "name": name}
                    for host, name in (("127.1", "short.png"), ("2130706433", "decimal.png"),
                                       ("0177.0.0.1", "octal.png"))]
            status, body = await s.send([s.event("civic.message.created", "g-site",
                                                 site_msg("p-1", "three pictures", attachments=atts))])
            assert status == 202, body

            async def ghost_texts() -> list[dict[str, Any]]:
                return [e for e in by_type(await net.events(hub.alice), "m.room.message")
                        if e["sender"].startswith("@civic_")]
            [got] = await until(ghost_texts, what="the message in the room")
            assert got["content"]["body"] == ("three pictures\n\n[attachment not copied: short.png]\n"
                                              "[attachment not copied: decimal.png]\n"
                                              "[attachment not copied: octal.png]")
            assert str(port) not in str(got["content"])  # the refused URLs are not shown to the room
            assert served == []
            assert metric(net, 'civic_degraded_total{reason="matrix_media_refused"} 3.0')
            assert net.gw.metrics.retries.labels("hub")._value.get() == 0
            assert net.gw.metrics.dead_lettered.labels("hub")._value.get() == 0
    finally:
        await runner.cleanup()
