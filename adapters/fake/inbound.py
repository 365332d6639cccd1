"""Inbound: native events a test posts, decoded and handed to the core.

Two doors, both ending in ``ctx.ingest``: ``receive`` (a method, for tests in
the same process) and ``POST /v1/platforms/{name}/events`` with a native event
or a JSON array of them (answered 202 with what the core accepted, or a
problem document). No authentication: the fake is for tests only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import orjson
from aiohttp import web

from adapters.fake import decode
from gateway.kit import AdapterContext, BodyError, DecodeError, IngestResult, Overloaded, problem

MAX_BODY = 1024 * 1024


async def receive(ctx: AdapterContext, natives: Sequence[Any]) -> IngestResult:
    """Decode ``natives`` (all or none: ``DecodeError`` names the bad one) and store them."""
    now = time.time()
    inbound = []
    for i, native in enumerate(natives):
        try:
            inbound.append(decode.decode(ctx.name, native, now))
        except DecodeError as exc:
            exc.index = i
            raise
    return await ctx.ingest(inbound)


async def handle(ctx: AdapterContext, request: web.Request) -> web.Response:
    try:
        body = await ctx.read_body(request, MAX_BODY)
        doc = msgspec.json.decode(body)
        result = await receive(ctx, doc if isinstance(doc, list) else [doc])
    except BodyError as exc:
        return problem(exc.status, str(exc), "busy", headers=exc.headers)
    except msgspec.DecodeError as exc:
        return problem(400, f"malformed JSON: {exc}", "malformed-json")
    except DecodeError as exc:
        ctx.metrics.decode_errors.labels(ctx.name, str(exc.status)).inc()
        return problem(exc.status, str(exc), "invalid-event", index=exc.index, field=exc.field)
    except Overloaded as exc:
        return problem(exc.status, str(exc), "busy", headers={"Retry-After": str(exc.retry_after)})
    answer = {"accepted": result.accepted, "duplicates": result.duplicates, "outcomes": list(result.outcomes)}
    return web.Response(body=orjson.dumps(answer), status=202, content_type="application/json")
