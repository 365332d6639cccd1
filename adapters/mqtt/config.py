"""Settings of one MQTT site (``[platforms.NAME]`` with ``kind = "mqtt"``)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import unquote

from msgspec import Meta, Struct

from gateway.kit import check_url

MAX_MQTT_PAYLOAD = 268_435_455
"""The largest packet MQTT can carry at all."""


class MqttConfig(Struct, forbid_unknown_fields=True, kw_only=True, dict=True):
    broker: str
    """``mqtt://[user:password@]host[:port]`` (port 1883), or ``mqtts://`` for TLS (port 8883)."""
    username: str | None = None
    """Overrides the user name in ``broker``."""
    password: str | None = None
    """Overrides the password in ``broker``."""
    topic_prefix: str = "civic/v1"
    """Topics are ``{topic_prefix}/{platform}/in``, ``.../out/{group}`` and ``.../errors``."""
    content_mode: Literal["structured", "binary", "batch"] = "structured"
    """How events go out: structured (the whole CloudEvent as the JSON payload,
    Content Type ``application/cloudevents+json``), binary (attributes as MQTT 5
    user properties, ``data`` as the payload), or batch (the events of one
    delivery as one message, a JSON array with Content Type
    ``application/cloudevents-batch+json``; a delivery of one event is sent
    structured). All three are accepted inbound."""
    batch_max: Annotated[int, Meta(ge=1, le=1000)] = 100
    """Most events one delivery publishes together (one MQTT message each, or
    one message for them all with ``content_mode = "batch"``)."""
    batch_bytes: Annotated[int, Meta(ge=1024, le=MAX_MQTT_PAYLOAD)] = 256 * 1024
    """With ``content_mode = "batch"``: most bytes of payload in one message; a
    delivery larger than that goes out as several messages (and less if the
    broker announces a smaller Maximum Packet Size)."""
    max_payload: Annotated[int, Meta(ge=1024, le=MAX_MQTT_PAYLOAD)] = 1024 * 1024
    """Largest payload a site may publish, in bytes; larger ones go to ``errors``."""
    ack_timeout: Annotated[float, Meta(gt=0, le=300)] = 10.0
    """Seconds to wait for the broker's PUBACKs of a delivery."""
    session_expiry: Annotated[int, Meta(ge=60, le=0xFFFFFFFF)] = 3 * 86400
    """Seconds the broker keeps the gateway's session (its subscription and the
    messages it has not acknowledged) while the gateway is away."""
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 1000
    """Most unacknowledged messages the broker sends the gateway at once."""
    keepalive: Annotated[int, Meta(ge=5, le=3600)] = 30
    """Seconds between keep-alive pings; a dead connection is noticed within 1.5 times this."""
    reconnect_max: Annotated[float, Meta(ge=0.5, le=600)] = 30.0
    """Longest wait between two connection attempts, in seconds."""
    client_id: Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")] | None = None
    """MQTT client id; default ``civic-gateway-mqtt.{platform}.{node}``. Must be
    stable across restarts (the broker keeps unacknowledged messages per id)."""
    ca_file: str | None = None
    """PEM file of the CA that signed the broker's certificate (``mqtts://`` only;
    default: the system's CAs)."""

    def __post_init__(self) -> None:
        # Errors name the key (`key`: ...) so the core can point at its line.
        parts = check_url("broker", self.broker, ("mqtt", "mqtts"), example="mqtts://broker.example:8883")
        port = parts.port
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("`broker`: only scheme, user, password, host and port, no path or query")
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname
        self.port = port or (8883 if self.tls else 1883)
        if self.username is None and parts.username:
            self.username = unquote(parts.username)
        if self.password is None and parts.password:
            self.password = unquote(parts.password)
        if self.password is not None and self.username is None:
            raise ValueError("`password`: a password needs a user name (`username` or user@ in `broker`)")
        if self.ca_file is not None and not self.tls:
            raise ValueError("`ca_file`: only used with an mqtts:// broker")
        prefix = self.topic_prefix
        if (not prefix or prefix.startswith(("/", "$")) or prefix.endswith("/") or "//" in prefix
                or any(c in prefix for c in "+#\0")):
            raise ValueError(f"`topic_prefix`: topic levels without wildcards, not starting with $ or /, "
                             f"e.g. \"civic/v1\", not {prefix!r}")

    def redacted_broker(self) -> str:
        """The broker address without credentials, for logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
