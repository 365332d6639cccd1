"""Outbound: publish the core's events to ``{prefix}/{platform}/out/{group}``
at QoS 1 and wait for the broker's PUBACKs (the adapter's ``deliver``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt import encode
from adapters.mqtt.config import MqttConfig
from adapters.mqtt.connection import NO_MATCHING_SUBSCRIBERS, AckingClient
from gateway.kit import Delivery, DeliveryResult, PermanentDeliveryError, TransientDeliveryError

PACKET_OVERHEAD = 4096
"""Bytes of a PUBLISH besides its payload, at most (topic, packet id, properties, header)."""
PERMANENT_REASONS = frozenset({0x90, 0x95, 0x99})
"""PUBACK reason codes that retrying cannot change: topic name invalid, packet
too large, payload format invalid. Every other refusal (not authorized, quota
exceeded, ...) is retried: it is usually the broker's configuration, fixed
later, and nothing is lost meanwhile."""


async def publish(client: AckingClient | None, config: MqttConfig, source: str, platform: str,
                  batch: Sequence[Delivery]) -> DeliveryResult:
    """Publish ``batch`` at QoS 1 (each event its own message, all in flight
    together, or with ``content_mode = "batch"`` one message for them all)
    and wait for every PUBACK."""
    if client is None or not client.connected:
        raise TransientDeliveryError(f"not connected to the MQTT broker {config.redacted_broker()}")
    prefix, mode = config.topic_prefix, config.content_mode
    acks: list[asyncio.Future[int]] = []
    try:
        limit = config.batch_bytes
        if client.max_packet_size is not None:  # room for the topic and properties, too
            limit = max(1024, min(limit, client.max_packet_size - PACKET_OVERHEAD))
        outgoing = encode.messages(source, prefix, platform, batch, mode, limit)
        for out in outgoing:
            acks.append(client.publish_nowait(out.topic, out.payload, _properties(out)))
    except aiomqtt.MqttError as exc:
        _forget(acks)
        raise TransientDeliveryError(f"could not publish: {exc}") from None
    except ValueError as exc:  # a topic or payload MQTT cannot carry
        _forget(acks)
        raise PermanentDeliveryError(f"could not publish: {exc}") from None
    try:
        codes = await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True), config.ack_timeout)
    except asyncio.TimeoutError:
        raise TransientDeliveryError(f"no PUBACK from the broker within {config.ack_timeout:g} s") from None
    for out, code in zip(outgoing, codes):
        if isinstance(code, BaseException):
            raise TransientDeliveryError(f"publishing to {out.topic} failed: {code}")
        if code == NO_MATCHING_SUBSCRIBERS:
            # The broker dropped it: nobody listens (the site has no persistent
            # session). Keep it in the outbox and try again later.
            raise TransientDeliveryError(f"no subscriber for {out.topic} (the broker answered 0x10)")
        if code >= 0x80:
            error = PermanentDeliveryError if code in PERMANENT_REASONS else TransientDeliveryError
            raise error(f"the broker refused a message on {out.topic} (reason code 0x{code:02x})")
    return DeliveryResult()


class PackedProperties(Properties):
    """PUBLISH properties packed once, when made. paho packs the properties of
    every PUBLISH anew (about 7 µs here) and making a ``Properties`` costs about
    13 µs more; sharing one per Content Type took the gateway's CPU per event,
    relaying one message per event, from 124-142 to 84-88 µs (loadtests/README.md).
    Messages without user properties share one of these per Content Type; do
    not change one after it is made."""

    def __init__(self, content_type: str, user_properties: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(PacketTypes.PUBLISH)
        self.ContentType = content_type
        self.PayloadFormatIndicator = 1  # UTF-8 JSON
        if user_properties:
            self.UserProperty = list(user_properties)
        object.__setattr__(self, "_packed", super().pack())

    def pack(self) -> bytes:
        return self._packed  # type: ignore[no-any-return]


_SHARED: dict[str, PackedProperties] = {}


def _properties(out: encode.Outgoing) -> Properties:
    if out.user_properties:
        return PackedProperties(out.content_type, out.user_properties)
    props = _SHARED.get(out.content_type)
    if props is None:
        props = _SHARED[out.content_type] = PackedProperties(out.content_type)
    return props


def _forget(acks: list[asyncio.Future[int]]) -> None:
    for fut in acks:
        fut.cancel()
