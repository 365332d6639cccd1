"""The MQTT adapter end to end, against a real Mosquitto started by each test:
a gateway in-process linking an MQTT site (platform ``m``) and a webhook site
(platform ``w``). Both directions, every content mode, duplicates, bad input,
acknowledgement only after storing, backpressure, a gateway stopped and a
broker restarted mid-test, and per-site broker accounts with an ACL."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt.adapter import MqttAdapter
from adapters.mqtt.config import MqttConfig
from adapters.mqtt.connection import AckingClient, coalesce, parse_publish
from adapters.mqtt.outbound import PackedProperties
from gateway import registry
from gateway.adapter import AdapterContext, Delivery, DeliveryResult, Inbound, IngestResult, Overloaded
from gateway.runtime import Gateway
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


async def connected(adapter: Any) -> None:
    """Both of the adapter's connections are up: the consumer of ``in`` and the publisher."""
    await asyncio.wait_for(asyncio.gather(adapter.connection.connected.wait(), adapter.publisher.connected.wait()), 10)


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
        """What arrived on ``out/...`` as CloudEvents (structured, batches or binary)."""
        found = []
        for m in self.out:
            ctype = getattr(m.properties, "ContentType", None)
            if ctype == CE:
                found.append(orjson.loads(m.payload))  # type: ignore[arg-type]
            elif ctype == CE_BATCH:
                found.extend(orjson.loads(m.payload))  # type: ignore[arg-type]
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


async def start_gateway(text: str, *, wait_connected: bool = True) -> Gateway:
    """A gateway in-process; with ``wait_connected``, once its MQTT adapters have subscribed
    (before that, the broker drops what a site publishes: PUBACK 0x10, nobody listens)."""
    gw = Gateway(parse(text, "test.toml"))
    await gw.start()
    for adapter in gw.adapters.values():
        if wait_connected and isinstance(adapter, MqttAdapter):
            await connected(adapter)
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


@pytest.mark.parametrize("env", ['content_mode = "batch"\n'], indirect=True)
async def test_batch_content_mode_outbound(env: Env) -> None:
    posts = [env.sender.event("civic.message.created", "g-w", {"id": f"w-post-{i}", "author": {"id": "w-user"},
                                                                 "text": f"post {i}"}) for i in range(3)]
    status, _ = await env.sender.send(posts)
    assert status == 202
    await wait_for(lambda: env.m.out, what="the batch at m")
    [msg] = env.m.out  # the three in one message
    assert str(msg.topic) == "civic/v1/m/out/g-m"
    assert msg.properties.ContentType == CE_BATCH and msg.properties.PayloadFormatIndicator == 1
    batch = orjson.loads(msg.payload)  # type: ignore[arg-type]
    assert [e["data"]["text"] for e in batch] == ["post 0", "post 1", "post 2"]
    assert all(e["type"] == "civic.message.created" and e["subject"] == "g-m" and e["civicorigin"] == "w"
               for e in batch)
    assert len({e["id"] for e in batch}) == 3

    # one event alone is sent structured, as to webhook sites
    status, _ = await env.sender.send([env.sender.event("civic.reaction.added", "g-w", {
        "message": "w-post-1", "author": {"id": "w-user"}, "key": "👍"})])
    assert status == 202
    await wait_for(lambda: len(env.m.out) == 2, what="the reaction at m")
    assert env.m.out[1].properties.ContentType == CE
    reaction = orjson.loads(env.m.out[1].payload)  # type: ignore[arg-type]
    assert reaction["type"] == "civic.reaction.added" and reaction["data"]["message"] == batch[1]["data"]["id"]


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
    env.gw = await start_gateway(env.text, wait_connected=False)
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
        await connected(first)
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
        await connected(third)
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
        await connected(adapter)
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
        await connected(again)
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
        await connected(adapter)
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


async def test_batch_mode_publishes_a_delivery_as_one_message_within_the_brokers_packet_size(
        tmp_path: Path) -> None:
    mosq = broker(tmp_path / "mosquitto")
    with open(mosq.conf, "a") as f:
        f.write("max_packet_size 20000\n")  # announced in CONNACK
    with mosq:
        site = MqttSite("m", mosq.port)
        await site.start()
        adapter = bare_adapter(mosq, stored_ok, content_mode="batch", batch_max=200)
        await adapter.start()
        await connected(adapter)
        try:
            assert adapter.connection.client is not None and adapter.connection.client.max_packet_size == 20000
            assert await adapter.deliver(deliveries(30)) == DeliveryResult()
            await wait_for(lambda: len(site.out) == 1, what="one message for the 30 events")
            assert site.out[0].properties.ContentType == CE_BATCH
            assert [e["id"] for e in site.events()] == [f"cge_{i}" for i in range(30)]

            site.out.clear()
            big = [msgspec.structs.replace(d, payload=msgspec.structs.replace(d.payload, text="x" * 400))
                   for d in deliveries(200)]  # about 100 kB: more than the broker takes in one packet
            assert await adapter.deliver(big) == DeliveryResult()
            await wait_for(lambda: len(site.events()) == 200, what="all 200 events at the site")
            assert len(site.out) >= 6 and all(len(m.payload) <= 20000 - 4096 for m in site.out)  # type: ignore
            assert [e["id"] for e in site.events()] == [f"cge_{i}" for i in range(200)]
        finally:
            await adapter.stop()
            await site.stop()


# -- the client's own additions ----------------------------------------------------------------------

def packet(command: int, data: bytes, *, qos: int = 1, pos: int = 0) -> dict[str, Any]:
    return {"command": command, "mid": 1, "qos": qos, "pos": pos, "to_process": len(data) - pos, "packet": data,
            "info": None}


def test_coalesce_joins_queued_packets_but_keeps_those_paho_acts_on() -> None:
    PUBLISH, PUBACK, DISCONNECT = 0x30, 0x40, 0xE0
    partly = packet(PUBLISH | 2, b"partly-written", pos=3)
    qos0 = packet(PUBLISH, b"qos0", qos=0)
    bye = packet(DISCONNECT, b"bye")
    out = deque([partly, packet(PUBACK, b"a1"), packet(PUBACK, b"a2"), packet(PUBLISH | 2, b"p1"), qos0,
                 packet(PUBACK, b"a3"), bye, packet(PUBACK, b"a4")])
    coalesce(out)
    assert [p["packet"] for p in out] == [b"partly-written", b"a1a2p1", b"qos0", b"a3", b"bye", b"a4"]
    assert out[0] is partly and out[2] is qos0 and out[4] is bye
    joined = out[1]
    assert (joined["pos"], joined["to_process"], joined["qos"], joined["command"] & 0xF0) == (0, 6, 1, PUBACK)
    one = deque([packet(PUBACK, b"x")])
    coalesce(one)
    assert [p["packet"] for p in one] == [b"x"]


async def test_queued_packets_go_out_in_one_write(tmp_path: Path) -> None:
    with broker(tmp_path / "mosquitto") as mosq:
        site = MqttSite("m", mosq.port)
        await site.start()
        client = AckingClient("127.0.0.1", mosq.port, identifier="writer", protocol=aiomqtt.ProtocolVersion.V5)
        async with client:
            writes: list[int] = []
            inner = client._client
            send = inner._sock_send

            def counting_send(buf: bytes) -> int:
                writes.append(len(buf))
                return send(buf)

            inner._sock_send = counting_send  # type: ignore[method-assign]
            props = PackedProperties(CE)
            acks = [client.publish_nowait("civic/v1/m/out/g", orjson.dumps(cloudevent(f"x{i}")), props)
                    for i in range(20)]  # paho's 20 in flight, queued at once
            assert await asyncio.wait_for(asyncio.gather(*acks), 10) == [0] * 20
            assert len(writes) == 1
        await wait_for(lambda: len(site.out) == 20, what="the 20 messages")
        assert [e["id"] for e in site.events()] == [f"x{i}" for i in range(20)]
        await site.stop()


def publish_packet(topic: bytes, qos: int, props: Properties | None, payload: bytes, mid: int = 7) -> bytearray:
    """The variable part of an MQTT 5 PUBLISH (after the fixed header), as paho receives it."""
    out = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    return bytearray(out + (props.pack() if props is not None else b"\x00") + payload)


def every_publish_property() -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 86400
    props.ContentType = "application/cloudevents+json; charset=utf-8"
    props.ResponseTopic = "civic/v1/m/replies"
    props.CorrelationData = b"\x00corr\xff"
    props.SubscriptionIdentifier = [5]
    props.TopicAlias = 3
    props.UserProperty = [("specversion", "1.0"), ("id", "ü-1"), ("id", "again")]
    return props


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("props", [None, every_publish_property()], ids=["none", "all"])
def test_parse_publish_reads_what_paho_reads(qos: int, props: Properties | None) -> None:
    from paho.mqtt._packet import decode_publish
    from paho.mqtt.client import MQTTv5

    packet = publish_packet("civic/v1/m/in/ü".encode(), qos, props, b'{"a": 1}' * 50)
    parsed = parse_publish(packet, qos)
    assert parsed is not None
    theirs = decode_publish(0x30 | qos << 1, packet, MQTTv5)
    topic, mid, mine, payload = parsed
    assert (topic, mid, payload) == (theirs.topic, theirs.mid, theirs.payload)
    assert isinstance(mine, Properties) and isinstance(payload, bytes)
    assert str(mine) == str(theirs.properties) and mine.pack() == theirs.properties.pack()
    assert {k: v for k, v in vars(mine).items() if k not in ("names", "types", "properties")} == {
        k: v for k, v in vars(theirs.properties).items() if k not in ("names", "types", "properties")}


def test_parse_publish_leaves_what_it_does_not_expect_to_paho() -> None:
    good = every_publish_property()
    assert parse_publish(publish_packet(b"t", 1, good, b"x"), 1) is not None
    bad = {
        "unknown property": b"\x03\x21\x00\x05",  # Receive Maximum has no place in a PUBLISH
        "property twice": b"\x08\x03\x00\x01x\x03\x00\x01y",  # Content Type twice
        "a byte twice": b"\x04\x01\x01\x01\x01",  # Payload Format Indicator twice
        "past the end": b"\x7f\x01\x01",
        "null in a string": b"\x05\x03\x00\x02a\x00",
        "not UTF-8": b"\x05\x03\x00\x02\xff\xfe",
        "truncated string": b"\x04\x03\x00\x09a",
    }
    for what, raw in bad.items():
        packet = bytearray(b"\x00\x01t\x00\x07" + raw + b"payload")
        assert parse_publish(packet, 1) is None, what
    repeated = b"\x0e\x26\x00\x01a\x00\x01b\x26\x00\x01a\x00\x01c"  # the same user property twice: allowed
    parsed = parse_publish(bytearray(b"\x00\x01t\x00\x07" + repeated + b"p"), 1)
    assert parsed is not None and parsed[2].UserProperty == [("a", "b"), ("a", "c")] and parsed[3] == b"p"
    assert parse_publish(bytearray(b"\x00\x09t"), 0) is None  # topic longer than the packet


def test_packed_properties_are_packed_like_paho_packs_them() -> None:
    for content_type, user in ((CE, ()), ("application/json", (("id", "e-1"), ("type", "civic.message.created")))):
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = content_type
        props.PayloadFormatIndicator = 1
        if user:
            props.UserProperty = list(user)
        packed = PackedProperties(content_type, user)
        assert packed.pack() == props.pack()
        assert packed.ContentType == content_type and getattr(packed, "UserProperty", []) == list(user)


# -- the broker goes away --------------------------------------------------------------------------

async def test_the_adapter_reconnects_after_a_broker_restart_and_loses_nothing(env: Env) -> None:
    adapter = adapter_of(env.gw)
    await connected(adapter)
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
        # A site publishes again on any PUBACK reason code but 0 (docs/mqtt.md), as here:
        # right after a restart the broker may not have the subscription back yet.
        deadline = time.monotonic() + 10
        while (code := await env.m.publish(cloudevent(f"m-b{i}", f"after {i}"))) != 0:
            assert code == 0x10 and time.monotonic() < deadline, f"PUBACK {code:#x}"
            await asyncio.sleep(0.1)
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
