"""Clear answers instead of silence: a platform that cannot connect shows in
``/readyz`` and ``civic_platform_up``; events for a group no link names are
named in the answer, counted and warned about once; failures a person must act
on are logged as warnings or errors, with the same fields in the JSON and the
text log formats. Real gateways, webhook sites and a real Mosquitto on 127.0.0.1.

(The PostgreSQL outage: tests/test_store_outage.py.)"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway import logs
from gateway.logs import JsonFormatter, TextFormatter
from tests.clusterkit import Node
from tests.conftest import start_net, stop_net
from tests.services import Mosquitto, free_port
from tests.sitekit import wait_for


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await r.json()


def metric_node(url: str) -> Node:
    """A ``Node`` used only for its metric reader, pointed at an in-process gateway."""
    node = Node.__new__(Node)
    node.port = int(url.rsplit(":", 1)[1])
    return node


async def test_unreachable_mqtt_broker_shows_in_readyz_and_the_up_gauge(tmp_path: Path) -> None:
    mosq = Mosquitto(tmp_path / "mosquitto")  # its port is chosen, the broker not started yet
    links = (f'[platforms.m]\nkind = "mqtt"\nbroker = "{mosq.url}"\nreconnect_max = 0.5\n'
             '[[links]]\nname = "l"\ngroups = [{platform = "a", group = "g-a"}, {platform = "m", group = "g"}]\n')
    net = await start_net(tmp_path, ["a"], links=links)
    node = metric_node(net.url)
    try:
        def m_down() -> bool:
            return not net.gw.platform_state["m"][0]
        await wait_for(m_down, timeout=10, what="the MQTT platform to report its broker down")
        status, body = await get(f"{net.url}/readyz")
        # The node still takes events (webhook intake works): ready, but degraded, with the reason.
        assert status == 200, body
        assert body["ready"] is True and body["degraded"] is True
        assert body["platforms"]["a"] == {"up": True}
        assert body["platforms"]["m"]["up"] is False
        assert str(mosq.port) in body["platforms"]["m"]["reason"], body["platforms"]["m"]
        strict, _ = await get(f"{net.url}/readyz?strict")
        assert strict == 503
        assert await node.metric("civic_platform_up", platform="m") == 0
        assert await node.metric("civic_platform_up", platform="a") == 1

        mosq.start()
        try:
            await wait_for(lambda: net.gw.platform_state["m"][0], timeout=15, what="the MQTT platform to come up")
            status, body = await get(f"{net.url}/readyz")
            assert status == 200 and body["degraded"] is False and body["platforms"]["m"] == {"up": True}
            assert (await get(f"{net.url}/readyz?strict"))[0] == 200
            assert await node.metric("civic_platform_up", platform="m") == 1
        finally:
            mosq.stop()
        # The broker goes away again: down again, saying why.
        await wait_for(m_down, timeout=15, what="the MQTT platform to notice the broker stopped")
    finally:
        await stop_net(net)


async def test_events_for_an_unlinked_group_are_named_counted_and_warned_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net = await start_net(tmp_path, ["a", "b"])
    node = metric_node(net.url)
    caplog.set_level(logging.WARNING, logger="civic.gateway")
    try:
        a = net.senders["a"]
        good = a.event("civic.message.created", "g-a", {"id": "m1", "author": {"id": "u"}, "text": "hi"})
        typo = a.event("civic.message.created", "g-typo", {"id": "m2", "author": {"id": "u"}, "text": "lost?"})
        status, body = await a.send([good, typo])
        assert status == 202, body
        assert body["not_relayed"] == [{"index": 1, "id": typo["id"], "reason": "unlinked"}]
        # A second event for the same group: named again, counted again, but not warned again.
        again = a.event("civic.message.created", "g-typo", {"id": "m3", "author": {"id": "u"}, "text": "again"})
        status, body = await a.send([again])
        assert status == 202 and body["not_relayed"][0]["reason"] == "unlinked"
        other = a.event("civic.message.created", "g-other", {"id": "m4", "author": {"id": "u"}, "text": "x"})
        assert (await a.send([other]))[0] == 202
        # An answer with nothing dropped says nothing more than before.
        status, body = await a.send([a.event("civic.message.created", "g-a",
                                             {"id": "m5", "author": {"id": "u"}, "text": "fine"})])
        assert status == 202 and "not_relayed" not in body

        assert await node.metric("civic_dropped_total", platform="a", reason="unlinked") == 3
        warned = [r for r in caplog.records if "no link names" in r.getMessage()]
        assert [(r.levelno, r.platform, r.group) for r in warned] == [  # type: ignore[attr-defined]
            (logging.WARNING, "a", "g-typo"), (logging.WARNING, "a", "g-other")]
        await wait_for(lambda: len(net.sites["b"].of_type("civic.message.created")) == 2, what="the linked ones")
    finally:
        await stop_net(net)


async def test_a_dead_letter_is_an_error_with_the_same_fields_in_both_log_formats(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net = await start_net(tmp_path, ["a", "b"])
    caplog.set_level(logging.INFO)
    try:
        net.sites["b"].fail_with = 400  # refused for good: a dead letter at once
        a = net.senders["a"]
        ev = a.event("civic.message.created", "g-a", {"id": "m1", "author": {"id": "u"}, "text": "refused"})
        assert (await a.send([ev]))[0] == 202

        def dead() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "civic.delivery" and "dead-lettered" in r.getMessage()]
        await wait_for(lambda: dead(), what="the dead letter to be logged")
        record = dead()[0]
        assert record.levelno == logging.ERROR
        as_json = orjson.loads(JsonFormatter().format(record))
        assert as_json["level"] == "error"
        assert as_json["event_id"].startswith("cge_")  # the id the gateway gave it (what dead letters list)
        fields = {"platform": "b", "group": "g-b", "event_id": as_json["event_id"], "attempts": 1}
        assert {k: as_json[k] for k in fields} == fields
        assert "400" in as_json["error"]
        as_text = TextFormatter().format(record)
        assert " ERROR civic.delivery: dead-lettered " in as_text
        for key, value in fields.items():
            assert f" {key}={value}" in as_text, as_text
        assert f' error="{as_json["error"]}"' in as_text or f" error={as_json['error']}" in as_text, as_text
    finally:
        await stop_net(net)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_setup_writes_the_extra_fields_in_either_format(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup(fmt, "info")
        logging.getLogger("civic.test").info("shown: the level is info")
        logging.getLogger("civic.test").debug("not shown")
        logging.getLogger("civic.test").warning("platform %s is down: %s", "m", "refused",
                                                extra={"platform": "m", "reason": "broker refused = no",
                                                       "attempts": 3})
        err = capsys.readouterr().err.strip().splitlines()
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    assert len(err) == 2 and "not shown" not in "".join(err)
    line = err[-1]
    if fmt == "json":
        entry = orjson.loads(line)
        assert entry["level"] == "warning" and entry["message"] == "platform m is down: refused"
        assert (entry["platform"], entry["reason"], entry["attempts"]) == ("m", "broker refused = no", 3)
    else:
        assert " WARNING civic.test: platform m is down: refused " in line
        assert line.endswith(' platform=m reason="broker refused = no" attempts=3'), line


async def test_an_unreachable_homeserver_shows_in_readyz_until_it_answers(tmp_path: Path) -> None:
    hs_port = free_port()  # nothing listens there yet
    links = (f'[platforms.hub]\nkind = "matrix"\nhomeserver = "http://127.0.0.1:{hs_port}"\n'
             f'server_name = "civic.test"\nas_token = "{"a" * 40}"\nhs_token = "{"h" * 40}"\n'
             'appservice_url = "http://127.0.0.1:1/v1/platforms/hub"\n'
             '[[links]]\nname = "l"\ngroups = [{platform = "a", group = "g-a"},'
             ' {platform = "hub", group = "!r:civic.test"}]\n')
    net = await start_net(tmp_path, ["a"], links=links)
    runner: web.AppRunner | None = None
    try:
        await wait_for(lambda: not net.gw.platform_state["hub"][0], timeout=10, what="the homeserver to be down")
        status, body = await get(f"{net.url}/readyz")
        assert status == 200 and body["degraded"] is True
        reason = body["platforms"]["hub"]["reason"]
        assert "unreachable" in reason and str(hs_port) in reason, reason
        assert await metric_node(net.url).metric("civic_platform_up", platform="hub") == 0

        async def ping(request: web.Request) -> web.Response:  # a homeserver that answers the appservice ping
            return web.json_response({"duration_ms": 3})

        async def other(request: web.Request) -> web.Response:
            return web.json_response({"errcode": "M_FORBIDDEN", "error": "not in this test"}, status=403)
        app = web.Application()
        app.router.add_post("/_matrix/client/v1/appservice/{id}/ping", ping)
        app.router.add_route("*", "/{tail:.*}", other)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", hs_port).start()
        await wait_for(lambda: net.gw.platform_state["hub"][0], timeout=15, what="the homeserver to be up")
        status, body = await get(f"{net.url}/readyz")
        assert status == 200 and body["degraded"] is False and body["platforms"]["hub"] == {"up": True}
        assert await metric_node(net.url).metric("civic_platform_up", platform="hub") == 1
    finally:
        await stop_net(net)
        if runner is not None:
            await runner.cleanup()


async def test_a_delivery_that_keeps_failing_turns_from_info_to_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net = await start_net(tmp_path, ["a", "b"])
    caplog.set_level(logging.INFO, logger="civic.delivery")
    try:
        net.sites["b"].fail_with = 503  # down: retried, never dead-lettered within the test
        a = net.senders["a"]
        assert (await a.send([a.event("civic.message.created", "g-a",
                                      {"id": "m1", "author": {"id": "u"}, "text": "waits"})]))[0] == 202

        def retries() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "delivery to b/g-b failed" in r.getMessage()]
        await wait_for(lambda: len(retries()) >= 6, timeout=30, what="six failed attempts")
        levels = [(r.attempts, r.levelno) for r in retries()[:6]]  # type: ignore[attr-defined]
        assert levels == [(1, logging.INFO), (2, logging.INFO), (3, logging.INFO), (4, logging.INFO),
                          (5, logging.WARNING), (6, logging.WARNING)]
        assert all(r.platform == "b" and r.group == "g-b" and "503" in r.error  # type: ignore[attr-defined]
                   for r in retries())
    finally:
        await stop_net(net)
