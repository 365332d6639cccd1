"""Inbound: ``POST /v1/platforms/{name}/events`` for one webhook site.

The order of checks is the order of the status codes a site can get: 415
content type; 401 when the signature headers are missing, malformed or their
timestamp is out of the window, answered from the headers alone, before any
of the body is read; then the body, through the gateway's shared reader: 413
over ``max_body`` (before reading past it), 408 when it does not arrive
within ``[gateway] body_timeout``, 503 with ``Retry-After`` when too many
bodies are being received at once; 401 when the signature does not match
the body; 400 schema; then 202 once the events are durably stored (or
429/503 under load). Nothing is stored unless every check passed. Every
error answer is an RFC 9457 problem document (``gateway.problem``).
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from adapters.webhook import decode
from adapters.webhook.config import WebhookConfig
from adapters.webhook.signing import SignatureError, check_headers, verify
from gateway.kit import (
    AdapterContext,
    BodyError,
    DecodeError,
    Overloaded,
    count_decode_error,
    count_overloaded,
    problem,
)

_KIND = {401: "bad-signature", 408: "body-timeout", 413: "body-too-large", 415: "unsupported-media-type",
         503: "busy"}


async def handle(ctx: AdapterContext, config: WebhookConfig, request: web.Request) -> web.Response:
    platform = ctx.name
    try:
        decode.check_content_type(request.content_type)
        h = request.headers
        signed = (h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature"))
        try:
            check_headers(*signed, time.time(), config.tolerance)
            body = await ctx.read_body(request, config.max_body)
            now = time.time()
            verify(config.key, *signed, body, now, config.tolerance)
        except SignatureError as exc:
            raise DecodeError(str(exc), status=401) from None
        except BodyError as exc:
            raise DecodeError(str(exc), status=exc.status, headers=exc.headers) from None
        events = decode.decode_body(request.content_type, body)
    except DecodeError as exc:
        count_decode_error(ctx, exc.status)
        kind = _KIND.get(exc.status) or ("malformed-json" if str(exc).startswith("malformed JSON")
                                         else "invalid-event")
        return problem(exc.status, str(exc), kind, headers=exc.headers, index=exc.index, field=exc.field)
    inbound = [decode.to_inbound(platform, e, now) for e in events]
    try:
        result = await ctx.ingest(inbound)
    except Overloaded as exc:
        count_overloaded(ctx, exc.status)
        return problem(exc.status, str(exc), "busy", headers={"Retry-After": str(exc.retry_after)})
    answer: dict[str, object] = {"accepted": result.accepted, "duplicates": result.duplicates}
    # Stored but not relayed, and why (e.g. "unlinked": no link names the group): a site sees its mistake.
    not_relayed = [{"index": i, "id": ev.event_id, "reason": why}
                   for i, (ev, why) in enumerate(zip(inbound, result.outcomes)) if why not in ("accepted", "duplicate")]
    if not_relayed:
        answer["not_relayed"] = not_relayed
    return web.Response(body=orjson.dumps(answer), status=202, content_type="application/json")
