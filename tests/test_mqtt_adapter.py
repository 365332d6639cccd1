"""The MQTT adapter end to end, against a real Mosquitto started by each test:
a gateway in-process linking an MQTT site (platform ``m``) and a webhook site
(platform ``w``). Both directions, both content modes, duplicates, bad input,
acknowledgement only after storing, backpressure, a gateway stopped and a
broker restarted mid-test, and per-site broker accounts with an ACL."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt.adapter import MqttAdapter
from adapters.mqtt.client import AckingClient
from adapters.mqtt.config import MqttConfig
from gateway import registry
from gateway.adapter import AdapterContext, Delivery, DeliveryResult, Inbound, IngestResult, Overloaded
from gateway.app import Gateway
from gateway.config import parse, validate_adapters
from gateway.errors import ConfigError, TransientDeliveryError
from gateway.ids import EventId, GroupId, PlatformName
from gateway.metrics import Metrics
from schemas.v1 import Actor, Message
from tests.services import Mosquitto, free_port
from tests.sitekit import Sender, Site, new_secret, wait_for

CE = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"


def broker(path: Path, **kw: Any) -> Mosquitto:
    """The test's own Mosquitto (it keeps its sessions across a restart: see ``tests/services.py``)."""
    return Mosquitto(path, **kw)


def cloudevent(event_id: str, text: str = "hello", group: str = "g-m", **data: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id, "source": "https://m.example", "type": "civic.message.created",
            "subject": group, "data": {"id": f"post-{event_id}", "author": {"id": "user-1", "name": "Anja"},
                                       "text": text, **data}}


class MqttSite:
    """An MQTT site: listens on its ``out/#`` and ``errors`` topics with a
    persistent session (reconnecting, as a site would), and publishes
    CloudEvents on its ``in`` topic, returning the broker's PUBACK reason code."""

    def __init__(self, name: str, port: int, *, user: str | None = None, password: str | None = None) -> None:
        self.name, self.port, self.user, self.password = name, port, user, password
        self.out: list[aiomqtt.Message] = []
        self.errors: list[dict[str, Any]] = []
        self.listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pub: AckingClient | None = None

    def _client(self, suffix: str, **kw: Any) -> AckingClient:
        return AckingClient("127.0.0.1", self.port, username=self.user, password=self.password,
                            identifier=f"site-{self.name}-{suffix}", protocol=aiomqtt.ProtocolVersion.V5,
                            keepalive=5, timeout=5, **kw)

    async def start(self, *, topics: tuple[str, ...] | None = None) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen(topics))
        await asyncio.wait_for(self.listening.wait(), 10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pub is not None:
            await asyncio.gather(self._pub.__aexit__(None, None, None), return_exceptions=True)

    async def _listen(self, topics: tuple[str, ...] | None) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        while True:
            try:
                client = self._client("sub", clean_start=False, properties=props)
                client._client.manual_ack_set(False)  # a plain subscriber
                async with client:
                    for topic in topics or (f"civic/v1/{self.name}/out/#", f"civic/v1/{self.name}/errors"):
                        await client.subscribe(topic, qos=1)
                    self.listening.set()
                    async for m in client.messages:
                        if str(m.topic).endswith("/errors"):
                            self.errors.append(orjson.loads(m.payload))  # type: ignore[arg-type]
                        else:
                            self.out.append(m)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    async def publish(self, payload: bytes | dict[str, Any] | list[Any], *, content_type: str | None = CE,
                      user_properties: list[tuple[str, str]] | None = None, topic: str | None = None,
                      correlation: bytes | None = None, timeout: float = 15) -> int:
        """Publish until the broker answers (reconnecting); the PUBACK reason code."""
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        props = Properties(PacketTypes.PUBLISH)
        if content_type:
            props.ContentType = content_type
        if user_properties:
            props.UserProperty = user_properties
        if correlation:
            props.CorrelationData = correlation
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._pub is None:
                    self._pub = self._client("pub")
                    await self._pub.__aenter__()
                fut = self._pub.publish_nowait(topic or f"civic/v1/{self.name}/in", body, props)
                return await asyncio.wait_for(fut, 5)
            except (aiomqtt.MqttError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                if self._pub is not None:
                    done = self._pub._disconnected  # aiomqtt leaves the cause of a lost connection unretrieved
                    if done.done() and not done.cancelled():
                        done.exception()
                    await asyncio.gather(self._pub.__aexit__(None, None, None), return_exceptions=True)
                self._pub = None
                await asyncio.sleep(0.1)

    def events(self) -> list[dict[str, Any]]:
        """What arrived on ``out/...`` as CloudEvents (structured or binary)."""
        found = []
        for m in self.out:
            ctype = getattr(m.properties, "ContentType", None)
            if ctype == CE:
                found.append(orjson.loads(m.payload))  # type: ignore[arg-type]
            else:
                ev: dict[str, Any] = dict(getattr(m.properties, "UserProperty", None) or [])
                ev["data"] = orjson.loads(m.payload)  # type: ignore[arg-type]
                found.append(ev)
        return found


@dataclass
class Env:
    mosq: Mosquitto
    gw: Gateway
    w: Site
    sender: Sender
    m: MqttSite
    text: str


async def start_gateway(text: str, *, connected: bool = True) -> Gateway:
    """A gateway in-process; with ``connected``, once its MQTT adapters have subscribed
    (before that, the broker drops what a site publishes: PUBACK 0x10, nobody listens)."""
    gw = Gateway(parse(text, "test.toml"))
    await gw.start()
    for adapter in gw.adapters.values():
        if connected and isinstance(adapter, MqttAdapter):
            await asyncio.wait_for(adapter.connection.connected.wait(), 10)
    return gw


def config_text(tmp_path: Path, w: Site, broker_url: str, *, mqtt: str = "", platforms: str = "",
                links: str | None = None, port: int | None = None) -> str:
    if links is None:
        links = '[[links]]\nname = "l"\ngroups = [{platform = "w", group = "g-w"}, {platform = "m", group = "g-m"}]\n'
    return (f'[gateway]\nlisten = "127.0.0.1:{port or free_port()}"\ndatabase = "{tmp_path}/gw.db"\nnode = "t1"\n'
            f'log_format = "text"\nretry_max_delay = 0.3\n'
            + w.config() + f'[platforms.m]\nkind = "mqtt"\nbroker = "{broker_url}"\n{mqtt}' + platforms + links)


@pytest.fixture
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    mqtt = getattr(request, "param", "")
    with broker(tmp_path / "mosquitto") as mosq:
        w = Site("w", new_secret(), "ww-")
        await w.start()
        m = MqttSite("m", mosq.port)
        await m.start()
        text = config_text(tmp_path, w, mosq.url, mqtt=mqtt)
        gw = await start_gateway(text)
        port = free_port()
        await gw.serve("127.0.0.1", port)
        sender = Sender(f"http://127.0.0.1:{port}", "w", w.secret)
        e = Env(mosq, gw, w, sender, m, text)
        try:
            yield e
        finally:
            await sender.close()
            if e.gw._runner is not None:
                await e.gw._runner.cleanup()
            await e.gw.stop()
            await m.stop()
            await w.stop()


async def stop_gateway(env: Env) -> None:
    if env.gw._runner is not None:
        await env.gw._runner.cleanup()
    await env.gw.stop()


def adapter_of(gw: Gateway) -> MqttAdapter:
    a = gw.adapters[PlatformName("m")]
    assert isinstance(a, MqttAdapter)
    return a


def sample(gw: Gateway, name: str, **labels: str) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


# -- both directions --------------------------------------------------------------------------------

async def test_an_mqtt_site_and_a_webhook_site_talk_both_ways(env: Env) -> None:
    await env.m.publish(cloudevent("m-1", "The garden opens on Saturday", warning="wasps"))
    await wait_for(lambda: env.w.of_type("civic.message.created"), what="the MQTT site's post at w")
    [got] = env.w.of_type("civic.message.created")
    assert got["subject"] == "g-w" and got["civicorigin"] == "m"
    assert got["data"]["text"] == "The garden opens on Saturday" and got["data"]["warning"] == "wasps"
    w_own = env.w.own_ids[got["data"]["id"]]

    # w replies to it; the reply reaches m's out/g-m, structured, replying to m's own id
    status, _ = await env.sender.send([env.sender.event("civic.message.created", "g-w", {
        "id": "w-post-1", "author": {"id": "w-user"}, "text": "I bring spades", "reply_to": w_own})])
    assert status == 202
    await wait_for(lambda: env.m.out, what="w's reply at m")
    [msg] = env.m.out
    assert str(msg.topic) == "civic/v1/m/out/g-m"
    assert msg.properties.ContentType == CE and msg.properties.PayloadFormatIndicator == 1
    reply = orjson.loads(msg.payload)  # type: ignore[arg-type]
    assert reply["type"] == "civic.message.created" and reply["subject"] == "g-m" and reply["civicorigin"] == "w"
    assert reply["data"]["text"] == "I bring spades" and reply["data"]["reply_to"] == "post-m-1"

    # and m answers that reply in binary mode, as a batch-less single event
    answer = cloudevent("m-2", "Great", reply_to=reply["data"]["id"])
    props = [(k, v) for k, v in answer.items() if k != "data"]
    assert await env.m.publish(orjson.dumps(answer["data"]), content_type="application/json",
                               user_properties=props) == 0
    await wait_for(lambda: len(env.w.of_type("civic.message.created")) == 2, what="m's binary answer at w")
    assert env.w.of_type("civic.message.created")[1]["data"]["reply_to"] == "w-post-1"


@pytest.mark.parametrize("env", ['content_mode = "binary"\n'], indirect=True)
async def test_binary_content_mode_outbound(env: Env) -> None:
    status, _ = await env.sender.send([
        env.sender.event("civic.message.created", "g-w", {"id": "w-post-9", "author": {"id": "w-user"}, "text": "t"}),
        env.sender.event("civic.reaction.added", "g-w", {
            "message": "w-post-9", "author": {"id": "w-user", "name": "Bram"}, "key": "👍"})])
    assert status == 202
    await wait_for(lambda: len(env.m.out) == 2, what="the post and the reaction at m")
    msg = env.m.out[1]
    assert msg.properties.ContentType == "application/json"
    props = dict(msg.properties.UserProperty)
    assert props["specversion"] == "1.0" and props["type"] == "civic.reaction.added"
    assert props["subject"] == "g-m" and props["civicorigin"] == "w" and props["source"] == "urn:civic-gateway"
    assert props["id"] and props["time"]
    data = orjson.loads(msg.payload)  # type: ignore[arg-type]
    assert data["key"] == "👍" and data["message"] == orjson.loads(env.m.out[0].payload)["id"]  # type: ignore


async def test_a_batch_and_a_repeated_event_id_are_taken_once(env: Env) -> None:
    ev = cloudevent("m-dup", "once only")
    assert await env.m.publish(ev) == 0
    assert await env.m.publish(ev) == 0
    assert await env.m.publish([ev, cloudevent("m-b1", "one"), cloudevent("m-b2", "two")], content_type=CE_BATCH) == 0
    await wait_for(lambda: len(env.w.of_type("civic.message.created")) == 3, what="three distinct posts at w")
    await asyncio.sleep(0.3)
    texts = [e.event["data"]["text"] for e in env.w.events]
    assert sorted(texts) == ["once only", "one", "two"]
    assert sample(env.gw, "civic_dropped_total", platform="m", reason="duplicate") == 2


# -- bad input --------------------------------------------------------------------------------------

async def test_bad_input_is_reported_on_errors_and_never_stored(env: Env) -> None:
    big = cloudevent("m-big", "x" * 1_100_000)
    bad = [
        (b"not json at all", CE, None),
        ([1, 2], CE, None),
        (cloudevent("m-type") | {"type": "civic.poll.created"}, CE, None),
        (cloudevent("m-schema") | {"data": {"id": "p", "author": {"id": "u"}, "text": 5}}, CE, b"corr-1"),
        (b"hello", "text/plain", None),
        (big, CE, None),
    ]
    for payload, ctype, corr in bad:
        assert await env.m.publish(payload, content_type=ctype, correlation=corr) == 0  # the broker took it
    assert await env.m.publish(cloudevent("m-good", "fine")) == 0
    await wait_for(lambda: env.w.events and len(env.m.errors) == len(bad), what="the good post and six reports")
    reasons = [(e["reason"], e.get("id"), e.get("field")) for e in env.m.errors]
    assert reasons == [("not_json", None, None), ("not_cloudevent", None, "$"),
                       ("unknown_type", "m-type", "$.type"), ("schema", "m-schema", "$.data.text"),
                       ("content_type", None, None), ("too_large", None, None)]
    assert all(e["error"] and e["topic"] == "civic/v1/m/in" for e in env.m.errors)
    assert [e.event["data"]["text"] for e in env.w.events] == ["fine"]
    assert sample(env.gw, "civic_events_in_total", platform="m", type="civic.message.created") == 1
    assert sample(env.gw, "civic_decode_errors_total", platform="m", status="400") == 4

    # the reports were acknowledged: a restarted gateway gets none of them again
    await stop_gateway(env)
    env.gw = await start_gateway(env.text)
    await asyncio.sleep(0.5)
    assert len(env.m.errors) == len(bad)


# -- acknowledged only once stored ------------------------------------------------------------------

async def test_a_message_published_while_the_gateway_is_stopped_is_taken_after_it_starts(env: Env) -> None:
    await stop_gateway(env)
    assert await env.m.publish(cloudevent("m-while-down", "are you there?")) == 0
    await asyncio.sleep(0.2)
    assert not env.w.events
    env.gw = await start_gateway(env.text, connected=False)
    await wait_for(lambda: env.w.events, what="the post published while the gateway was down")
    assert env.w.events[0].event["data"]["text"] == "are you there?"


def bare_adapter(mosq: Mosquitto, ingest: Callable[[list[Inbound]], Awaitable[IngestResult]],
                 **settings: Any) -> MqttAdapter:
    config = MqttConfig(broker=mosq.url, **settings)
    return MqttAdapter(AdapterContext(name=PlatformName("m"), config=config, ingest=ingest,  # type: ignore[arg-type]
                                      metrics=Metrics(), gateway_source="urn:test", node="n1"))


async def test_nothing_is_acknowledged_before_ingest_returns(tmp_path: Path) -> None:
    with broker(tmp_path / "mosquitto") as mosq:
        site = MqttSite("m", mosq.port)
        await site.start()
        release = asyncio.Event()
        calls: list[list[Inbound]] = []

        async def stuck(events: list[Inbound]) -> IngestResult:  # a store that never commits
            calls.append(events)
            await release.wait()
            raise RuntimeError("crashed")

        first = bare_adapter(mosq, stuck)
        await first.start()
        await asyncio.wait_for(first.connection.connected.wait(), 10)
        await site.publish(cloudevent("m-1"))
        await wait_for(lambda: calls, what="the first ingest")
        await first.stop()  # gone before the events were stored
        release.set()

        stored: list[Inbound] = []

        async def ingest(events: list[Inbound]) -> IngestResult:
            stored.extend(events)
            return IngestResult(accepted=len(events), duplicates=0)

        second = bare_adapter(mosq, ingest)  # same node and platform: same session
        await second.start()
        await wait_for(lambda: stored, what="the message again, in the same session")
        assert [e.event_id for e in stored] == ["m-1"]
        await second.stop()

        third = bare_adapter(mosq, ingest)  # acknowledged by the second: not sent again
        await third.start()
        await asyncio.wait_for(third.connection.connected.wait(), 10)
        await asyncio.sleep(0.3)
        await third.stop()
        assert [e.event_id for e in stored] == ["m-1"]
        await site.stop()


async def test_overloaded_ingest_is_tried_again_with_the_same_events(tmp_path: Path) -> None:
    with broker(tmp_path / "mosquitto") as mosq:
        site = MqttSite("m", mosq.port)
        await site.start()
        calls: list[tuple[float, list[str]]] = []

        async def busy_once(events: list[Inbound]) -> IngestResult:
            calls.append((time.monotonic(), [e.event_id for e in events]))
            if len(calls) == 1:
                raise Overloaded(503, 1, "the store is busy; retry shortly")
            return IngestResult(accepted=len(events), duplicates=0)

        adapter = bare_adapter(mosq, busy_once)
        await adapter.start()
        await asyncio.wait_for(adapter.connection.connected.wait(), 10)
        await site.publish(cloudevent("m-1"))
        await wait_for(lambda: len(calls) == 2, what="a second attempt")
        assert calls[0][1] == calls[1][1] == ["m-1"]
        assert calls[1][0] - calls[0][0] >= 0.9  # Retry-After honoured
        assert adapter.ctx.metrics.registry.get_sample_value("civic_overload_refusals_total",
                                                             {"platform": "m", "status": "503"}) == 1
        await asyncio.sleep(0.2)
        await adapter.stop()
        again = bare_adapter(mosq, busy_once)
        await again.start()
        await asyncio.wait_for(again.connection.connected.wait(), 10)
        await asyncio.sleep(0.3)
        await again.stop()
        assert len(calls) == 2  # acknowledged after the second attempt
        await site.stop()


async def stored_ok(events: list[Inbound]) -> IngestResult:
    return IngestResult(accepted=len(events), duplicates=0)


def deliveries(n: int, group: str = "g-m") -> list[Delivery]:
    return [Delivery(EventId(f"cge_{i}"), GroupId(group), "civic.message.created",
                     Message(id=f"cgm_{i}", author=Actor(id="cga_1"), text=f"text {i}"), time.time(),
                     PlatformName("w")) for i in range(n)]


async def test_deliver_publishes_a_batch_and_waits_for_every_puback(tmp_path: Path) -> None:
    with broker(tmp_path / "mosquitto") as mosq:
        adapter = bare_adapter(mosq, stored_ok, ack_timeout=0.5, batch_max=50)
        assert adapter.capabilities.batch_max == 50
        await adapter.start()
        await asyncio.wait_for(adapter.connection.connected.wait(), 10)
        try:
            with pytest.raises(TransientDeliveryError, match="no subscriber"):  # the broker would drop it
                await adapter.deliver(deliveries(1))
            site = MqttSite("m", mosq.port)
            await site.start()
            assert await adapter.deliver(deliveries(30)) == DeliveryResult()
            await wait_for(lambda: len(site.out) == 30, what="the whole batch at the site")
            assert [e["id"] for e in site.events()] == [f"cge_{i}" for i in range(30)]  # in order
            assert {str(m.topic) for m in site.out} == {"civic/v1/m/out/g-m"}

            assert mosq.proc is not None
            mosq.proc.send_signal(signal.SIGSTOP)  # a broker that takes the messages but never answers
            try:
                started = time.monotonic()
                with pytest.raises(TransientDeliveryError, match="no PUBACK"):
                    await adapter.deliver(deliveries(3))
                assert time.monotonic() - started < 2
            finally:
                mosq.proc.send_signal(signal.SIGCONT)
            await site.stop()
        finally:
            await adapter.stop()


# -- the broker goes away --------------------------------------------------------------------------

async def test_the_adapter_reconnects_after_a_broker_restart_and_loses_nothing(env: Env) -> None:
    adapter = adapter_of(env.gw)
    await asyncio.wait_for(adapter.connection.connected.wait(), 10)
    for i in range(10):
        await env.m.publish(cloudevent(f"m-a{i}", f"before {i}"))
    restart = asyncio.get_running_loop().run_in_executor(None, env.mosq.restart, 0.5)
    await asyncio.sleep(0.1)
    for i in range(3):  # while the broker is down: delivery to m waits and retries
        status, _ = await env.sender.send([env.sender.event("civic.message.created", "g-w", {
            "id": f"w-{i}", "author": {"id": "w-user"}, "text": f"from w {i}"})])
        assert status == 202
    await restart
    for i in range(10):
        assert await env.m.publish(cloudevent(f"m-b{i}", f"after {i}")) == 0
    await wait_for(lambda: len(env.w.seen) == 20, timeout=20, what="all 20 posts from m at w")
    await wait_for(lambda: {e["data"]["text"] for e in env.m.events()} >= {f"from w {i}" for i in range(3)},
                   timeout=20, what="w's three posts at m")
    assert adapter.connection.connections >= 2
    texts = {e.event["data"]["text"] for e in env.w.events}
    assert texts == {f"before {i}" for i in range(10)} | {f"after {i}" for i in range(10)}


# -- accounts and ACL ---------------------------------------------------------------------------------

def documented_acl() -> str:
    """The Mosquitto ACL of docs/mqtt.md, so that the test checks what the docs tell operators."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "mqtt.md").read_text(encoding="utf-8")
    [acl] = [b for b in re.findall(r"```conf\n(.*?)```", text, re.S) if "pattern write civic/v1/%u/in" in b]
    return acl


ACL = documented_acl()


async def test_with_accounts_and_an_acl_a_site_cannot_write_another_sites_topics(tmp_path: Path) -> None:
    passwords = {"civic-gateway": "gw-secret", "m": "m-secret", "n": "n-secret"}
    with broker(tmp_path / "mosquitto", passwords=passwords, acl=ACL) as mosq:
        w = Site("w", new_secret(), "ww-")
        await w.start()
        m = MqttSite("m", mosq.port, user="m", password="m-secret")
        n = MqttSite("n", mosq.port, user="n", password="n-secret")
        spy = MqttSite("spy", mosq.port, user="m", password="m-secret")
        await m.start()
        await n.start()
        await spy.start(topics=("civic/v1/n/out/#", "civic/v1/n/errors"))
        url = f"mqtt://civic-gateway:gw-secret@127.0.0.1:{mosq.port}"
        links = ('[[links]]\nname = "l"\ngroups = [{platform = "w", group = "g-w"}, {platform = "m", group = "g-m"},'
                 ' {platform = "n", group = "g-n"}]\n')
        gw = await start_gateway(config_text(tmp_path, w, url, links=links,
                                             platforms=f'[platforms.n]\nkind = "mqtt"\nbroker = "{url}"\n'))
        try:
            forged = cloudevent("m-forged", "posing as n", group="g-n")
            assert await m.publish(forged, topic="civic/v1/n/in") == 0x87  # not authorized
            assert await m.publish(cloudevent("m-own", "my own")) == 0
            await wait_for(lambda: w.events and n.out, what="m's own post at w and n")
            await asyncio.sleep(0.3)
            assert [e.event["data"]["text"] for e in w.events] == ["my own"]
            assert [e["data"]["text"] for e in n.events()] == ["my own"]
            assert not spy.out  # m's account cannot read n's topics
        finally:
            await gw.stop()
            for s in (m, n, spy):
                await s.stop()
            await w.stop()


async def test_wrong_broker_credentials_are_retried_not_fatal(tmp_path: Path) -> None:
    with broker(tmp_path / "mosquitto", passwords={"civic-gateway": "right"}, acl=ACL) as mosq:
        config = MqttConfig(broker=f"mqtt://civic-gateway:wrong@127.0.0.1:{mosq.port}", reconnect_max=0.5)

        async def ingest(events: list[Inbound]) -> IngestResult:
            return IngestResult(accepted=len(events), duplicates=0)

        adapter = MqttAdapter(AdapterContext(name=PlatformName("m"), config=config,
                                             ingest=ingest,  # type: ignore[arg-type]
                                             metrics=Metrics(), gateway_source="urn:test", node="n1"))
        await adapter.start()
        await asyncio.sleep(0.5)
        assert not adapter.connection.connected.is_set()
        with pytest.raises(TransientDeliveryError, match="not connected"):
            await adapter.deliver(deliveries(1))
        await adapter.stop()


# -- config ---------------------------------------------------------------------------------------------

def test_config_errors_name_the_key_and_line() -> None:
    text = ('[gateway]\n\n[platforms.m]\nkind = "mqtt"\nbroker = "http://broker"\n'
            '[[links]]\nname = "l"\ngroups = [{platform = "m", group = "a"}, {platform = "m", group = "b"}]\n')
    with pytest.raises(ConfigError, match=r"test.toml:5: platforms\.m\.broker: expected mqtt://"):
        validate_adapters(parse(text, "test.toml"), registry.find)
    text = text.replace('"http://broker"', '"mqtt://broker"\ntopic_prefix = "a/#"')
    with pytest.raises(ConfigError, match=r"test.toml:6: platforms\.m\.topic_prefix"):
        validate_adapters(parse(text, "test.toml"), registry.find)


def test_the_example_config_has_an_mqtt_site() -> None:
    path = Path(__file__).resolve().parent.parent / "docs" / "example.toml"
    config = parse(path.read_text(encoding="utf-8"), str(path))
    validate_adapters(config, registry.find)
    kinds = {pc.kind for pc in config.platforms.values()}
    assert "mqtt" in kinds
