"""Site -> gateway, pure: request body to ``Inbound`` records. No I/O."""

from __future__ import annotations

import re

import msgspec

from gateway.kit import DecodeError, EventId, GroupId, Inbound, PlatformName
from schemas.cloudevents import (
    BATCH_CONTENT_TYPE,
    CONTENT_TYPE,
    CloudEventBase,
    batch_decoder,
    event_type,
    parse_time,
    single_decoder,
)

_AT = re.compile(r"^(.*) - at `\$(\[(\d+)\])?(.*)`$", re.S)
_NAMED = re.compile(r"^Object (?:missing required|contains unknown) field `(.*)`$", re.S)


def check_content_type(content_type: str) -> bool:
    """True for a batch, False for a single event; DecodeError 415 otherwise."""
    if content_type == CONTENT_TYPE:
        return False
    if content_type == BATCH_CONTENT_TYPE:
        return True
    raise DecodeError(f"Content-Type must be {CONTENT_TYPE} or {BATCH_CONTENT_TYPE}, not {content_type or 'none'!r}",
                      status=415)


def decode_body(content_type: str, body: bytes) -> list[CloudEventBase]:
    """The CloudEvents in a request body; DecodeError (415 or 400) naming what is wrong."""
    batch = check_content_type(content_type)
    try:
        if batch:
            return batch_decoder.decode(body)
        return [single_decoder.decode(body)]
    except msgspec.ValidationError as exc:
        index, field, problem = _locate(str(exc), batch)
        raise DecodeError(f"invalid event: {problem}", index=index, field=field) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}") from None
    except RecursionError:  # msgspec refuses nesting deeper than the interpreter's limit
        raise DecodeError("malformed JSON: nested too deeply") from None


def _locate(message: str, batch: bool) -> tuple[int | None, str, str]:
    """(index of the event in a batch, JSON path of the offending value inside
    that event, the problem in words) from a msgspec ValidationError message.
    msgspec leaves the path out at the top level ("Object missing required
    field `id`"), and names a missing or unknown field in words rather than in
    the path: both become part of the path, so every answer names a field."""
    m = _AT.match(message)
    problem, index_part, index, rest = (m.group(1), m.group(2), m.group(3), m.group(4)) if m \
        else (message, None, None, "")
    named = _NAMED.match(problem)
    if named:
        rest += "." + named.group(1)
    if batch:
        return (int(index) if index is not None else None), "$" + rest, problem
    return 0, "$" + (index_part or "") + rest, problem


def to_inbound(platform: PlatformName, event: CloudEventBase, now: float) -> Inbound:
    return Inbound(platform=platform, group=GroupId(event.subject), event_id=EventId(event.id),
                   type=event_type(event), payload=event.data,  # type: ignore[attr-defined]
                   time=parse_time(event.time, now))
