"""MQTT sites: CloudEvents over an MQTT 5 broker (docs/mqtt.md).

A site publishes on ``{prefix}/{platform}/in`` and receives on
``{prefix}/{platform}/out/{group}``; what the gateway refuses is explained on
``{prefix}/{platform}/errors``. QoS 1 both ways.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt import encode, inbound
from adapters.mqtt.client import NO_MATCHING_SUBSCRIBERS, AckingClient, Connection
from adapters.mqtt.config import MqttConfig
from gateway.adapter import Adapter, AdapterContext, Capabilities, Delivery, DeliveryResult
from gateway.errors import PermanentDeliveryError, TransientDeliveryError
from gateway.tasks import TaskGroup

PERMANENT_REASONS = frozenset({0x90, 0x95, 0x99})
"""PUBACK reason codes that retrying cannot change: topic name invalid, packet
too large, payload format invalid. Every other refusal (not authorized, quota
exceeded, ...) is retried: it is usually the broker's configuration, fixed
later, and nothing is lost meanwhile."""


class MqttAdapter(Adapter):
    """The common schema spoken natively, as for webhook sites: every capability
    is on; ``batch_max`` comes from the config. Sites cannot answer with ids,
    so a delivery returns none (the gateway's own ids stand)."""

    kind = "mqtt"
    Config = MqttConfig

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        self.config: MqttConfig = ctx.config
        self._caps = Capabilities(batch_max=self.config.batch_max)
        client_id = self.config.client_id or f"civic-gateway-mqtt.{ctx.name}.{ctx.node}"
        self.connection = Connection(self.config, client_id, encode.in_filter(self.config.topic_prefix, ctx.name),
                                     self._take)
        self._tasks = TaskGroup()

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    async def start(self) -> None:
        self._tasks.spawn(self.connection.run(), f"mqtt-{self.name}")

    async def stop(self) -> None:
        await self._tasks.close()

    async def _take(self, client: AckingClient, messages: list[aiomqtt.Message]) -> None:
        await inbound.take(self.ctx, self.config, client, messages)

    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        """Publish every event of ``batch`` at QoS 1, all in flight together, and
        wait for every PUBACK."""
        client = self.connection.client
        if client is None or not client.connected:
            raise TransientDeliveryError(f"not connected to the MQTT broker {self.config.redacted_broker()}")
        source, prefix, mode = self.ctx.gateway_source, self.config.topic_prefix, self.config.content_mode
        outgoing = [encode.message(source, prefix, self.name, d, mode) for d in batch]
        acks: list[asyncio.Future[int]] = []
        try:
            for out in outgoing:
                acks.append(client.publish_nowait(out.topic, out.payload, _properties(out)))
        except aiomqtt.MqttError as exc:
            _forget(acks)
            raise TransientDeliveryError(f"could not publish: {exc}") from None
        except ValueError as exc:  # a topic or payload MQTT cannot carry
            _forget(acks)
            raise PermanentDeliveryError(f"could not publish: {exc}") from None
        try:
            codes = await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True), self.config.ack_timeout)
        except asyncio.TimeoutError:
            raise TransientDeliveryError(f"no PUBACK from the broker within {self.config.ack_timeout:g} s") from None
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


def _properties(out: encode.Outgoing) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = out.content_type
    props.PayloadFormatIndicator = 1  # UTF-8 JSON
    if out.user_properties:
        props.UserProperty = list(out.user_properties)
    return props


def _forget(acks: list[asyncio.Future[int]]) -> None:
    for fut in acks:
        fut.cancel()
