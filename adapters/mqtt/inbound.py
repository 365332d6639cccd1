"""Inbound: what a site published on ``{prefix}/{platform}/in``, stored, then acknowledged.

A message is acknowledged (PUBACK) only once its events are durably stored,
so a crash, a lost connection or a restart before that makes the broker send
it again (the store drops the repeat by CloudEvent id). Bad input is reported
on ``{prefix}/{platform}/errors`` and acknowledged without storing anything.
While the gateway sheds load nothing is acknowledged: the same events are
tried again after ``retry_after``, and the broker, its Receive Maximum
reached, holds back the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt import decode, encode
from adapters.mqtt.connection import AckingClient
from adapters.mqtt.config import MqttConfig
from gateway.kit import AdapterContext, Inbound, IngestResult, Overloaded, count_decode_error, count_overloaded

log = logging.getLogger("civic.mqtt")

STORE_RETRY_MAX = 30.0
"""Longest wait before trying again to store events after an unexpected failure."""


def received(message: aiomqtt.Message) -> decode.Received:
    payload = message.payload
    if not isinstance(payload, bytes):
        payload = bytes(payload) if isinstance(payload, bytearray) else str(payload or "").encode()
    props = message.properties
    return decode.Received(payload=payload, content_type=getattr(props, "ContentType", None),
                           user_properties=tuple(getattr(props, "UserProperty", None) or ()))


async def take(ctx: AdapterContext, config: MqttConfig, client: AckingClient,
               messages: Sequence[aiomqtt.Message]) -> None:
    """Store the events of ``messages`` (one transaction), report the bad ones,
    then acknowledge them all in the order they arrived."""
    now = time.time()
    events: list[Inbound] = []
    for message in messages:
        try:
            events.extend(decode.decode(ctx.name, received(message), config.max_payload, now))
        except decode.InputError as err:
            count_decode_error(ctx, err.status)
            await report(client, config, ctx.name, message, err)
    if events:
        await store(ctx, events)
    for message in messages:
        client.ack(message)


async def store(ctx: AdapterContext, events: list[Inbound]) -> IngestResult:
    """``ctx.ingest(events)`` until it succeeds: after ``retry_after`` when the
    gateway is overloaded, with backoff after any other failure."""
    delay = 1.0
    while True:
        # Shielded: cancelling an ingest between its commit and its hand-over to
        # delivery would leave stored events undelivered until a restart.
        attempt = asyncio.ensure_future(ctx.ingest(events))
        attempt.add_done_callback(_observe)
        try:
            return await asyncio.shield(attempt)
        except Overloaded as exc:
            count_overloaded(ctx, exc.status)
            log.info("%s: gateway overloaded (%s); taking %d events again in %d s",
                     ctx.name, exc, len(events), exc.retry_after)
            await asyncio.sleep(exc.retry_after)
        except Exception:
            log.exception("%s: storing %d events failed; trying again in %.0f s", ctx.name, len(events), delay)
            await asyncio.sleep(delay)
            delay = min(STORE_RETRY_MAX, delay * 2)


def _observe(task: asyncio.Future[IngestResult]) -> None:
    """Retrieve the outcome of an ingest nobody awaits any more (its caller was cancelled)."""
    if not task.cancelled():
        task.exception()


async def report(client: AckingClient, config: MqttConfig, platform: str, message: aiomqtt.Message,
                 err: decode.InputError) -> None:
    """Publish ``err`` on the site's ``errors`` topic (Correlation Data echoed, if the site sent any)."""
    log.info("%s: refused a message (%s): %s", platform, err.reason, err)
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = encode.JSON
    props.PayloadFormatIndicator = 1
    correlation = getattr(message.properties, "CorrelationData", None)
    if correlation:
        props.CorrelationData = correlation
    body = encode.error_report(err, str(message.topic))
    try:
        await asyncio.wait_for(client.publish_nowait(encode.errors_topic(config.topic_prefix, platform), body, props),
                               config.ack_timeout)
    except (aiomqtt.MqttError, ValueError, asyncio.TimeoutError) as exc:
        log.warning("%s: could not publish an error report: %s", platform, exc)
