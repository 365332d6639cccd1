"""The gateway's PostgreSQL unreachable for a while (a restart, a network cut):
intake answers 503 with Retry-After at once instead of hanging, ``/readyz``
says the store is unreachable, and when it returns, every event accepted
before is delivered and every refused one is taken when sent again: nothing
is lost, nothing is delivered twice.

The gateway reaches the machine's shared PostgreSQL through a small TCP proxy
of the test's own, which the test cuts (closing its listener and every
connection through it) and restores: the shared server is never stopped."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from adapters.webhook.signing import sign
from gateway.runtime import Gateway
from gateway.config import parse
from tests.services import PG_HOST, PG_PORT, free_port, temp_database
from tests.sitekit import CE, Sender, Site, new_secret, wait_for
from tests.test_health import metric_node

CLIENT_TIMEOUT = 5.0
"""What a site waits for an answer: the test fails if any request runs into it."""
OUTAGE = 7.0
"""Seconds the database stays cut off (at least)."""


class TcpProxy:
    """127.0.0.1:port -> upstream, byte for byte; ``cut`` refuses and drops
    every connection until ``restore``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()
        self.server = None

    async def restore(self) -> None:
        await self.start()


async def post(sender: Sender, events: list[dict[str, Any]]) -> tuple[int, Any, dict[str, str]]:
    """Post signed events as a site does, with its timeout: (status, body, headers)."""
    body = orjson.dumps(events[0])
    ts = int(time.time())
    wid = f"msg_{os.urandom(6).hex()}"
    headers = {"content-type": CE, "webhook-id": wid, "webhook-timestamp": str(ts),
               "webhook-signature": sign(sender.key, wid, ts, body)}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as s:
        try:
            async with s.post(sender.url, data=body, headers=headers) as r:
                return r.status, orjson.loads(await r.read()), dict(r.headers)
        except asyncio.TimeoutError:
            raise AssertionError(f"no answer within {CLIENT_TIMEOUT} s: the sender timed out") from None


async def readyz(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as s:
        async with s.get(f"{url}/readyz") as r:
            return r.status, await r.json()


@pytest.mark.timeout(120)
async def test_store_outage_answers_503_at_once_and_loses_nothing(tmp_path: Path) -> None:
    with temp_database() as dsn:
        await run_outage(tmp_path, dsn)


async def run_outage(tmp_path: Path, dsn: str) -> None:
    proxy = TcpProxy((PG_HOST, PG_PORT))
    await proxy.start()
    a, b = Site("a", new_secret(), "a-"), Site("b", new_secret(), "b-")
    await a.start()
    gw: Gateway | None = None
    try:
        port = free_port()
        database = dsn.replace(f"@{PG_HOST}:{PG_PORT}/", f"@127.0.0.1:{proxy.port}/")
        assert database != dsn
        text = (f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{database}"\nlog_format = "text"\n'
                f'retry_max_delay = 0.5\n' + a.config() + b.config()
                + '[[links]]\nname = "l"\ngroups = [{platform = "a", group = "g"}, {platform = "b", group = "g"}]\n')
        gw = Gateway(parse(text, "test.toml"))
        await gw.start()
        await gw.serve("127.0.0.1", port)
        url = f"http://127.0.0.1:{port}"
        sender = Sender(url, "a", a.secret)
        assert (await readyz(url))[0] == 200

        def message(n: int) -> dict[str, Any]:
            return sender.event("civic.message.created", "g", {"id": f"m{n}", "author": {"id": "ann"},
                                                               "text": f"message {n}"}, event_id=f"ev-{n}")

        # Site b is down: what a accepts now waits in the outbox through the outage.
        before = [message(n) for n in range(20)]
        for ev in before:
            status, body, _ = await post(sender, [ev])
            assert status == 202, body

        await proxy.cut()
        refused: list[dict[str, Any]] = []
        # Longer than the cluster leases last (5 s): delivery stops and must resume afterwards.
        outage_ends = time.monotonic() + OUTAGE
        n = 20
        while time.monotonic() < outage_ends or n < 40:
            ev = message(n)
            n += 1
            await asyncio.sleep(0.1)
            status, body, headers = await post(sender, [ev])  # fails the test if the answer never comes
            assert status == 503, (status, body)
            assert int(headers["Retry-After"]) > 0
            assert "unreachable" in str(body)
            refused.append(ev)
        status, body = await readyz(url)
        assert status == 503, body
        assert body["ready"] is False and body["store"]["reachable"] is False and body["store"]["error"], body
        assert await metric_node(url).metric("civic_store_up") == 0

        await proxy.restore()
        await b.start()
        await wait_for(lambda: gw is not None and gw.store.unavailable() is None, timeout=15,
                       what="the store to find PostgreSQL again")
        # The sites retry what was refused, as told.
        for ev in refused:
            deadline = time.monotonic() + 30
            while True:
                status, body, _ = await post(sender, [ev])
                if status == 202:
                    break
                assert status == 503 and time.monotonic() < deadline, (status, body)
                await asyncio.sleep(0.2)
        deadline = time.monotonic() + 15  # ready again once the leases are renewed
        while (await readyz(url))[0] != 200:
            assert time.monotonic() < deadline, await readyz(url)
            await asyncio.sleep(0.2)
        assert await metric_node(url).metric("civic_store_up") == 1

        await wait_for(lambda: len(b.of_type("civic.message.created")) >= n, timeout=60,
                       what="every accepted event at b")
        await asyncio.sleep(0.5)  # anything more that would come
        # Every event once: a redelivery carries the same CloudEvent id (which a site
        # drops, and of_type folds), so 40 distinct ids holding 40 distinct texts.
        texts = [e["data"]["text"] for e in b.of_type("civic.message.created")]
        assert sorted(texts) == sorted(f"message {i}" for i in range(n))
    finally:
        if gw is not None:
            if gw._runner is not None:
                await gw._runner.cleanup()
            await gw.stop()
        await a.stop()
        await b.stop()
        if proxy.server is not None:
            await proxy.cut()
