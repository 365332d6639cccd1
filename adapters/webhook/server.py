"""Inbound: ``POST /v1/platforms/{name}/events`` for one webhook site.

The order of checks is the order of the status codes a site can get: 415
content type, 413 size (before reading past the limit), 401 signature, 400
schema, then 202 once the events are durably stored (or 429/503 under load).
Nothing is stored unless every check passed.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from adapters.webhook import decode
from adapters.webhook.config import WebhookConfig
from adapters.webhook.signing import SignatureError, verify
from gateway.adapter import AdapterContext, Overloaded
from gateway.errors import DecodeError


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise DecodeError(f"body is larger than {limit} bytes", status=413)
    chunks = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise DecodeError(f"body is larger than {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def handle(ctx: AdapterContext, config: WebhookConfig, request: web.Request) -> web.Response:
    platform = ctx.name
    try:
        decode.check_content_type(request.content_type)
        body = await _read_limited(request, config.max_body)
        now = time.time()
        try:
            verify(config.key, request.headers.get("webhook-id"), request.headers.get("webhook-timestamp"),
                   request.headers.get("webhook-signature"), body, now, config.tolerance)
        except SignatureError as exc:
            raise DecodeError(str(exc), status=401) from None
        events = decode.decode_body(request.content_type, body)
    except DecodeError as exc:
        ctx.metrics.decode_errors.labels(platform, str(exc.status)).inc()
        return web.json_response(exc.as_json(), status=exc.status, headers=exc.headers)
    inbound = [decode.to_inbound(platform, e, now) for e in events]
    try:
        result = await ctx.ingest(inbound)
    except Overloaded as exc:
        ctx.metrics.overloaded.labels(platform, str(exc.status)).inc()
        return web.json_response({"error": str(exc)}, status=exc.status,
                                 headers={"Retry-After": str(exc.retry_after)})
    answer: dict[str, object] = {"accepted": result.accepted, "duplicates": result.duplicates}
    # Stored but not relayed, and why (e.g. "unlinked": no link names the group): a site sees its mistake.
    not_relayed = [{"index": i, "id": ev.event_id, "reason": why}
                   for i, (ev, why) in enumerate(zip(inbound, result.outcomes)) if why not in ("accepted", "duplicate")]
    if not_relayed:
        answer["not_relayed"] = not_relayed
    return web.Response(body=orjson.dumps(answer), status=202, content_type="application/json")
