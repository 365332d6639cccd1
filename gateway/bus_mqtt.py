"""The bus over an MQTT 5 broker, for the nodes of a cluster.

Every node subscribes to ``{prefix}/{channel}`` for each channel it listens
on, with MQTT 5's *no local* option so that it does not hear itself. Hints go
out at QoS 0: they are only "look again", the work itself is in the shared
store, and every node polls the store anyway (see ``gateway.cluster``), so a
hint lost in a broker restart costs at most one poll interval of latency.

The connection has its own reconnect loop (exponential backoff up to 5 s);
after every reconnection ``on_connect`` runs so that the cluster looks at the
store at once instead of waiting for hints it may have missed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.bus import Bus
from gateway.tasks import TaskGroup

log = logging.getLogger("civic.bus")

TOPIC_PREFIX = "civic/cluster/v1"
MAX_QUEUED = 10_000
"""Hints waiting to be sent while disconnected, at most (older ones are dropped: the poll covers them)."""


class MqttBus(Bus):
    def __init__(self, url: str, node: str, *, prefix: str = TOPIC_PREFIX, keepalive: int = 10) -> None:
        super().__init__()
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"`bus`: expected mqtt://host:port or mqtts://host:port, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.tls = parts.scheme == "mqtts"
        self.node = node
        self.prefix = prefix
        self.keepalive = keepalive
        self._client: aiomqtt.Client | None = None
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(MAX_QUEUED)
        self._tasks = TaskGroup()
        """The connection loop and, while connected, its sender; closed by ``stop``."""
        self._stopping = False
        self.reconnects = 0
        self.dropped = 0

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def start(self) -> None:
        self._stopping = False
        self._tasks.spawn(self._run(), "mqtt-bus")

    async def stop(self) -> None:
        self._stopping = True
        await self._tasks.close()

    def publish(self, channel: str, payload: bytes) -> None:
        try:
            self._queue.put_nowait((channel, payload))
        except asyncio.QueueFull:
            self.dropped += 1  # the poll of the store covers it

    async def _run(self) -> None:
        delay = 0.2
        while not self._stopping:
            try:
                async with aiomqtt.Client(
                        self.host, self.port, username=self.username, password=self.password,
                        identifier=f"civic-gateway-bus-{self.node}", protocol=aiomqtt.ProtocolVersion.V5,
                        clean_start=True, keepalive=self.keepalive, timeout=5,
                        tls_context=ssl.create_default_context() if self.tls else None) as client:
                    for channel in self._handlers:
                        await client.subscribe(f"{self.prefix}/{channel}",
                                               options=SubscribeOptions(qos=0, noLocal=True))
                    self._client = client
                    delay = 0.2
                    log.info("bus connected to %s:%d", self.host, self.port)
                    if self.on_connect is not None:
                        self.on_connect()
                    sender = self._tasks.spawn(self._send(client), "mqtt-bus-send")
                    try:
                        async for message in client.messages:
                            channel = str(message.topic).rpartition("/")[2]
                            payload = message.payload
                            self._dispatch(channel, payload if isinstance(payload, bytes) else bytes(payload or b""))
                    finally:
                        sender.cancel()
                        await asyncio.wait([sender])  # ended before the client closes under it
            except aiomqtt.MqttError as exc:
                if not self._stopping:
                    log.warning("bus connection to %s:%d lost or refused (%s); reconnecting in %.1f s",
                                self.host, self.port, exc, delay)
            finally:
                if self._client is not None:
                    self.reconnects += 1
                self._client = None
            if self._stopping:
                return
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            channel, payload = await self._queue.get()
            try:
                await client.publish(f"{self.prefix}/{channel}", payload, qos=0)
            except aiomqtt.MqttError:
                self.dropped += 1
                return  # the receive loop notices the broken connection and reconnects
