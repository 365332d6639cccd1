"""The connection to the broker: one per MQTT platform, with its own reconnect loop.

``Connection.run`` connects with a persistent session (clean start off, a
session expiry, a client id stable across restarts), subscribes to the
platform's ``in`` topic through a shared subscription, and hands what arrives,
in batches, to a handler, which acknowledges each message itself once its
events are stored. When the connection drops it reconnects with backoff and
subscribes again; the broker then sends again whatever was not acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt.config import MqttConfig

log = logging.getLogger("civic.mqtt")

RECONNECT_MIN = 0.1
"""Seconds before the first reconnection attempt; doubles up to ``reconnect_max``."""
TAKE_MAX = 500
"""Most messages handed to the handler at once (their events are stored in one transaction)..."""
TAKE_BYTES = 1024 * 1024
"""... and about this many bytes of payload at most (always at least one message)."""

NO_MATCHING_SUBSCRIBERS = 0x10


class AckingClient(aiomqtt.Client):
    """``aiomqtt.Client`` plus what aiomqtt 2.5 does not offer.

    WORKAROUND, kept to this class: aiomqtt acknowledges every QoS 1 message
    the moment it arrives and has no ``ack()`` (aiomqtt issue #345; the pull
    request adding it, #346, is not merged). paho-mqtt underneath has had
    ``manual_ack_set()``/``ack()`` since 2.0, and the workaround the issue
    recommends is to call them on ``client._client``. Manual acks are switched
    on *before* connecting, so that not even a message the broker resends
    right after CONNACK is acknowledged before it is stored.

    A smaller gap in the same place: aiomqtt's ``publish`` drops the PUBACK
    reason code (a broker refuses a message, e.g. 0x87 not authorized, only
    that way), so ``publish_nowait`` returns it. Remove the class when aiomqtt
    has both.

    paho sends at most 20 QoS 1 messages before their PUBACKs (and queues the
    rest), which is also Mosquitto's default Receive Maximum; paho cannot
    follow the broker's value once connected, so it stays at 20.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client.manual_ack_set(True)
        self._acks: dict[int, asyncio.Future[int]] = {}

    def ack(self, message: aiomqtt.Message) -> None:
        """Send the PUBACK of ``message`` (received on this connection)."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def publish_nowait(self, topic: str, payload: bytes, properties: Properties) -> asyncio.Future[int]:
        """Publish at QoS 1; the future gives the PUBACK reason code (below 0x80: accepted).
        Raises ``aiomqtt.MqttError`` when not connected, ``ValueError`` for a bad topic or size."""
        info = self._client.publish(topic, payload, qos=1, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "could not publish")
        fut: asyncio.Future[int] = self._loop.create_future()
        self._acks[info.mid] = fut
        fut.add_done_callback(lambda f, mid=info.mid: self._acks.pop(mid, None) if self._acks.get(mid) is f else None)
        return fut

    def fail_pending(self, exc: Exception) -> None:
        """The connection is gone: publishes still waiting for a PUBACK never get one here."""
        for fut in list(self._acks.values()):
            if not fut.done():
                fut.set_exception(exc)
        self._acks.clear()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        super()._on_publish(client, userdata, mid, reason_code, properties)
        fut = self._acks.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(int(getattr(reason_code, "value", reason_code) or 0))


Handler = Callable[[AckingClient, list[aiomqtt.Message]], Awaitable[None]]


class Connection:
    """The broker connection of one MQTT platform. ``client`` is the connected
    client, or None between connections (``deliver`` then fails fast)."""

    def __init__(self, config: MqttConfig, client_id: str, subscription: str, handler: Handler) -> None:
        self.config = config
        self.client_id = client_id
        self.subscription = subscription
        self.handler = handler
        self.client: AckingClient | None = None
        self.connections = 0
        self.connected = asyncio.Event()
        self._tls = ssl.create_default_context(cafile=config.ca_file) if config.tls else None

    def _new_client(self) -> AckingClient:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry
        props.ReceiveMaximum = self.config.receive_maximum
        # A fresh client per connection: messages queued in an old one carry
        # packet ids of a dead connection and must not be acknowledged on a new one.
        return AckingClient(self.config.host, self.config.port, username=self.config.username,
                            password=self.config.password, identifier=self.client_id,
                            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
                            keepalive=self.config.keepalive, timeout=self.config.ack_timeout,
                            tls_context=self._tls)

    async def run(self) -> None:
        """Connect, subscribe, take messages; reconnect for ever (until cancelled)."""
        delay = RECONNECT_MIN
        where = self.config.redacted_broker()
        while True:
            client = self._new_client()
            try:
                async with client:
                    granted = await client.subscribe(self.subscription, qos=1)
                    refused = [rc for rc in granted if int(getattr(rc, "value", rc)) >= 0x80]
                    if refused:
                        raise aiomqtt.MqttError(f"the broker refused the subscription to {self.subscription}: "
                                                f"{refused[0]}")
                    self.client = client
                    self.connections += 1
                    self.connected.set()
                    delay = RECONNECT_MIN
                    log.info("connected to %s as %s", where, self.client_id)
                    await self._take(client)
            except aiomqtt.MqttError as exc:
                why = f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)
                log.warning("MQTT connection to %s lost or refused (%s); reconnecting in %.1f s", where, why, delay)
            except Exception:  # a bug in handling: nothing was acknowledged, so reconnect and get it all again
                log.exception("handling MQTT messages from %s failed; reconnecting in %.1f s", where, delay)
            finally:
                self.client = None
                self.connected.clear()
                client.fail_pending(aiomqtt.MqttError("the connection to the broker was lost"))
            await asyncio.sleep(delay * random.uniform(0.75, 1.0))
            delay = min(self.config.reconnect_max, delay * 2)

    async def _take(self, client: AckingClient) -> None:
        """Read messages on one connection and hand them to the handler in
        batches. Reading goes on while the handler works (it may wait out an
        overload), so a lost connection is noticed at once; the handler is
        then cancelled and the broker resends what it had not acknowledged."""
        queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()  # bounded by receive_maximum

        async def read() -> None:
            async for message in client.messages:
                queue.put_nowait(message)

        async def handle() -> None:
            while True:
                batch = [await queue.get()]
                size = len(batch[0].payload or b"")  # type: ignore[arg-type]
                while not queue.empty() and len(batch) < TAKE_MAX and size < TAKE_BYTES:
                    batch.append(queue.get_nowait())
                    size += len(batch[-1].payload or b"")  # type: ignore[arg-type]
                await self.handler(client, batch)

        loop = asyncio.get_running_loop()
        tasks = {loop.create_task(read(), name=f"mqtt-read-{self.client_id}"),
                 loop.create_task(handle(), name=f"mqtt-handle-{self.client_id}")}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the reader's MqttError, or the handler's failure
            raise aiomqtt.MqttError("the message stream ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
