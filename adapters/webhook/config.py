"""Settings of one webhook site (``[platforms.NAME]`` with ``kind = "webhook"``)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from adapters.webhook.signing import secret_key
from gateway.kit import check_url


class WebhookConfig(Struct, forbid_unknown_fields=True, kw_only=True, dict=True):
    secret: str
    """Shared secret, ``whsec_<base64>``; signs both directions."""
    url: Annotated[str, Meta(max_length=2048)]
    """Where the gateway POSTs events for this site."""
    batch_max: Annotated[int, Meta(ge=1, le=1000)] = 20
    """Most events in one delivery; 1 sends single events only."""
    max_body: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    """Largest request body the site may send, in bytes (413 above)."""
    timeout: Annotated[float, Meta(gt=0, le=300)] = 10.0
    """Seconds to wait for the site to answer a delivery."""
    tolerance: Annotated[int, Meta(ge=10, le=3600)] = 300
    """Largest clock difference accepted on webhook-timestamp, in seconds."""
    connections: Annotated[int, Meta(ge=1, le=1000)] = 64
    """Most open connections to the site."""

    def __post_init__(self) -> None:
        check_url("url", self.url, ("http", "https"), example="https://site.example/civic/inbox")
        try:
            self.key = secret_key(self.secret)
        except ValueError as exc:
            raise ValueError(f"`secret`: {exc}") from None  # the core names the key and its line
