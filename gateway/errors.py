"""The small tree of errors the core distinguishes.

Adapters raise these; the core catches broadly only in the delivery worker and
the ingress handlers, and counts or logs every error it catches.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error civic-gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the key (and line when known)."""


class DecodeError(GatewayError):
    """Inbound input is malformed. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int = 400, index: int | None = None,
                 field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.index = index
        self.field = field
        self.headers = headers or {}

    def as_json(self) -> dict[str, object]:
        body: dict[str, object] = {"error": str(self)}
        if self.index is not None:
            body["index"] = self.index
        if self.field is not None:
            body["field"] = self.field
        return body


class DeliveryError(GatewayError):
    """Delivering to a target failed."""


class TransientDeliveryError(DeliveryError):
    """Worth retrying (network, timeout, 408, 429, 5xx). ``retry_after`` in seconds if the target said."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help (4xx other than 408/429): the event goes to the dead letters."""


class UnencodableEvent(PermanentDeliveryError):
    """The event cannot be written in the target's format (a number or a time
    out of range, text the format cannot hold): the same event fails the same
    way every time, so it goes to the dead letters at once. The delivery
    worker also files under this the plain ``ValueError``, ``OverflowError``,
    ``TypeError`` and msgspec errors an adapter's encoder lets escape."""
