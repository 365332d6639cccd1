"""The bus: hints between the parts of one gateway, never where work is kept.

Work lives in the store's outbox and is committed before anything is said on
the bus. What travels here only says "look again": *wake* (these target groups
have new outbox rows) and *state* (bans, consent or account moves changed;
reload them). A hint that is lost (a broker restart, a broker that drops
queued messages, a node that was reconnecting) only delays work until the
next poll of the store; it never loses any.

Two implementations: ``LocalBus`` (one process, the embedded default: a hint is
a function call on the next loop iteration) and ``gateway.bus_mqtt.MqttBus``
(an MQTT 5 broker shared by the nodes of a cluster), chosen by ``[gateway] bus``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

log = logging.getLogger("civic.bus")

Handler = Callable[[bytes], None]

WAKE = "wake"
STATE = "state"


class Bus(abc.ABC):
    """Publish/subscribe of small hints on named channels (``WAKE``, ``STATE``)."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self.on_connect: Callable[[], None] | None = None
        """Called after every (re)connection: hints sent meanwhile may be lost, so look again."""

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Call ``handler(payload)`` for every hint on ``channel`` from another node (before ``start``)."""
        self._handlers[channel].append(handler)

    def _dispatch(self, channel: str, payload: bytes) -> None:
        for handler in self._handlers.get(channel, ()):
            try:
                handler(payload)
            except Exception:  # one bad hint must not stop the bus
                log.exception("handling a %s hint failed", channel)

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def publish(self, channel: str, payload: bytes) -> None:
        """Send a hint to the other nodes; never blocks, never raises (a hint may be lost)."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...


class LocalBus(Bus):
    """One process: there are no other nodes, so nothing needs to travel."""

    async def start(self) -> None:
        if self.on_connect is not None:
            asyncio.get_running_loop().call_soon(self.on_connect)

    async def stop(self) -> None:
        pass

    def publish(self, channel: str, payload: bytes) -> None:
        pass  # no other node listens

    @property
    def connected(self) -> bool:
        return True
