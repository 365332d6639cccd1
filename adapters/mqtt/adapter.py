"""MQTT sites: CloudEvents over an MQTT 5 broker (docs/mqtt.md).

A site publishes on ``{prefix}/{platform}/in`` and receives on
``{prefix}/{platform}/out/{group}``; what the gateway refuses is explained on
``{prefix}/{platform}/errors``. QoS 1 both ways.

Files: ``connection`` (the broker connection and its reconnect loop),
``inbound`` (what a site published, stored then acknowledged), ``outbound``
(publishing the core's events), ``decode``/``encode`` (pure translation),
``config``. This module wires them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import aiomqtt

from adapters.mqtt import encode, inbound, outbound
from adapters.mqtt.connection import AckingClient, Connection
from adapters.mqtt.config import MqttConfig
from gateway.kit import Adapter, AdapterContext, Capabilities, Delivery, DeliveryResult, TaskGroup

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
        return await outbound.publish(self.publisher.client, self.config, self.ctx.gateway_source, self.name, batch)
