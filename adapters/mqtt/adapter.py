"""MQTT sites: CloudEvents over an MQTT 5 broker (docs/mqtt.md).

A site publishes on ``{prefix}/{platform}/in`` and receives on
``{prefix}/{platform}/out/{group}``; what the gateway refuses is explained on
``{prefix}/{platform}/errors``. QoS 1 both ways.
"""

from __future__ import annotations

import asyncio
import functools
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

PACKET_OVERHEAD = 4096
"""Bytes of a PUBLISH besides its payload, at most (topic, packet id, properties, header)."""
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
        # Intake: ONE consumer per platform, whatever the number of gateway
        # nodes, so that a site's messages are stored in the order it sent
        # them (a shared subscription would deal them out to several nodes,
        # which store them in any order). In a cluster the node that leads
        # ``mqtt-in/{platform}`` holds it; its client id is the same on every
        # node, so the next leader takes over the broker session, with every
        # message not yet acknowledged, and the broker cuts off a stale one.
        client_id = self.config.client_id or f"civic-gateway-mqtt.{ctx.name}"
        lead = f"mqtt-in/{ctx.name}"
        self.connection = Connection(self.config, client_id, encode.in_topic(self.config.topic_prefix, ctx.name),
                                     self._take, active=lambda: ctx.leads(lead),
                                     on_state=functools.partial(self._connection_state, "intake"))
        # Delivery: every node publishes the groups it owns, on a connection of its own.
        self.publisher = Connection(self.config, f"{client_id}.out.{ctx.node}", None, None,
                                    on_state=functools.partial(self._connection_state, "delivery"))
        self._down: dict[str, str] = {}  # connection ("intake", "delivery") -> why it is not connected
        self._tasks = TaskGroup()

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def _connection_state(self, which: str, up: bool, why: str) -> None:
        """The platform is up while both connections are (what ``/readyz`` shows)."""
        if up:
            self._down.pop(which, None)
        else:
            self._down[which] = why
        self.ctx.set_up(not self._down, "; ".join(f"{k}: {v}" for k, v in sorted(self._down.items())))

    async def start(self) -> None:
        # Up until a connection attempt fails (a refused one fails at once):
        # a restart does not flap the platform down and up.
        self._tasks.spawn(self.connection.run(), f"mqtt-{self.name}")
        self._tasks.spawn(self.publisher.run(), f"mqtt-{self.name}-out")

    async def stop(self) -> None:
        await self._tasks.close()

    async def _take(self, client: AckingClient, messages: list[aiomqtt.Message]) -> None:
        await inbound.take(self.ctx, self.config, client, messages)

    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        """Publish ``batch`` at QoS 1 (each event its own message, all in flight
        together, or with ``content_mode = "batch"`` one message for them all)
        and wait for every PUBACK."""
        client = self.publisher.client
        if client is None or not client.connected:
            raise TransientDeliveryError(f"not connected to the MQTT broker {self.config.redacted_broker()}")
        source, prefix, mode = self.ctx.gateway_source, self.config.topic_prefix, self.config.content_mode
        acks: list[asyncio.Future[int]] = []
        try:
            limit = self.config.batch_bytes
            if client.max_packet_size is not None:  # room for the topic and properties, too
                limit = max(1024, min(limit, client.max_packet_size - PACKET_OVERHEAD))
            outgoing = encode.messages(source, prefix, self.name, batch, mode, limit)
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
