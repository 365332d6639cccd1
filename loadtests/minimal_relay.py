"""A minimal relay of the gateway's webhook contract that keeps nothing durable.

It is the reference the relay benchmark compares the gateway with: the same
stack (aiohttp server and client, msgspec, uvloop) and the same wire contract,
but no store, no id mapping, no policy. It is what the gateway would cost if it
did nothing but relay, so ratios against it show what the rest costs.

    python -m loadtests.minimal_relay --config FILE

Reads the gateway's TOML (``[gateway] listen``, ``[platforms.NAME]`` with
``kind = "webhook"``, ``secret``, ``url``, ``batch_max``, and ``[[links]]``
with ``groups``); other keys are ignored. ``POST /v1/platforms/{name}/events``
verifies the Standard Webhooks signature, decodes a single CloudEvent or a
batch by Content-Type, answers 202 and queues each event, re-addressed to the
target group, on an in-memory ordered queue per target group. One worker per
target group sends what is queued, up to ``batch_max`` events per request,
re-signed, one request in flight, retrying in order until the target answers
2xx. Everything queued is lost when the process stops: this is not a gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import signal
import time
import tomllib
from dataclasses import dataclass, field

import aiohttp
import msgspec
from aiohttp import web

from adapters.webhook.signing import SignatureError, secret_key, sign, verify
from schemas.cloudevents import (
    BATCH_CONTENT_TYPE,
    CONTENT_TYPE,
    CloudEventBase,
    batch_decoder,
    encoder,
    single_decoder,
)

DEFAULT_BATCH_MAX = 100


@dataclass
class Platform:
    name: str
    key: bytes
    url: str | None
    batch_max: int


@dataclass
class Target:
    """One target group: its ordered queue and the worker that drains it."""

    platform: Platform
    group: str
    queue: collections.deque[CloudEventBase] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, event: CloudEventBase) -> None:
        self.queue.append(event)
        self.wake.set()


@dataclass
class Relay:
    platforms: dict[str, Platform]
    routes: dict[tuple[str, str], list[Target]]
    targets: list[Target]
    ids: itertools.count = field(default_factory=itertools.count)


def load(path: str) -> tuple[str, int, Relay]:
    """Read the gateway TOML; return (host, port, relay)."""
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    host, _, port = cfg.get("gateway", {}).get("listen", "127.0.0.1:8080").rpartition(":")
    platforms = {
        name: Platform(name, secret_key(p["secret"]), p.get("url"), int(p.get("batch_max", DEFAULT_BATCH_MAX)))
        for name, p in cfg.get("platforms", {}).items()
        if p.get("kind") == "webhook"
    }
    targets: dict[tuple[str, str], Target] = {}
    routes: dict[tuple[str, str], list[Target]] = {}
    for link in cfg.get("links", []):
        members = [(g["platform"], g["group"]) for g in link.get("groups", []) if g.get("platform") in platforms]
        for source in members:
            for dest in members:
                if dest == source or platforms[dest[0]].url is None:
                    continue
                target = targets.setdefault(dest, Target(platforms[dest[0]], dest[1]))
                routes.setdefault(source, []).append(target)
    return host or "127.0.0.1", int(port), Relay(platforms, routes, list(targets.values()))


def make_app(relay: Relay) -> web.Application:
    accepted_body = {n: msgspec.json.encode({"accepted": n, "duplicates": 0}) for n in (0, 1)}

    async def ingest(request: web.Request) -> web.Response:
        platform = relay.platforms.get(request.match_info["name"])
        if platform is None:
            raise web.HTTPNotFound()
        body = await request.read()
        h = request.headers
        try:
            verify(platform.key, h.get("webhook-id"), h.get("webhook-timestamp"),
                   h.get("webhook-signature"), body, time.time())
        except SignatureError as exc:
            raise web.HTTPUnauthorized(text=str(exc)) from None
        try:
            if request.content_type == CONTENT_TYPE:
                events = [single_decoder.decode(body)]
            elif request.content_type == BATCH_CONTENT_TYPE:
                events = batch_decoder.decode(body)
            else:
                raise web.HTTPUnsupportedMediaType()
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise web.HTTPBadRequest(text=str(exc)) from None
        for event in events:
            for target in relay.routes.get((platform.name, event.subject), ()):
                target.push(msgspec.structs.replace(event, subject=target.group))
        n = len(events)
        reply = accepted_body.get(n) or msgspec.json.encode({"accepted": n, "duplicates": 0})
        return web.Response(status=202, body=reply, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def workers(app: web.Application):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            tasks = [asyncio.create_task(deliver(relay, t, session), name=f"deliver {t.platform.name}/{t.group}")
                     for t in relay.targets]
            yield
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.add_routes([web.post("/v1/platforms/{name}/events", ingest), web.get("/healthz", healthz)])
    app.cleanup_ctx.append(workers)
    return app


async def deliver(relay: Relay, target: Target, session: aiohttp.ClientSession) -> None:
    """Drain one target group's queue in order, one request in flight."""
    platform, queue = target.platform, target.queue
    backoff = 0.0
    while True:
        if not queue:
            target.wake.clear()
            await target.wake.wait()
            continue
        events = list(itertools.islice(queue, platform.batch_max))
        if len(events) == 1:
            body, ctype, msg_id = encoder.encode(events[0]), CONTENT_TYPE, events[0].id
        else:
            body, ctype, msg_id = encoder.encode(events), BATCH_CONTENT_TYPE, f"relay-{os.getpid()}-{next(relay.ids)}"
        ts = int(time.time())
        headers = {"content-type": ctype, "webhook-id": msg_id, "webhook-timestamp": str(ts),
                   "webhook-signature": sign(platform.key, msg_id, ts, body)}
        try:
            async with session.post(platform.url, data=body, headers=headers) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
        except (aiohttp.ClientError, OSError):
            ok = False
        if ok:
            for _ in events:
                queue.popleft()
            backoff = 0.0
        else:  # keep order: retry the same events
            backoff = min(max(backoff * 2, 0.05), 2.0)
            await asyncio.sleep(backoff)


async def serve(config: str) -> None:
    host, port, relay = load(config)
    runner = web.AppRunner(make_app(relay), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.minimal_relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the gateway's TOML config")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(serve(args.config))
    else:
        uvloop.run(serve(args.config))


if __name__ == "__main__":
    main()
