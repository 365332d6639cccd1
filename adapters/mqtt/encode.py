"""Gateway -> site, pure: topics, deliveries to MQTT messages, error reports. No I/O."""

from __future__ import annotations

import math
import time as _clock
from collections.abc import Sequence
from typing import Literal

import msgspec

from adapters.mqtt.decode import InputError
from gateway.kit import Delivery
from schemas.cloudevents import BATCH_CONTENT_TYPE, BY_TYPE, CONTENT_TYPE, format_time

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

Mode = Literal["structured", "binary", "batch"]
BATCH_BYTES = 256 * 1024
"""Default most bytes of payload in one batch message (``batch_bytes``)."""


def messages(source: str, prefix: str, platform: str, batch: Sequence[Delivery], mode: Mode,
             max_bytes: int = BATCH_BYTES) -> list[Outgoing]:
    """The MQTT messages that carry ``batch``, in order: one per event
    (structured or binary), or with ``mode = "batch"`` as few as fit: the
    events of one group (the core gives one group per delivery) as a JSON
    array (``application/cloudevents-batch+json``) of at most ``max_bytes``,
    split when larger; a message that would hold one event is sent structured,
    as to webhook sites."""
    if mode != "batch":
        return [message(source, prefix, platform, d, mode) for d in batch]
    out: list[Outgoing] = []
    start = 0
    while start < len(batch):
        group = batch[start].group
        end = start + 1
        while end < len(batch) and batch[end].group == group:
            end += 1
        topic = out_topic(prefix, platform, group)
        chunk: list[bytes] = []
        size = 2  # the brackets
        for d in batch[start:end]:
            part = _encode(_event(source, d))
            if chunk and size + len(part) > max_bytes:
                out.append(_joined(topic, chunk))
                chunk, size = [], 2
            chunk.append(part)
            size += len(part) + 1  # and a comma
        out.append(_joined(topic, chunk))
        start = end
    return out


def message(source: str, prefix: str, platform: str, d: Delivery, mode: Mode) -> Outgoing:
    """The MQTT message that carries delivery ``d`` alone (``batch`` mode: as
    structured). The CloudEvent ``id`` is ``d.event_id``, the same on every
    retry, so a site can drop a repeat."""
    topic = out_topic(prefix, platform, d.group)
    if mode != "binary":
        return Outgoing(topic, _encode(_event(source, d)), CONTENT_TYPE)
    props = (("specversion", "1.0"), ("id", d.event_id), ("source", source), ("type", d.type),
             ("subject", d.group), ("time", event_time(d.time)), ("civicorigin", d.origin))
    return Outgoing(topic, _encode(d.payload), JSON, props)


def _event(source: str, d: Delivery) -> object:
    """``schemas.cloudevents.make_event`` for ``d``, with ``event_time``."""
    return BY_TYPE[d.type](specversion="1.0", id=d.event_id, source=source, subject=d.group,  # type: ignore[call-arg]
                           time=event_time(d.time), civicorigin=d.origin, data=d.payload)


_last_second: tuple[float, str] = (math.nan, "")
"""The last whole second ``event_time`` formatted, and its text."""


def event_time(seconds: float) -> str:
    """``schemas.cloudevents.format_time(seconds)``, the same text in a third of the
    time (``datetime`` took 1.2 µs an event here, more than half of encoding an
    event for a batch). As ``datetime.fromtimestamp``, it rounds to microseconds
    half to even, then cuts to milliseconds; the text of the last whole second is
    kept for the next event."""
    global _last_second
    frac, whole = math.modf(seconds)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole, us = whole + 1.0, us - 1_000_000
    elif us < 0:
        whole, us = whole - 1.0, us + 1_000_000
    last = _last_second
    if whole != last[0]:
        try:
            t = _clock.gmtime(whole)
        except (OverflowError, OSError, ValueError):
            return format_time(seconds)
        if not 1 <= t.tm_year <= 9999:
            return format_time(seconds)  # out of datetime's range: its error
        last = _last_second = (whole, f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
                                      f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
    return f"{last[1]}.{us // 1000:03d}+00:00"


def _joined(topic: str, events: list[bytes]) -> Outgoing:
    """Encoded events as one message: the one event itself, or the JSON array of them."""
    if len(events) == 1:
        return Outgoing(topic, events[0], CONTENT_TYPE)
    return Outgoing(topic, b"[" + b",".join(events) + b"]", BATCH_CONTENT_TYPE)


# -- errors ------------------------------------------------------------------------------------

def error_report(err: InputError, topic: str) -> bytes:
    """The JSON document published on ``errors`` for input the gateway refused:
    ``error`` (a sentence), ``reason`` (a code), and ``id``, ``index``, ``field``
    when known, plus the ``topic`` it came in on."""
    return _encode({**err.as_json(), "topic": topic})


# -- what crosses (checked by the contract suite, tests/test_adapter_contract.py) --------------------

CARRIES = frozenset({"civic.message.created", "civic.message.edited", "civic.message.deleted",
                     "civic.reaction.added", "civic.reaction.removed", "civic.membership.changed",
                     "civic.moderation.action", "civic.report.filed", "civic.profile.updated",
                     "civic.account.moved"})
"""Every event type of the common schema: a site speaks it natively."""
DEGRADATIONS: dict[str, dict[str, str]] = {}
"""Nothing changes on the way: the CloudEvent's ``data`` is the schema payload itself."""
