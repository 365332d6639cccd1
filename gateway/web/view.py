"""What the HTTP modules see of the running gateway: ``gateway.runtime.Gateway``
has these, and hands itself to ``server.web_app``. A Protocol, so that the
web modules need not import the runtime (which imports them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.adapter import Adapter
    from gateway.cluster import Cluster
    from gateway.config import Config, GatewaySettings
    from gateway.delivery import DeliveryEngine
    from gateway.ids import PlatformName
    from gateway.intake import BodyReader
    from gateway.metrics import Metrics
    from gateway.router import Router
    from gateway.store import Store
    from gateway.store.base import OutboxItem


class GatewayView(Protocol):
    config: Config
    settings: GatewaySettings
    metrics: Metrics
    router: Router
    store: Store
    delivery: DeliveryEngine
    cluster: Cluster | None
    adapters: dict[PlatformName, Adapter]
    read_body: BodyReader
    node: str
    platform_state: dict[PlatformName, tuple[bool, str]]
    """Per platform: (up, why not), as its adapter last reported."""

    @property
    def ready(self) -> bool:
        """Whether events are taken now (started, not stopping)."""

    @property
    def outbox_depth(self) -> int:
        """Undelivered outbox rows, as last counted."""

    def hand_over(self, items: Sequence[OutboxItem]) -> None:
        """Give committed outbox rows to delivery."""
