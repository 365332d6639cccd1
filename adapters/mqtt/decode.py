"""Site -> gateway, pure: one MQTT PUBLISH to ``Inbound`` records. No I/O.

Content modes follow the CloudEvents MQTT binding: a Content Type starting
``application/cloudevents`` means structured mode (the whole event, or a
batch, is the JSON payload); otherwise the event is in binary mode when its
User Properties carry ``specversion`` (the other attributes too, ``data`` is
the payload). A message with neither Content Type nor user properties is read
as structured JSON, as MQTT 3.1.1 implies.

Whatever is wrong raises ``InputError`` with a short ``reason`` code, a
sentence, and the event id, batch index and field when they are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.kit import DecodeError, EventId, GroupId, Inbound, PlatformName
from schemas.cloudevents import (
    BATCH_CONTENT_TYPE,
    BY_TYPE,
    CONTENT_TYPE,
    CONTEXT_ATTRIBUTES,
    MAX_BATCH,
    CloudEvent,
    CloudEventBase,
    batch_decoder,
    event_type,
    media_type,
    parse_time,
    problem_location,
    single_decoder,
)

REASONS = ("too_large", "content_type", "not_json", "not_cloudevent", "unknown_type", "schema")
"""Every ``InputError.reason``, as documented in docs/mqtt.md."""
_STATUS = {"too_large": 413, "content_type": 415}  # HTTP-like, for the decode_errors metric; the rest is 400


class InputError(DecodeError):
    """A site published something the gateway will not take. It goes to the
    site's ``errors`` topic and the message is acknowledged, never stored."""

    def __init__(self, message: str, *, reason: str, event_id: str | None = None,
                 index: int | None = None, field: str | None = None) -> None:
        super().__init__(message, status=_STATUS.get(reason, 400), index=index, field=field)
        self.reason = reason
        self.event_id = event_id

    def as_json(self) -> dict[str, object]:
        body = super().as_json()
        body["reason"] = self.reason
        if self.event_id is not None:
            body["id"] = self.event_id
        return body


class Received(msgspec.Struct, frozen=True):
    """What the gateway needs of one MQTT PUBLISH."""

    payload: bytes
    content_type: str | None = None
    user_properties: Sequence[tuple[str, str]] = ()


def decode(platform: PlatformName, msg: Received, max_payload: int, now: float) -> list[Inbound]:
    """The events in ``msg`` (one, or several for a batch); ``InputError`` if any is bad."""
    attrs = binary_attributes(msg.user_properties)
    if len(msg.payload) > max_payload:
        raise InputError(f"payload is larger than {max_payload} bytes", reason="too_large", event_id=attrs.get("id"))
    return [to_inbound(platform, e, now) for e in decode_events(msg.content_type, attrs, msg.payload)]


def binary_attributes(user_properties: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The CloudEvents attributes among a message's user properties (others are
    extensions, ignored). ``datacontenttype`` is the Content Type, not a property."""
    attrs: dict[str, str] = {}
    for name, value in user_properties:
        if name in CONTEXT_ATTRIBUTES and name != "datacontenttype":
            if name in attrs and attrs[name] != value:
                raise InputError(f"user property `{name}` is given twice, with different values",
                                 reason="not_cloudevent", field=f"$.{name}")
            attrs[name] = value
    return attrs


def decode_events(content_type: str | None, attrs: dict[str, str], payload: bytes) -> list[CloudEventBase]:
    mt = media_type(content_type)
    if mt == CONTENT_TYPE:
        return [_structured(payload)]
    if mt == BATCH_CONTENT_TYPE:
        return _batch(payload)
    if mt.startswith("application/cloudevents"):
        raise InputError(f"event format {mt!r} is not supported: use {CONTENT_TYPE} or {BATCH_CONTENT_TYPE}",
                         reason="content_type", event_id=attrs.get("id"))
    if "specversion" in attrs:
        return [_binary(mt, attrs, payload)]
    if not mt:
        return [_structured(payload)]
    raise InputError(f"not a CloudEvent: Content Type {mt!r} needs the CloudEvents attributes as user properties "
                     f"(binary mode); or send Content Type {CONTENT_TYPE} (structured mode)", reason="content_type")


def _structured(payload: bytes) -> CloudEventBase:
    try:
        return single_decoder.decode(payload)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise _invalid(exc, _loads(payload), batch=False) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None


def _batch(payload: bytes) -> list[CloudEventBase]:
    try:
        return batch_decoder.decode(payload)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise _invalid(exc, _loads(payload), batch=True) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None


def _binary(mt: str, attrs: dict[str, str], payload: bytes) -> CloudEventBase:
    if mt not in ("", "application/json"):
        raise InputError(f"binary mode: the data must be application/json, not {mt!r}",
                         reason="content_type", event_id=attrs.get("id"))
    try:
        data = msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        err = _not_json(exc)
        err.event_id = attrs.get("id")
        raise err from None
    event: dict[str, Any] = {**attrs, "data": data}
    if mt:
        event["datacontenttype"] = mt
    try:
        return msgspec.convert(event, CloudEvent)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise _invalid(exc, event, batch=False) from None


def _loads(payload: bytes) -> Any:
    """The payload as plain JSON, to explain a validation error (msgspec
    validates while it parses, so malformed JSON can fail validation first)."""
    try:
        return msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None


def _not_json(exc: Exception) -> InputError:
    detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
    return InputError(f"malformed JSON: {detail}", reason="not_json")


def _invalid(exc: msgspec.ValidationError, raw: Any, *, batch: bool) -> InputError:
    """Say why a JSON document is not an event we take: not a CloudEvent at all,
    an event type the gateway does not know, or a field breaking the schema."""
    message, index, field = problem_location(exc, batch=batch)
    if batch:
        if not isinstance(raw, list):
            return InputError("a batch (application/cloudevents-batch+json) is a JSON array of CloudEvents",
                              reason="not_cloudevent", field="$")
        if len(raw) > MAX_BATCH:
            return InputError(f"a batch holds at most {MAX_BATCH} events, not {len(raw)}", reason="too_large")
        element = raw[index] if index is not None and index < len(raw) else None
    else:
        element = raw
    event_id = element.get("id") if isinstance(element, dict) and isinstance(element.get("id"), str) else None
    if not isinstance(element, dict):
        return InputError("not a CloudEvent: expected a JSON object", reason="not_cloudevent", index=index, field="$")
    for required in ("specversion", "type"):
        if required not in element:
            return InputError(f"not a CloudEvent: no `{required}` attribute", reason="not_cloudevent",
                              event_id=event_id, index=index, field=f"$.{required}")
    if not isinstance(element["type"], str) or element["type"] not in BY_TYPE:
        return InputError(f"unknown event type {element['type']!r}: expected one of {', '.join(BY_TYPE)}",
                          reason="unknown_type", event_id=event_id, index=index, field="$.type")
    return InputError(f"invalid event: {message}", reason="schema", event_id=event_id, index=index, field=field)


def to_inbound(platform: PlatformName, event: CloudEventBase, now: float) -> Inbound:
    return Inbound(platform=platform, group=GroupId(event.subject), event_id=EventId(event.id),
                   type=event_type(event), payload=event.data,  # type: ignore[attr-defined]
                   time=parse_time(event.time, now))
