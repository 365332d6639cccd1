"""``Gateway.stop`` leaves nothing running: every task the gateway started
(delivery workers in their retry waits, the chores, the cluster's leases and
its MQTT bus, the adapters' connections, ingests an adapter shielded) has
ended when ``stop`` returns, and none is destroyed while pending.

The gateway runs in-process with webhook sites and an MQTT platform on the
test's own Mosquitto; the cluster variant uses a PostgreSQL store and the
MQTT bus. Traffic is under way when ``stop`` is called: one site refuses
everything (its deliveries wait to be retried) and events are still being
posted.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiomqtt
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import parse
from gateway.runtime import Gateway
from tests.services import Mosquitto, ServiceUnavailable, free_port, temp_database
from tests.sitekit import Sender, Site, new_secret, wait_for

ROOT = Path(__file__).resolve().parent.parent
OURS = (str(ROOT / "gateway") + os.sep, str(ROOT / "adapters") + os.sep)


def _code_file(task: asyncio.Task) -> str:
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    return code.co_filename if code is not None else ""


def gateway_tasks(tasks: set[asyncio.Task]) -> list[str]:
    """The pending tasks whose coroutine is the gateway's or an adapter's, named."""
    return sorted(f"{t.get_name()} ({_code_file(t)})" for t in tasks
                  if not t.done() and _code_file(t).startswith(OURS))


@contextmanager
def destroyed_pending(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """What asyncio logged as "Task was destroyed but it is pending" meanwhile
    (read after the block, once the garbage collector ran)."""
    found: list[str] = []
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield found
    gc.collect()
    found.extend(r.getMessage() for r in caplog.records if "Task was destroyed but it is pending" in r.getMessage())


def mqtt_event(n: int) -> bytes:
    return orjson.dumps({"specversion": "1.0", "id": f"m-{n}", "source": "https://m.example",
                         "type": "civic.message.created", "subject": "g-m",
                         "data": {"id": f"post-m-{n}", "author": {"id": "user-1", "name": "Anja"}, "text": f"m {n}"}})


async def run_and_stop(tmp_path: Path, mosq: Mosquitto, gateway_extra: str = "",
                       database: str | None = None) -> list[str]:
    """Start a gateway (webhook a, b, c and MQTT m, all linked), move traffic,
    stop it while more is posted; returns the gateway's tasks left pending."""
    sites = {n: Site(n, new_secret(), prefix=f"{n}{n}-") for n in ("a", "b", "c")}
    for s in sites.values():
        await s.start()
    sites["c"].fail_with = 503  # its deliveries wait in retry when the gateway stops
    port = free_port()
    groups = ", ".join(f'{{platform = "{n}", group = "g-{n}"}}' for n in (*sites, "m"))
    text = (f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{database or tmp_path / "gw.db"}"\n'
            f'log_format = "text"\nretry_max_delay = 0.5\n{gateway_extra}\n'
            + "".join(s.config() for s in sites.values())
            + f'[platforms.m]\nkind = "mqtt"\nbroker = "{mosq.url}"\n'
            + f'[[links]]\nname = "all"\ngroups = [{groups}]\n')
    before = asyncio.all_tasks()
    gw = Gateway(parse(text, "test.toml"))
    await gw.start()
    await gw.serve("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    senders = {n: Sender(url, n, s.secret) for n, s in sites.items()}
    try:
        adapter = gw.adapters["m"]
        await asyncio.wait_for(asyncio.gather(adapter.connection.connected.wait(),  # type: ignore[attr-defined]
                                              adapter.publisher.connected.wait()), 10)  # type: ignore[attr-defined]
        for i in range(5):
            status, _ = await senders["a"].send([senders["a"].event(
                "civic.message.created", "g-a", {"id": f"a-{i}", "author": {"id": "u1", "name": "U"},
                                                  "text": f"a {i}"})])
            assert status == 202
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/cloudevents+json"
        async with aiomqtt.Client("127.0.0.1", mosq.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            for i in range(3):
                await client.publish("civic/v1/m/in", mqtt_event(i), qos=1, properties=props)
        await wait_for(lambda: len(sites["b"].of_type("civic.message.created")) == 8, what="a's and m's events at b")
        await wait_for(lambda: sites["c"].refused >= 1, what="c refusing")

        async def keep_posting() -> None:
            for i in range(1000):
                try:
                    await senders["b"].send([senders["b"].event(
                        "civic.message.created", "g-b", {"id": f"b-{i}", "author": {"id": "u2", "name": "V"},
                                                          "text": f"b {i}"})])
                except Exception:
                    return  # the server went away: what the test wants
        posting = asyncio.ensure_future(keep_posting())
        await wait_for(lambda: len(sites["a"].of_type("civic.message.created")) >= 1, what="b's events at a")
        await gw.stop()  # no runner.cleanup() first: stop closes the HTTP server itself
        left = gateway_tasks(asyncio.all_tasks() - before)
        await posting
        return left
    finally:
        for s in senders.values():
            await s.close()
        for s in sites.values():
            await s.stop()


async def test_stop_leaves_no_task_of_the_gateway(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Mosquitto(tmp_path / "mosquitto") as mosq, destroyed_pending(caplog) as destroyed:
        left = await run_and_stop(tmp_path, mosq)
    assert left == []
    assert destroyed == []


async def test_a_cluster_node_stop_leaves_no_task(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same with a shared store and the MQTT bus: the cluster's lease and
    poll loops, the bus's connection and sender end too."""
    try:
        db = temp_database()
        dsn = db.__enter__()
    except (ServiceUnavailable, OSError) as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    try:
        with Mosquitto(tmp_path / "mosquitto") as mosq, destroyed_pending(caplog) as destroyed:
            left = await run_and_stop(tmp_path, mosq, f'bus = "{mosq.url}"\nnode = "n1"', database=dsn)
    finally:
        db.__exit__(None, None, None)
    assert left == []
    assert destroyed == []
