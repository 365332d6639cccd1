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
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version
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

FAST_PATHS = paho_version.startswith("2.")
"""``AckingClient``'s faster paths rely on paho-mqtt 2.x's internals (its
packet dicts and handlers); with another paho they stay off and paho's own
code runs."""


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

    Two more, for speed, on the paho client of this connection only:

    * paho reads the properties of every PUBLISH it receives into a new
      ``Properties``, which builds two tables of every MQTT 5 property each
      time: about 60 µs a message here, half of what the adapter spent on a
      message of one event. ``_handle_publish`` is replaced by one that reads
      the properties a PUBLISH may carry directly (``parse_publish``) and
      otherwise does what paho 2.x's does (without its topic matcher when no
      per-topic callback is set, as aiomqtt sets none); a QoS 2 message, or
      anything it does not expect, goes to paho's own.
    * paho writes every packet it has queued with a ``send()`` of its own, so
      acknowledging 500 messages, or publishing 100 events one message each,
      takes as many system calls, each waking the broker. ``loop_write`` is
      wrapped to join what is queued into one write first (``coalesce``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client.manual_ack_set(True)
        self._acks: dict[int, asyncio.Future[int]] = {}
        self.max_packet_size: int | None = None
        """The broker's Maximum Packet Size from CONNACK, if it announced one."""
        if FAST_PATHS:
            self._install_fast_paths()

    def _install_fast_paths(self) -> None:
        inner, write, handle_publish = self._client, self._client.loop_write, self._client._handle_publish

        def loop_write() -> paho.MQTTErrorCode:  # aiomqtt calls it when the socket can take more
            coalesce(inner._out_packet)
            return write()

        def fast_handle_publish() -> paho.MQTTErrorCode:  # paho 2.x's _handle_publish, but for the parsing
            header, packet = inner._in_packet["command"], inner._in_packet["packet"]
            qos = (header & 0x06) >> 1
            parsed = parse_publish(packet, qos) if qos < 2 and inner._protocol == paho.MQTTv5 else None
            if parsed is None:
                return handle_publish()  # type: ignore[no-any-return]
            topic, mid, properties, payload = parsed
            message = paho.MQTTMessage(mid=mid, topic=topic)
            message.dup, message.qos, message.retain = bool(header & 0x08), qos, bool(header & 0x01)
            message.properties, message.payload = properties, payload
            inner._easy_log(paho.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), '%r', properties=%s, ..."
                            "  (%d bytes)", message.dup, qos, message.retain, mid, topic, properties, len(payload))
            message.timestamp = paho.time_func()
            on_message = inner.on_message
            if inner._on_message_filtered._root._children or on_message is None:
                inner._handle_on_message(message)  # per-topic callbacks (aiomqtt sets none): paho's way
            else:  # what paho's _handle_on_message comes down to without them
                with inner._in_callback_mutex:
                    on_message(inner, inner._userdata, message)
            if qos == 1 and not inner._manual_ack:
                return inner._send_puback(mid)  # type: ignore[no-any-return]
            return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

        inner.loop_write = loop_write  # type: ignore[method-assign]
        inner._handle_publish = fast_handle_publish  # type: ignore[method-assign]

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

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Properties | None = None) -> None:
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        super()._on_publish(client, userdata, mid, reason_code, properties)
        fut = self._acks.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(int(getattr(reason_code, "value", reason_code) or 0))


Handler = Callable[[AckingClient, list[aiomqtt.Message]], Awaitable[None]]


_PROPERTY_TABLES = Properties(PacketTypes.PUBLISH)
_INTEGERS = {1: ("PayloadFormatIndicator", 1), 2: ("MessageExpiryInterval", 4), 35: ("TopicAlias", 2)}
"""PUBLISH properties that are fixed-size integers: identifier -> (paho's name, bytes)."""


def parse_publish(packet: bytes | bytearray, qos: int) -> tuple[bytes, int, Properties, bytes] | None:
    """Topic, packet id, properties and payload of the variable part of an
    MQTT 5 PUBLISH (what follows the fixed header), or None if it holds
    anything but what a PUBLISH may carry, well-formed, once each (then paho's
    own parser takes it, and says what is wrong). The ``Properties`` is paho's
    class with the same attributes paho would set, sharing its tables with
    every other one made here (they are only read)."""
    try:
        size = len(packet)
        end = 2 + int.from_bytes(packet[0:2], "big")
        topic = bytes(packet[2:end])
        mid = 0
        if qos:
            mid = int.from_bytes(packet[end:end + 2], "big")
            end += 2
        length, pos = _varint(packet, end)
        end = pos + length
        if end > size:
            return None
        props = Properties.__new__(Properties)
        attrs = props.__dict__
        attrs.update(packetType=PacketTypes.PUBLISH, types=_PROPERTY_TABLES.types, names=_PROPERTY_TABLES.names,
                     properties=_PROPERTY_TABLES.properties)
        while pos < end:
            ident = packet[pos]
            pos += 1
            if ident in _INTEGERS:
                name, width = _INTEGERS[ident]
                if name in attrs or pos + width > end:
                    return None
                attrs[name] = int.from_bytes(packet[pos:pos + width], "big")
                pos += width
            elif ident == 3 or ident == 8:  # UTF-8 strings
                name = "ContentType" if ident == 3 else "ResponseTopic"
                text, pos = _utf8(packet, pos, end)
                if text is None or name in attrs:
                    return None
                attrs[name] = text
            elif ident == 9:  # binary data
                n = int.from_bytes(packet[pos:pos + 2], "big")
                if "CorrelationData" in attrs or pos + 2 + n > end:
                    return None
                attrs["CorrelationData"] = bytes(packet[pos + 2:pos + 2 + n])
                pos += 2 + n
            elif ident == 11:  # a variable byte integer, repeatable
                value, pos = _varint(packet, pos)
                attrs.setdefault("SubscriptionIdentifier", []).append(value)
            elif ident == 38:  # a string pair, repeatable
                key, pos = _utf8(packet, pos, end)
                value, pos = _utf8(packet, pos, end) if key is not None else (None, pos)
                if value is None:
                    return None
                attrs.setdefault("UserProperty", []).append((key, value))
            else:
                return None
        if pos != end:
            return None
        return topic, mid, props, bytes(memoryview(packet)[end:])
    except (IndexError, ValueError):
        return None


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    if buf[pos] < 0x80:
        return buf[pos], pos + 1
    value, shift = 0, 0
    for i in range(pos, min(pos + 4, len(buf))):
        value |= (buf[i] & 0x7F) << shift
        if not buf[i] & 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("malformed variable byte integer")


def _utf8(buf: bytes | bytearray, pos: int, end: int) -> tuple[str | None, int]:
    """An MQTT UTF-8 string at ``pos``; None if it is not one MQTT allows (paho will say why)."""
    n = int.from_bytes(buf[pos:pos + 2], "big")
    if pos + 2 + n > end:
        return None, pos
    try:
        text = bytes(buf[pos + 2:pos + 2 + n]).decode("utf-8")
    except UnicodeDecodeError:
        return None, pos
    if "\x00" in text or "\ufeff" in text:
        return None, pos
    return text, pos + 2 + n


def coalesce(out: deque[Any]) -> None:
    """Join runs of packets queued in paho's ``_out_packet`` into one packet,
    in place and in order, so that ``_packet_write`` sends them with one
    ``send()``. Left alone: a packet partly written already, and those paho
    acts on once written (a QoS 0 PUBLISH, whose ``on_publish`` fires then,
    and DISCONNECT). The joined packet is typed PUBACK at QoS 1, which paho
    only writes out. Relies on paho 2.x's packet dicts; tests cover it."""
    if len(out) < 2:
        return
    packets: list[Any] = []
    run: list[Any] = []

    def close_run() -> None:
        if len(run) == 1:
            packets.append(run[0])
        elif run:
            data = b"".join(p["packet"] for p in run)
            packets.append({"command": paho.PUBACK, "mid": 0, "qos": 1, "pos": 0, "to_process": len(data),
                            "packet": data, "info": None})
        run.clear()

    for pkt in out:
        kind = pkt["command"] & 0xF0
        if pkt["pos"] or kind == paho.DISCONNECT or (kind == paho.PUBLISH and pkt["qos"] == 0):
            close_run()
            packets.append(pkt)
        else:
            run.append(pkt)
    close_run()
    if len(packets) < len(out):
        out.clear()
        out.extend(packets)


ACTIVE_CHECK = 0.25
"""Seconds between two looks at whether this node should hold a consumer connection."""


class _Inactive(Exception):
    """This node no longer leads the platform's intake: let the next one take the session."""


class Connection:
    """One broker connection of an MQTT platform. ``client`` is the connected
    client, or None between connections (``deliver`` then fails fast).

    With a ``subscription`` it is a consumer: a persistent session, so what it
    has not acknowledged waits in the broker, and it is connected only while
    ``active()`` (in a cluster: while this node leads the platform's intake;
    the next leader takes the same session over by its client id). Without,
    it only publishes, with a clean session. ``on_state(up, why)`` hears each
    connect and each failure (a consumer this node need not hold counts as up)."""

    def __init__(self, config: MqttConfig, client_id: str, subscription: str | None, handler: Handler | None,
                 active: Callable[[], bool] = lambda: True,
                 on_state: Callable[[bool, str], None] = lambda up, why: None) -> None:
        self.config = config
        self.on_state = on_state
        self.client_id = client_id
        self.subscription = subscription
        self.handler = handler
        self.active = active
        self.client: AckingClient | None = None
        self.connections = 0
        self.connected = asyncio.Event()
        self._tls = ssl.create_default_context(cafile=config.ca_file) if config.tls else None

    def _new_client(self) -> AckingClient:
        props = Properties(PacketTypes.CONNECT)
        consumer = self.subscription is not None
        props.SessionExpiryInterval = self.config.session_expiry if consumer else 0
        props.ReceiveMaximum = self.config.receive_maximum
        # A fresh client per connection: messages queued in an old one carry
        # packet ids of a dead connection and must not be acknowledged on a new one.
        return AckingClient(self.config.host, self.config.port, username=self.config.username,
                            password=self.config.password, identifier=self.client_id,
                            protocol=aiomqtt.ProtocolVersion.V5, clean_start=not consumer, properties=props,
                            keepalive=self.config.keepalive, timeout=self.config.ack_timeout,
                            tls_context=self._tls)

    async def run(self) -> None:
        """Connect, subscribe, take messages; reconnect for ever (until cancelled)."""
        delay = RECONNECT_MIN
        where = self.config.redacted_broker()
        while True:
            if not self.active():
                self.on_state(True, "")  # another node holds the intake: nothing for this one to connect
                await asyncio.sleep(ACTIVE_CHECK)
                continue
            client = self._new_client()
            try:
                async with client:
                    if self.subscription is not None:
                        granted = await client.subscribe(self.subscription, qos=1)
                        refused = [rc for rc in granted if int(getattr(rc, "value", rc)) >= 0x80]
                        if refused:
                            raise aiomqtt.MqttError(f"the broker refused the subscription to {self.subscription}: "
                                                    f"{refused[0]}")
                    self.client = client
                    self.connections += 1
                    self.connected.set()
                    self.on_state(True, "")
                    delay = RECONNECT_MIN
                    log.info("connected to %s as %s", where, self.client_id)
                    await self._take(client)
            except _Inactive:
                log.info("%s: another gateway node takes this platform's messages now; disconnecting",
                         self.client_id)
                continue
            except aiomqtt.MqttError as exc:
                why = f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)
                log.warning("MQTT connection to %s lost or refused (%s); reconnecting in %.1f s", where, why, delay)
                self.on_state(False, f"broker {where} unreachable or refusing: {why}")
            except Exception:  # a bug in handling: nothing was acknowledged, so reconnect and get it all again
                log.exception("handling MQTT messages from %s failed; reconnecting in %.1f s", where, delay)
                self.on_state(False, f"handling messages from {where} failed; reconnecting")
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

        async def watch() -> None:
            while self.active():
                await asyncio.sleep(ACTIVE_CHECK)
            raise _Inactive()

        async def handle() -> None:
            while True:
                batch = [await queue.get()]
                size = len(batch[0].payload or b"")  # type: ignore[arg-type]
                while not queue.empty() and len(batch) < TAKE_MAX and size < TAKE_BYTES:
                    batch.append(queue.get_nowait())
                    size += len(batch[-1].payload or b"")  # type: ignore[arg-type]
                assert self.handler is not None
                await self.handler(client, batch)

        loop = asyncio.get_running_loop()
        tasks = {loop.create_task(read(), name=f"mqtt-read-{self.client_id}"),
                 loop.create_task(watch(), name=f"mqtt-watch-{self.client_id}")}
        if self.subscription is not None:
            tasks.add(loop.create_task(handle(), name=f"mqtt-handle-{self.client_id}"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the reader's MqttError, or the handler's failure
            raise aiomqtt.MqttError("the message stream ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
