"""Webhook sites: any site that speaks signed CloudEvents over HTTP (docs/webhook.md)."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from adapters.webhook import inbound
from adapters.webhook.config import WebhookConfig
from adapters.webhook.outbound import WebhookClient
from gateway.kit import Adapter, AdapterContext, Capabilities, Delivery, DeliveryResult


class WebhookAdapter(Adapter):
    """The common schema spoken natively, so nothing degrades: every
    capability is on; ``batch_max`` comes from the site's config."""

    kind = "webhook"
    Config = WebhookConfig

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        self.config: WebhookConfig = ctx.config
        self._caps = Capabilities(batch_max=self.config.batch_max)
        self.client = WebhookClient(self.config, ctx.gateway_source)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    async def start(self) -> None:
        await self.client.start()

    async def stop(self) -> None:
        await self.client.close()

    async def handle_events(self, request: web.Request) -> web.StreamResponse:
        return await inbound.handle(self.ctx, self.config, request)

    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        return await self.client.send(batch)
