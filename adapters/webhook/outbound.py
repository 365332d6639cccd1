"""Outbound: POST signed CloudEvents to the site."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp

from adapters.webhook import encode
from adapters.webhook.config import WebhookConfig
from gateway.kit import Delivery, DeliveryResult, TransientDeliveryError


class WebhookClient:
    def __init__(self, config: WebhookConfig, source: str) -> None:
        self.config = config
        self.source = source
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.connections, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            skip_auto_headers=("User-Agent",), auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, batch: Sequence[Delivery]) -> DeliveryResult:
        assert self._session is not None, "client not started"
        now = time.time()
        headers, body = encode.request(self.source, self.config.key, batch, int(now))
        try:
            async with self._session.post(self.config.url, data=body, headers=headers, allow_redirects=False) as resp:
                answer = await resp.content.read(1024 * 1024)
                return encode.result(resp.status, resp.headers, answer, time.time())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise TransientDeliveryError(f"{type(exc).__name__}: {exc}") from None
