"""Fetching another platform's attachment, to copy it into the homeserver.

The URL comes from a linked site, so the gateway must not become a way into
the operator's own network: only ``http``/``https``; every address the host
name resolves to is checked (``media.address_allowed``) by the connector's
resolver, on the first request and on every redirect (followed by hand, at
most ``MAX_REDIRECTS``); literal IP addresses are checked before connecting.
The body is read up to ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from adapters.matrix.media import address_allowed

MAX_REDIRECTS = 3


class FetchError(Exception):
    """The attachment could not be fetched; ``transient`` if trying later may help."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class _CheckingResolver(AbstractResolver):
    def __init__(self, allow_private: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        found = await self._inner.resolve(host, port, family)
        allowed = [a for a in found if address_allowed(a["host"], allow_private=self._allow_private)]
        if not allowed:
            raise OSError(f"{host} resolves only to addresses the gateway may not fetch from")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class Fetcher:
    def __init__(self, *, allow_private: bool, timeout: float = 30.0) -> None:
        self.allow_private = allow_private
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_CheckingResolver(self.allow_private), limit=16)
            self._session = aiohttp.ClientSession(connector=connector,
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str, *, max_bytes: int) -> tuple[bytes, str]:
        """(bytes, content type) of ``url``; ``FetchError`` saying why not."""
        assert self._session is not None, "fetcher not started"
        for _ in range(MAX_REDIRECTS + 1):
            self._check_url(url)
            try:
                async with self._session.get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        url = urljoin(url, resp.headers["Location"])
                        continue
                    if resp.status != 200:
                        raise FetchError(f"{url}: HTTP {resp.status}", transient=resp.status >= 500
                                         or resp.status in (408, 429))
                    if resp.content_length is not None and resp.content_length > max_bytes:
                        raise FetchError(f"{url}: {resp.content_length} bytes, more than {max_bytes}", transient=False)
                    data = await resp.content.read(max_bytes + 1)
                    if len(data) > max_bytes:
                        raise FetchError(f"{url}: more than {max_bytes} bytes", transient=False)
                    return data, resp.content_type or "application/octet-stream"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise FetchError(f"{url}: {type(exc).__name__}: {exc}", transient=True) from None
        raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects", transient=False)

    def _check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"{url!r}: only http(s) URLs are fetched", transient=False)
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:
            return  # a host name: the resolver checks its addresses
        if not address_allowed(parts.hostname, allow_private=self.allow_private):
            raise FetchError(f"{url}: the gateway may not fetch from {parts.hostname}", transient=False)
