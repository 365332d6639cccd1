"""Delivery failures, dead letters and the admin API, metrics and health, and
durability across a restart: a real gateway and real webhook sites on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.runtime import Gateway
from tests.conftest import Net, start_net, stop_net
from tests.sitekit import Sender, Site, wait_for

_n = itertools.count(1)


@dataclass
class RecordingSite(Site):
    """A Site that also records every request it gets, refused or not:
    (monotonic arrival time, CloudEvent ids, texts). ``poison``: answer 400 to
    any request holding a message with that text. ``refuse``: answers
    (status, headers) to give to the next requests, in order."""

    attempts: list[tuple[float, list[str], list[str]]] = field(default_factory=list)
    poison: str | None = None
    refuse: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    async def _inbox(self, request: web.Request) -> web.Response:
        body = await request.read()  # cached: the parent reads it again
        parsed = orjson.loads(body)
        events = parsed if isinstance(parsed, list) else [parsed]
        self.attempts.append((time.monotonic(), [e["id"] for e in events],
                              [e.get("data", {}).get("text", "") for e in events]))
        if self.poison is not None and any(e.get("data", {}).get("text") == self.poison for e in events):
            return web.json_response({"error": "cannot store this one"}, status=400)
        if self.refuse:
            status, headers = self.refuse.pop(0)
            return web.Response(status=status, headers=headers)
        return await super()._inbox(request)

    def first_attempted(self) -> list[str]:
        """Every event id attempted, in order of its first attempt."""
        return list(dict.fromkeys(i for _, ids, _ in self.attempts for i in ids))


async def swap_in_recording_site(net: Net, name: str, **kw: Any) -> RecordingSite:
    old = net.sites[name]
    await old.stop()
    site = RecordingSite(name=old.name, secret=old.secret, prefix=old.prefix, port=old.port, **kw)
    await site.start()
    net.sites[name] = site
    return site


def msg(text: str, author: str = "alice") -> dict[str, Any]:
    return {"id": f"m-{next(_n)}", "author": {"id": author, "name": author.title()}, "text": text}


async def post(sender: Sender, text: str) -> None:
    status, body = await sender.send([sender.event("civic.message.created", "g-a", msg(text))])
    assert status == 202, body


def texts(site: Site) -> list[str]:
    return [e["data"]["text"] for e in site.of_type("civic.message.created")]


def auth(net: Net) -> dict[str, str]:
    return {"Authorization": f"Bearer {net.admin_token}"}


async def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers or {}) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers


async def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=orjson.dumps(body), headers=headers or {}) as resp:
            return resp.status, await resp.json(content_type=None)


async def samples(net: Net) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{net.url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def dead_letters(net: Net) -> list[dict[str, Any]]:
    status, body, _ = await get_json(f"{net.url}/admin/v1/dead-letters", auth(net))
    assert status == 200
    return body["dead_letters"]


async def test_a_refused_event_is_a_dead_letter_and_replays_with_the_same_id(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"])
    try:
        b, sa = net.sites["b"], net.senders["a"]
        b.fail_with = 400
        await post(sa, "cannot be stored yet")
        await wait_for(lambda: net.gw.metrics.dead_letters._value.get() == 1, what="a dead letter")
        assert b.events == []

        url = f"{net.url}/admin/v1/dead-letters"
        status, body, headers = await get_json(url)
        assert status == 401 and "dead_letters" not in body
        assert headers["WWW-Authenticate"] == "Bearer"
        status, body, _ = await get_json(url, {"Authorization": "Bearer wrong"})
        assert status == 401
        status, body, _ = await get_json(url, {"Authorization": net.admin_token})  # no "Bearer "
        assert status == 401

        [dead] = await dead_letters(net)
        assert "400" in dead["error"]
        assert dead["platform"] == "b" and dead["group"] == "g-b" and dead["origin"] == "a"
        assert dead["type"] == "civic.message.created"
        assert dead["data"]["text"] == "cannot be stored yet"
        assert dead["data"]["author"]["name"] == "Alice"
        assert dead["attempts"] >= 1

        # replay needs the token too, and then does nothing
        status, _ = await post_json(f"{url}/replay", {})
        assert status == 401
        assert len(await dead_letters(net)) == 1

        b.fail_with = None
        status, body = await post_json(f"{url}/replay", {}, auth(net))
        assert (status, body) == (200, {"replayed": 1})
        await wait_for(lambda: b.of_type("civic.message.created"), what="the replayed event")
        got = b.of_type("civic.message.created")
        assert [e["id"] for e in got] == [dead["event_id"]]
        assert got[0]["data"]["text"] == "cannot be stored yet"
        assert await dead_letters(net) == []
        assert net.gw.metrics.dead_letters._value.get() == 0
    finally:
        await stop_net(net)


async def test_a_poison_event_in_a_batch_dead_letters_alone_and_the_rest_arrive_in_order(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"], batch_max=5)
    try:
        b = await swap_in_recording_site(net, "b", poison="poison")
        sa = net.senders["a"]
        words = ["one", "two", "poison", "four", "five"]
        status, body = await sa.send([sa.event("civic.message.created", "g-a", msg(w)) for w in words])
        assert status == 202 and body["accepted"] == 5
        await wait_for(lambda: len(texts(b)) == 4, what="the four good events")
        assert texts(b) == ["one", "two", "four", "five"]
        assert b.attempts[0][2] == words  # first sent as one batch of five
        [dead] = await dead_letters(net)
        assert dead["data"]["text"] == "poison" and "400" in dead["error"]
        assert net.gw.metrics.dead_lettered.labels("b")._value.get() == 1

        # the queue goes on: later events still arrive, batched again
        await post(sa, "six")
        await wait_for(lambda: texts(b)[-1:] == ["six"], what="a later event")
        assert len(await dead_letters(net)) == 1
    finally:
        await stop_net(net)


async def test_retry_after_from_a_429_is_honoured(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"])  # retry_max_delay = 0.5: only Retry-After can make it wait 2 s
    try:
        b = await swap_in_recording_site(net, "b", refuse=[(429, {"Retry-After": "2"})])
        await post(net.senders["a"], "patience")
        await wait_for(lambda: texts(b) == ["patience"], what="the retried delivery")
        assert len(b.attempts) == 2
        (t1, ids1, _), (t2, ids2, _) = b.attempts
        assert ids1 == ids2
        assert t2 - t1 >= 1.5, f"retried after {t2 - t1:.2f}s despite Retry-After: 2"
        assert net.gw.metrics.retries.labels("b")._value.get() == 1
    finally:
        await stop_net(net)


async def test_metrics_health_readiness_and_links(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b", "c"])
    try:
        b, c = net.sites["b"], net.sites["c"]
        sa = net.senders["a"]
        for i in range(3):
            await post(sa, f"count me {i}")
        status, _ = await sa.send([sa.event("civic.reaction.added", "g-a",
                                            {"message": "m-nonexistent", "author": {"id": "x"}, "key": "+"})])
        assert status == 202  # accepted, but names an unknown message: counted in, never out
        await wait_for(lambda: len(texts(b)) == 3 and len(texts(c)) == 3, what="deliveries")

        def created(name: str, platform: str) -> tuple[str, tuple[tuple[str, str], ...]]:
            return (name, (("platform", platform), ("type", "civic.message.created")))

        async def settled() -> dict[Any, float]:
            got: dict[Any, float] = {}

            async def poll() -> None:
                got.clear()
                got.update(await samples(net))

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                await poll()
                if got.get(created("civic_events_out_total", "c")) == 3 and \
                        got.get(created("civic_events_out_total", "b")) == 3:
                    break
                await asyncio.sleep(0.02)
            return got

        m = await settled()
        assert m[created("civic_events_in_total", "a")] == 3
        assert m[("civic_events_in_total", (("platform", "a"), ("type", "civic.reaction.added")))] == 1
        assert m[created("civic_events_out_total", "b")] == 3
        assert m[created("civic_events_out_total", "c")] == 3
        assert created("civic_events_out_total", "a") not in m  # nothing goes back to the source
        assert ("civic_events_out_total", (("platform", "b"), ("type", "civic.reaction.added"))) not in m
        assert m[("civic_delivery_latency_seconds_count", (("platform", "b"),))] == 3
        assert m[("civic_delivery_latency_seconds_count", (("platform", "c"),))] == 3
        assert m[("civic_dropped_total", (("platform", "a"), ("reason", "unknown_message")))] == 1

        status, body, _ = await get_json(f"{net.url}/healthz")
        assert status == 200 and body == {"status": "ok"}
        status, body, headers = await get_json(f"{net.url}/readyz")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert body["ready"] is True and isinstance(body["undelivered"], int)

        status, body, _ = await get_json(f"{net.url}/admin/v1/links")
        assert status == 401
        status, body, _ = await get_json(f"{net.url}/admin/v1/links", auth(net))
        assert status == 200
        assert body["links"] == [{"name": "together", "moderation": "mirror", "reactions": True, "groups": [
            {"platform": "a", "group": "g-a"}, {"platform": "b", "group": "g-b"}, {"platform": "c", "group": "g-c"}]}]
    finally:
        await stop_net(net)


async def test_readyz_is_503_until_started_and_after_stop(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"])
    try:
        net.gw.ready = False  # as during start() and stop()
        status, body, _ = await get_json(f"{net.url}/readyz")
        assert status == 503 and body["ready"] is False
        status, _ = await net.senders["a"].send([net.senders["a"].event(
            "civic.message.created", "g-a", msg("too early"))])
        assert status == 503
        net.gw.ready = True
        status, _, _ = await get_json(f"{net.url}/readyz")
        assert status == 200
    finally:
        await stop_net(net)


async def test_queued_events_survive_a_gateway_restart_with_their_ids(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"])
    try:
        b = await swap_in_recording_site(net, "b")
        b.fail_with = 503
        sa = net.senders["a"]
        for i in range(3):
            await post(sa, f"queued {i}")
        # a failing delivery is retried exactly as it was: only the first event is attempted
        await wait_for(lambda: len(b.first_attempted()) == 1 and b.refused >= 2, what="the first event retried")
        first_ids = b.first_attempted()
        assert b.events == []

        await b.stop()  # the site goes down
        port = int(net.url.rsplit(":", 1)[1])
        assert net.gw._runner is not None
        await net.gw._runner.cleanup()
        await net.gw.stop()

        gw = Gateway(net.gw.config)  # a new gateway on the same database file
        await gw.start()
        await gw.serve("127.0.0.1", port)
        net.gw = gw
        status, body, _ = await get_json(f"{net.url}/readyz")
        assert status == 200 and body["undelivered"] == 3

        b.fail_with = None
        await b.start()  # the site comes back
        await wait_for(lambda: len(texts(b)) == 3, what="the queued events after the restart")
        got = b.of_type("civic.message.created")
        assert got[0]["id"] == first_ids[0]  # the same CloudEvent id after the restart
        assert texts(b) == [f"queued {i}" for i in range(3)]

        # and the new gateway carries on normally
        await post(sa, "after restart")
        await wait_for(lambda: texts(b)[-1:] == ["after restart"], what="a new event")
        assert len(b.first_attempted()) == 4
    finally:
        await stop_net(net)
