"""Gateway -> site, pure: topics, deliveries to MQTT messages, error reports. No I/O."""

from __future__ import annotations

from typing import Literal

import msgspec

from adapters.mqtt.decode import InputError
from gateway.adapter import Delivery
from schemas.cloudevents import CONTENT_TYPE, format_time, make_event

SHARE_GROUP = "civic-gateway"
"""Every node of a gateway subscribes in this shared-subscription group, so each message is taken once."""
JSON = "application/json"

_encode = msgspec.json.Encoder().encode


class Outgoing(msgspec.Struct, frozen=True):
    """One MQTT PUBLISH: what ``client`` needs to send it."""

    topic: str
    payload: bytes
    content_type: str
    user_properties: tuple[tuple[str, str], ...] = ()


# -- topics --------------------------------------------------------------------------------

def in_topic(prefix: str, platform: str) -> str:
    return f"{prefix}/{platform}/in"


def in_filter(prefix: str, platform: str) -> str:
    """The gateway's subscription: shared, so that in a cluster one node takes each message."""
    return f"$share/{SHARE_GROUP}/{in_topic(prefix, platform)}"


def errors_topic(prefix: str, platform: str) -> str:
    return f"{prefix}/{platform}/errors"


def out_topic(prefix: str, platform: str, group: str) -> str:
    return f"{prefix}/{platform}/out/{topic_level(group)}"


def topic_level(value: str) -> str:
    """A group id as one topic level: ``%``, ``/``, ``+``, ``#`` and control
    characters are percent-encoded (UTF-8), everything else is kept, so
    ``groep-7`` stays ``groep-7`` and ``a/b`` becomes ``a%2Fb``."""
    out = []
    for c in value:
        if c in "%/+#" or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F:
            out.append("".join(f"%{b:02X}" for b in c.encode()))
        else:
            out.append(c)
    return "".join(out)


# -- deliveries ------------------------------------------------------------------------------

def message(source: str, prefix: str, platform: str, d: Delivery,
            mode: Literal["structured", "binary"]) -> Outgoing:
    """The MQTT message that carries delivery ``d``. The CloudEvent ``id`` is
    ``d.event_id``, the same on every retry, so a site can drop a repeat."""
    topic = out_topic(prefix, platform, d.group)
    if mode == "structured":
        event = make_event(d.type, id=d.event_id, source=source, subject=d.group, time=d.time, data=d.payload,
                           origin=d.origin)
        return Outgoing(topic, _encode(event), CONTENT_TYPE)
    props = (("specversion", "1.0"), ("id", d.event_id), ("source", source), ("type", d.type),
             ("subject", d.group), ("time", format_time(d.time)), ("civicorigin", d.origin))
    return Outgoing(topic, _encode(d.payload), JSON, props)


# -- errors ------------------------------------------------------------------------------------

def error_report(err: InputError, topic: str) -> bytes:
    """The JSON document published on ``errors`` for input the gateway refused:
    ``error`` (a sentence), ``reason`` (a code), and ``id``, ``index``, ``field``
    when known, plus the ``topic`` it came in on."""
    return _encode({**err.as_json(), "topic": topic})
