"""The appservice refuses, once, a numbered transaction that skips one while
the homeserver may be recovering from the gateway's absence, so that Synapse
goes back into recovery and sends the stranded older one first; later, gaps
are other appservices' numbers and pass (see ``AppserviceInbound._skips_one``).
No homeserver needed: the routes on a local aiohttp server, transactions PUT
as Synapse would, and a clock of the test's own."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from adapters.matrix.config import MatrixConfig
from adapters.matrix.inbound import GAP_WATCH, AppserviceInbound
from gateway.adapter import Inbound, IngestResult, Overloaded
from tests.services import free_port


class Hooks:
    """Counts the gaps ``AppserviceInbound`` reports through ``on_gap``."""

    def __init__(self) -> None:
        self.gaps = 0

    def gap(self) -> None:
        self.gaps += 1


def message(n: int) -> dict[str, Any]:
    return {"type": "m.room.message", "sender": "@alice:hub.test", "room_id": "!room", "event_id": f"$e{n}",
            "origin_server_ts": 1_700_000_000_000 + n, "content": {"msgtype": "m.text", "body": f"message {n}"}}


async def test_a_skipped_transaction_is_asked_for_first_and_nothing_is_lost_or_reordered() -> None:
    port = free_port()
    config = msgspec.convert({"homeserver": "http://127.0.0.1:9", "server_name": "hub.test",
                              "as_token": secrets.token_urlsafe(32), "hs_token": secrets.token_urlsafe(32),
                              "appservice_url": f"http://127.0.0.1:{port}/hub"}, MatrixConfig)
    stored: list[str] = []
    busy = [False]

    async def ingest(events: Sequence[Inbound]) -> IngestResult:
        if busy[0]:
            busy[0] = False
            raise Overloaded(503, 1, "busy")
        stored.extend(e.payload.text for e in events)
        return IngestResult(accepted=len(events), duplicates=0)

    hooks = Hooks()
    now = [1000.0]
    inbound = AppserviceInbound(ingest, config, "hub", on_gap=hooks.gap, clock=lambda: now[0])
    app = web.Application()
    app.add_routes(inbound.routes())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    headers = {"Authorization": f"Bearer {config.hs_token}"}
    url = f"http://127.0.0.1:{port}/hub/_matrix/app/v1/transactions/"
    try:
        async with aiohttp.ClientSession(headers=headers) as s:
            async def put(txn: str, n: int) -> int:
                async with s.put(url + txn, json={"events": [message(n)]}) as r:
                    return r.status

            assert await put("5", 5) == 200        # the first one seen: anything goes
            assert await put("6", 6) == 200
            assert await put("8", 8) == 503        # 7 is missing: refused, nothing stored
            assert hooks.gaps == 1 and stored == ["message 5", "message 6"]
            assert await put("7", 7) == 200        # Synapse's recoverer sends the oldest first
            assert await put("8", 8) == 200
            assert await put("10", 10) == 503      # another gap, refused once ...
            assert await put("10", 10) == 200      # ... and taken when it comes again (9 never existed)
            assert await put("11", 11) == 200
            assert await put("abc", 12) == 200     # ids that are not numbers are not judged
            now[0] += GAP_WATCH + 1                 # long after the start and the last refusal:
            assert await put("20", 20) == 200      # a gap is another appservice's numbers
            busy[0] = True
            assert await put("21", 21) == 503      # the gateway refused one: Synapse recovers, watch again
            assert await put("23", 23) == 503      # so a gap is refused once more
            assert await put("21", 21) == 200 and await put("23", 23) == 200
    finally:
        await runner.cleanup()
    assert stored == [f"message {n}" for n in (5, 6, 7, 8, 10, 11, 12, 20, 21, 23)]
    assert inbound.gaps == 3 and hooks.gaps == 3
