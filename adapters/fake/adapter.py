"""The fake adapter: a platform that lives in memory (docs/contributing.md).

It is a real adapter, registered as kind ``fake``, and the smallest complete
one: read it first when you write an adapter. The files have the roles every
adapter's have: ``config`` (its settings), ``decode`` and ``encode`` (pure
translation between its native events and the common schema), ``inbound``
(takes native events: a test posts them), ``outbound`` (sends: here, to the
in-memory platform, which records what it got), and this module, which wires
them. Its capabilities come from its config, so a test can declare what the
platform lacks; ``platform.fail_next`` makes deliveries fail.

    [platforms.fk]
    kind = "fake"
    html = false
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from adapters.fake import encode, inbound
from adapters.fake.config import FakeConfig
from adapters.fake.outbound import FakePlatform
from gateway.kit import Adapter, AdapterContext, Capabilities, Delivery, DeliveryResult, IngestResult


class FakeAdapter(Adapter):
    kind = "fake"
    Config = FakeConfig

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        self.config: FakeConfig = ctx.config
        self._caps = encode.capabilities(self.config)
        self.platform = FakePlatform(self.config.id_prefix, self._caps)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    async def receive(self, *natives: Any) -> IngestResult:
        """Post native events as if people on the platform had made them."""
        return await inbound.receive(self.ctx, natives)

    async def handle_events(self, request: web.Request) -> web.StreamResponse:
        return await inbound.handle(self.ctx, request)

    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        return await self.platform.deliver(batch)
