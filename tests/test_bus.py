"""The cluster bus over a real Mosquitto (the test's own), and the pieces of
cluster delivery that do not need several processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from gateway.bus import STATE, WAKE, LocalBus
from gateway.bus_mqtt import MqttBus
from gateway.cluster import partition_of
from gateway.ids import GroupId, GroupRef, PlatformName
from tests.services import Mosquitto
from tests.sitekit import wait_for

ROOT = Path(__file__).resolve().parent.parent


async def test_hints_reach_the_other_nodes_but_not_the_sender(tmp_path: Path) -> None:
    with Mosquitto(tmp_path) as mosq:
        got: dict[str, list[tuple[str, bytes]]] = {"n1": [], "n2": []}
        buses = {}
        for name in ("n1", "n2"):
            bus = MqttBus(mosq.url, name)
            bus.subscribe(WAKE, lambda p, name=name: got[name].append((WAKE, p)))
            bus.subscribe(STATE, lambda p, name=name: got[name].append((STATE, p)))
            await bus.start()
            buses[name] = bus
        try:
            await wait_for(lambda: all(b.connected for b in buses.values()), 10, "both buses connected")
            await asyncio.sleep(0.2)  # subscriptions are in place once connected; give the broker a moment
            buses["n1"].publish(WAKE, b"w1")
            buses["n1"].publish(STATE, b"")
            await wait_for(lambda: len(got["n2"]) == 2, 5, "hints at n2")
            await asyncio.sleep(0.3)
            assert got["n2"] == [(WAKE, b"w1"), (STATE, b"")]
            assert got["n1"] == [], "a node heard its own hint (MQTT 5 no-local not applied)"
        finally:
            for b in buses.values():
                await b.stop()


async def test_bus_reconnects_after_a_broker_restart_and_says_so(tmp_path: Path) -> None:
    with Mosquitto(tmp_path) as mosq:
        connects = {"n1": 0, "n2": 0}
        got: list[bytes] = []
        buses = []
        for name in ("n1", "n2"):
            bus = MqttBus(mosq.url, name)
            bus.subscribe(WAKE, got.append if name == "n2" else (lambda p: None))
            bus.on_connect = lambda name=name: connects.__setitem__(name, connects[name] + 1)
            await bus.start()
            buses.append(bus)
        try:
            await wait_for(lambda: connects["n1"] == 1 and connects["n2"] == 1, 10, "first connection")
            mosq.restart(down_for=0.5)
            await wait_for(lambda: connects["n1"] == 2 and connects["n2"] == 2, 20, "reconnection after restart")
            await asyncio.sleep(0.2)
            buses[0].publish(WAKE, b"after")
            await wait_for(lambda: b"after" in got, 5, "a hint after the restart")
        finally:
            for b in buses:
                await b.stop()


async def test_local_bus_calls_on_connect_and_sends_nothing() -> None:
    bus = LocalBus()
    heard: list[bytes] = []
    called = asyncio.Event()
    bus.subscribe(WAKE, heard.append)
    bus.on_connect = called.set
    await bus.start()
    await asyncio.wait_for(called.wait(), 1)
    bus.publish(WAKE, b"x")
    await asyncio.sleep(0.01)
    assert heard == [] and bus.connected


def test_partition_of_is_the_same_in_every_process() -> None:
    groups = [GroupRef(PlatformName(f"p{i % 3}"), GroupId(f"group-{i}")) for i in range(200)]
    here = [partition_of(g, 64) for g in groups]
    code = ("from gateway.cluster import partition_of; from gateway.ids import GroupRef;"
            f"print([partition_of(GroupRef(f'p{{i % 3}}', f'group-{{i}}'), 64) for i in range(200)])")
    for seed in ("1", "2"):  # str hashing differs per process; the partition must not
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"})
        assert eval(out.stdout) == here
    assert len(set(here)) > 40, "groups are not spread over the partitions"


# -- cluster delivery: wake and release -------------------------------------------------------
from collections.abc import Sequence  # noqa: E402

from gateway.adapter import Adapter, AdapterContext, Capabilities, Delivery, DeliveryResult  # noqa: E402
from gateway.delivery import DeliveryEngine  # noqa: E402
from gateway.ids import EventId  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.store.base import encode_payload  # noqa: E402
from gateway.store.sqlite import SqliteStore  # noqa: E402
from gateway.tasks import TaskGroup  # noqa: E402
from schemas.v1 import Actor, Message  # noqa: E402


class HeldAdapter(Adapter):
    """Delivers one event at a time; each delivery waits until the test lets it go."""

    kind = "held"
    Config = Capabilities  # unused

    def __init__(self) -> None:
        super().__init__(AdapterContext(name=PlatformName("t"), config=None, ingest=None,  # type: ignore[arg-type]
                                        metrics=Metrics(), gateway_source="urn:test"))
        self.sent: list[str] = []
        self.gate = asyncio.Semaphore(0)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(batch_max=1)

    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        await self.gate.acquire()
        self.sent.extend(d.event_id for d in batch)
        return DeliveryResult()


async def test_wake_pages_committed_rows_and_release_stops_the_queue(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    target = GroupRef(PlatformName("t"), GroupId("g"))
    body = encode_payload(Message(id="m", author=Actor(id="u"), text="hi"))
    for i in range(5):
        await store.transact(lambda tx, i=i: tx.enqueue(target, EventId(f"e{i}"), "civic.message.created",
                                                        PlatformName("s"), 1.0, None, body))
    adapter = HeldAdapter()
    tasks = TaskGroup()
    engine = DeliveryEngine(store, {PlatformName("t"): adapter}, Metrics(), tasks)
    engine.owns = lambda t: True
    try:
        engine.wake(target)  # nothing was submitted in memory: the rows come from the store
        adapter.gate.release()
        adapter.gate.release()
        await wait_for(lambda: len(adapter.sent) == 2, 5, "two deliveries")
        await asyncio.sleep(0.05)  # the third is now in flight, waiting at the gate
        engine.release(lambda t: t == target)
        adapter.gate.release()  # the batch in flight finishes ...
        await wait_for(lambda: len(adapter.sent) == 3, 5, "the batch in flight")
        for _ in range(5):
            adapter.gate.release()
        await asyncio.sleep(0.3)
        assert adapter.sent == ["e0", "e1", "e2"], "a released queue went on delivering"
        await engine._completions.idle.wait()
        # ... and when this node owns the group again it starts from what is still undelivered.
        engine.wake(target)
        await wait_for(lambda: len(adapter.sent) == 5, 5, "the rest after taking the group back")
        assert adapter.sent == ["e0", "e1", "e2", "e3", "e4"]
    finally:
        await engine.stop()
        await tasks.close()
        await store.close()
