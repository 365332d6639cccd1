"""A real webhook site for tests: an aiohttp server on 127.0.0.1 that verifies
signatures, records what it receives, names its own ids, and can be told to
fail. Plus a signed sender. Used by the end-to-end and crash tests."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from adapters.webhook.signing import secret_key, sign, verify

CE = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@dataclass
class Received:
    webhook_id: str
    event: dict[str, Any]


@dataclass
class Site:
    """One community site. ``events`` holds every CloudEvent received, in
    order, including redeliveries; ``seen`` the distinct ids."""

    name: str
    secret: str
    prefix: str
    port: int = field(default_factory=free_port)
    fail_with: int | None = None
    retry_after: str | None = None
    echo_to: "Sender | None" = None
    events: list[Received] = field(default_factory=list)
    webhook_ids: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    own_ids: dict[str, str] = field(default_factory=dict)
    refused: int = 0
    _runner: web.AppRunner | None = None
    _counter: Any = field(default_factory=lambda: itertools.count(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/inbox"

    def config(self, *, batch_max: int = 20) -> str:
        return (f'[platforms.{self.name}]\nkind = "webhook"\nsecret = "{self.secret}"\n'
                f'url = "{self.url}"\nbatch_max = {batch_max}\ntimeout = 5\n')

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/inbox", self._inbox)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _inbox(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(secret_key(self.secret), request.headers.get("webhook-id"),
                   request.headers.get("webhook-timestamp"), request.headers.get("webhook-signature"),
                   body, time.time())
        except ValueError:
            return web.Response(status=401)
        if self.fail_with is not None:
            self.refused += 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=self.fail_with, headers=headers)
        parsed = orjson.loads(body)
        events = parsed if request.content_type == CE_BATCH else [parsed]
        wid = request.headers["webhook-id"]
        self.webhook_ids.append(wid)
        ids = {}
        for ev in events:
            self.events.append(Received(wid, ev))
            data = ev.get("data", {})
            if ev["type"] == "civic.message.created" and ev["id"] not in self.seen:
                own = f"{self.prefix}{next(self._counter)}"
                self.own_ids[data["id"]] = own
                ids[data["id"]] = own
            elif ev["type"] == "civic.message.created":
                ids[data["id"]] = self.own_ids[data["id"]]
            self.seen.add(ev["id"])
        if self.echo_to is not None:
            for ev in events:  # a site whose own hooks fire for relayed posts
                echo = dict(ev, id="echo-" + ev["id"], source=f"https://{self.name}.example")
                await self.echo_to.send([echo])
        return web.json_response({"ids": ids})

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        """Distinct received events of one type, first arrival order."""
        out, seen = [], set()
        for r in self.events:
            if r.event["type"] == type_ and r.event["id"] not in seen:
                seen.add(r.event["id"])
                out.append(r.event)
        return out


class Sender:
    """Signs and posts CloudEvents to the gateway as one site."""

    def __init__(self, gateway_url: str, platform: str, secret: str) -> None:
        self.url = f"{gateway_url}/v1/platforms/{platform}/events"
        self.key = secret_key(secret)
        self.platform = platform
        self._session: aiohttp.ClientSession | None = None
        self._n = itertools.count(1)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    def event(self, type_: str, group: str, data: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        return {"specversion": "1.0", "id": event_id or f"{self.platform}-ev-{next(self._n)}",
                "source": f"https://{self.platform}.example", "type": type_, "subject": group, "data": data}

    async def send(self, events: list[dict[str, Any]], *, batch: bool | None = None, body: bytes | None = None,
                   content_type: str | None = None, sign_with: bytes | None = None,
                   timestamp: int | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        as_batch = len(events) > 1 if batch is None else batch
        if body is None:
            body = orjson.dumps(events if as_batch else events[0])
        ts = int(time.time()) if timestamp is None else timestamp
        wid = f"msg_{os.urandom(6).hex()}"
        h = {"content-type": content_type or (CE_BATCH if as_batch else CE), "webhook-id": wid,
             "webhook-timestamp": str(ts), "webhook-signature": sign(sign_with or self.key, wid, ts, body)}
        h.update(headers or {})
        s = await self.session()
        async with s.post(self.url, data=body, headers=h) as resp:
            text = await resp.read()
            try:
                parsed = orjson.loads(text)
            except orjson.JSONDecodeError:
                parsed = text.decode()
            return resp.status, parsed


async def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until ``predicate()`` is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
