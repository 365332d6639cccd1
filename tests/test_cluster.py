"""Three gateway nodes as separate processes on one Mosquitto (the bus) and one
PostgreSQL (the store), with webhook sites and an MQTT site linked.

One test, in phases, on the same cluster:
1. load spread over the nodes (ingress round-robin, delivery by partition);
2. one node SIGKILLed mid-load: its partitions are taken over within 15 s;
3. the broker restarted mid-load;
and throughout: every accepted message delivered, in order per group and
source, a redelivery carrying the same webhook-id (single-event site) or the
same CloudEvent id, and the number of redeliveries printed."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from tests.clusterkit import Node
from tests.services import Mosquitto, free_port, temp_database
from tests.sitekit import Sender, Site, new_secret, wait_for

SCALE = float(os.environ.get("CIVIC_SOAK_SCALE", "1"))
GROUPS = 12
PER_GROUP = int(150 * SCALE)  # webhook messages per group and phase
MQTT_PER_GROUP = int(15 * SCALE)  # MQTT-site messages per group and phase
TAKEOVER_LIMIT = 15.0


class MqttSite:
    """A site that speaks MQTT: publishes CloudEvents on its ``in`` topic and
    keeps what arrives on ``out/#`` (a persistent session, so nothing queued
    for it is lost while it reconnects)."""

    def __init__(self, name: str, broker_port: int) -> None:
        self.name, self.port = name, broker_port
        self.received: list[dict[str, Any]] = []  # CloudEvents, in arrival order, redeliveries included
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pub: PahoPublisher | None = None
        self.republished = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen())
        await asyncio.wait_for(self.ready.wait(), 15)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _listen(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"site-{self.name}-sub",
                                          protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                                          properties=props, keepalive=5) as client:
                    await client.subscribe(f"civic/v1/{self.name}/out/#", qos=1)
                    self.ready.set()
                    async for m in client.messages:
                        self.received.append(decode_out(m))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.3)

    async def publish(self, event: dict[str, Any]) -> None:
        """Publish until the broker accepts it: PUBACK with reason code 0 (a site
        must publish again on 0x10 "no matching subscribers", which Mosquitto
        answers after a restart until the gateway has subscribed again)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the broker did not accept a message for 60 s"
            if self._pub is None:
                self._pub = PahoPublisher(f"site-{self.name}-pub", self.port)
            code = await self._pub.publish(loop, f"civic/v1/{self.name}/in", orjson.dumps(event))
            if code == 0:
                return
            self.republished += 1
            await asyncio.sleep(0.2)

    async def close_publisher(self) -> None:
        if self._pub is not None:
            self._pub.close()
            self._pub = None


class PahoPublisher:
    """paho-mqtt in its own thread (it reconnects by itself), returning each
    PUBACK's reason code, which aiomqtt's ``publish`` does not give back."""

    def __init__(self, client_id: str, port: int) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv5)
        self.lock = threading.Lock()
        self.waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]] = {}
        self.early: dict[int, int] = {}
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        code = int(getattr(reason, "value", reason))
        with self.lock:  # never held while calling into paho (its thread calls us holding its own locks)
            entry = self.waiting.pop(mid, None)
            if entry is None:
                self.early[mid] = code  # the PUBACK came before publish() returned
                return
        loop, fut = entry
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(code))

    async def publish(self, loop: asyncio.AbstractEventLoop, topic: str, payload: bytes) -> int:
        """The PUBACK reason code, or -1 when not sent or not acknowledged within 5 s."""
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/cloudevents+json"
        fut: asyncio.Future[int] = loop.create_future()
        info = self.client.publish(topic, payload, qos=1, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return -1
        with self.lock:
            if info.mid in self.early:
                return self.early.pop(info.mid)
            self.waiting[info.mid] = (loop, fut)
        try:
            return await asyncio.wait_for(fut, 5)
        except asyncio.TimeoutError:
            with self.lock:
                self.waiting.pop(info.mid, None)
            return -1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def decode_out(m: aiomqtt.Message) -> dict[str, Any]:
    """A CloudEvent from an MQTT message, structured or binary content mode."""
    props = m.properties
    ctype = getattr(props, "ContentType", None) if props else None
    payload = m.payload if isinstance(m.payload, bytes) else bytes(m.payload or b"")
    if ctype and ctype.startswith("application/cloudevents+json"):
        ev = orjson.loads(payload)
    else:
        ev = {k: v for k, v in (getattr(props, "UserProperty", None) or [])}
        ev["data"] = orjson.loads(payload) if payload else None
    ev.setdefault("subject", str(m.topic).rsplit("/", 1)[-1])
    return ev


def message(sender_name: str, group: int, n: int) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"{sender_name}-g{group}-{n}", "source": f"https://{sender_name}.example",
            "type": "civic.message.created", "subject": f"g{group}",
            "data": {"id": f"{sender_name}m{group}-{n}", "author": {"id": f"{sender_name}-u{group}", "name": "Ann"},
                     "text": f"{sender_name}|g{group}|{n}"}}


async def test_three_nodes_share_work_survive_a_kill_and_a_broker_restart(tmp_path: Path, capsys) -> None:
    with temp_database() as dsn, Mosquitto(tmp_path / "mosquitto") as mosq:
        await run_cluster_scenario(tmp_path, dsn, mosq, capsys)


async def run_cluster_scenario(tmp_path: Path, dsn: str, mosq: Mosquitto, capsys) -> None:
    a, b, c = Site("a", new_secret(), "a-"), Site("b", new_secret(), "b-"), Site("c", new_secret(), "c-")
    for s in (a, b, c):
        await s.start()
    m = MqttSite("m", mosq.port)
    await m.start()
    links = "".join(
        f'[[links]]\nname = "l{g}"\ngroups = [' + ", ".join(
            f'{{platform = "{p}", group = "g{g}"}}' for p in ("a", "b", "c", "m")) + "]\n" for g in range(GROUPS))
    platforms = (a.config() + b.config(batch_max=20) + c.config(batch_max=1)
                 + f'[platforms.m]\nkind = "mqtt"\nbroker = "{mosq.url}"\n')
    nodes = []
    for i in range(1, 4):
        port = free_port()
        text = (f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{dsn}"\nbus = "{mosq.url}"\n'
                f'node = "n{i}"\nlog_format = "text"\nretry_max_delay = 0.5\n' + platforms + links)
        nodes.append(Node(f"n{i}", text, port, tmp_path))
    senders = {n.name: Sender(n.url, "a", a.secret) for n in nodes}
    accepted: dict[tuple[str, int], list[int]] = defaultdict(list)  # (source, group) -> message numbers
    refused = 0
    rr = itertools.count()

    async def send_webhook(g: int, n: int) -> None:
        nonlocal refused
        ev = message("a", g, n)
        deadline = time.monotonic() + 60
        while True:  # a site behind a load balancer: the next node if one does not answer
            assert time.monotonic() < deadline, f"no node accepted {ev['id']} for 60 s"
            node = nodes[next(rr) % len(nodes)]
            if not node.alive:
                continue
            try:
                status, _ = await senders[node.name].send([ev])
            except (aiohttp.ClientError, OSError):
                status = 0
            if status == 202:
                accepted["a", g].append(n)
                return
            refused += 1
            await asyncio.sleep(0.05)

    async def load(phase: int) -> None:
        async def group_load(g: int) -> None:
            base = phase * 10_000
            for k in range(PER_GROUP):
                await send_webhook(g, base + k)
                if k % (PER_GROUP // MQTT_PER_GROUP) == 0:
                    n = base + k
                    await m.publish(message("m", g, n))
                    accepted["m", g].append(n)
        await asyncio.gather(*(group_load(g) for g in range(GROUPS)))

    def expected_total(site: str) -> int:
        return sum(len(v) for (src, _), v in accepted.items() if src != site)

    try:
        for n in nodes:
            await n.start()
        # every node owns a share once all three have ticked
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            owned = [len((await n.readyz())["cluster"]["owned"]) for n in nodes]
            if all(owned) and sum(owned) == 64:
                break
            await asyncio.sleep(0.3)
        assert all(owned) and sum(owned) == 64, f"partitions not shared: {owned}"
        view = (await nodes[0].readyz())["cluster"]
        assert len(view["owners"]) == 64 and set(view["owners"].values()) == {"n1", "n2", "n3"}
        assert {int(p) for p, n in view["owners"].items() if n == "n1"} == set(view["owned"])

        # Phase 1: spread load.
        await load(1)
        # The same event at every node: accepted by each (202), stored and delivered once.
        dup_before = sum([await n.metric("civic_dropped_total", reason="duplicate") for n in nodes])
        twice = message("a", 0, 19_999)
        for n in nodes:
            status, _ = await senders[n.name].send([twice])
            assert status == 202
        accepted["a", 0].append(19_999)
        dup_after = sum([await n.metric("civic_dropped_total", reason="duplicate") for n in nodes])
        assert dup_after - dup_before == 2, "an event sent to three nodes was not taken exactly once"
        delivered_by = [await n.metric("civic_events_out_total") for n in nodes]
        assert sum(1 for d in delivered_by if d > 0) >= 2, f"delivery not spread over nodes: {delivered_by}"

        # Phase 2: kill a node mid-load; its partitions move within 15 s.
        victim = nodes[1]
        victim_parts = set((await victim.readyz())["cluster"]["owned"])
        assert victim_parts
        loader = asyncio.create_task(load(2))
        await asyncio.sleep(1.0)
        assert not loader.done(), "the load ended before the kill: make PER_GROUP bigger"
        victim.kill()
        killed_at = time.monotonic()
        takeover = None
        while time.monotonic() - killed_at < 30:
            owned_now: set[int] = set()
            for n in nodes:
                if n.alive:
                    owned_now |= set((await n.readyz())["cluster"]["owned"])
            if victim_parts <= owned_now:
                takeover = time.monotonic() - killed_at
                break
            await asyncio.sleep(0.2)
        assert takeover is not None and takeover < TAKEOVER_LIMIT, f"takeover took {takeover}"
        await loader

        # Phase 3: restart the broker mid-load.
        loader = asyncio.create_task(load(3))
        await asyncio.sleep(1.0)
        assert not loader.done()
        mosq.restart(down_for=1.0)
        await loader
        await m.close_publisher()

        # The killed node comes back (its broker session may hold MQTT messages it had not acknowledged).
        await victim.start()

        events_of = {"a": lambda: [r.event for r in a.events], "b": lambda: [r.event for r in b.events],
                     "c": lambda: [r.event for r in c.events], "m": lambda: m.received}
        for site, seen in (("a", lambda: a.seen), ("b", lambda: b.seen), ("c", lambda: c.seen),
                           ("m", lambda: {e["id"] for e in m.received})):
            try:
                await wait_for(lambda seen=seen, site=site: len(seen()) >= expected_total(site), timeout=60,
                               what=f"every accepted message at {site}")
            except AssertionError:
                got = {tuple(e["data"]["text"].split("|")) for e in events_of[site]()}
                missing = sorted((src, f"g{g}", str(n)) for (src, g), ns in accepted.items() if src != site
                                 for n in ns if (src, f"g{g}", str(n)) not in got)
                logs = "\n".join(f"--- {n.name} ---\n{n.tail(8)}" for n in nodes)
                raise AssertionError(f"{site} has {len(seen())} of {expected_total(site)} messages; missing "
                                     f"{len(missing)}: {missing[:20]}\n{logs}") from None
    finally:
        for n in nodes:
            n.stop()
        for s in senders.values():
            await s.close()
        await m.stop()
        for s in (a, b, c):
            await s.stop()

    # Order per (source, group) at every target; redeliveries keep their ids.
    redeliveries: dict[str, int] = {}
    received = {"a": [r.event for r in a.events], "b": [r.event for r in b.events], "c": [r.event for r in c.events],
                "m": m.received}
    for site, events in received.items():
        seen_ids: set[str] = set()
        by: dict[tuple[str, int], list[int]] = defaultdict(list)
        dupes = 0
        for ev in events:
            if ev["id"] in seen_ids:
                dupes += 1
                continue
            seen_ids.add(ev["id"])
            src, grp, n = ev["data"]["text"].split("|")
            by[src, int(grp[1:])].append(int(n))
        for (src, g), sent in accepted.items():
            if src == site:
                continue
            assert by[src, g] == sent, f"order or completeness broken at {site}: {src}/g{g}"
        redeliveries[site] = dupes
    first_wid: dict[str, str] = {}
    for r in c.events:  # single-event deliveries: the webhook-id must not change on a redelivery
        assert first_wid.setdefault(r.event["id"], r.webhook_id) == r.webhook_id, "a redelivery changed webhook-id"
    total = sum(len(v) for v in accepted.values())
    with capsys.disabled():
        print(f"\ncluster test: 3 nodes, {total} messages accepted ({refused} sends refused or failed over), "
              f"delivery before the kill by node: {[int(d) for d in delivered_by]}, takeover after SIGKILL "
              f"{takeover:.1f} s; redeliveries: " + ", ".join(f"{k}={v}" for k, v in redeliveries.items())
              + f"; MQTT publishes the broker did not accept (republished): {m.republished}")
